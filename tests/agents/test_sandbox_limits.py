"""The `os` sandbox's cap on processes: a fork bomb stays within it while the host keeps working, the
command ends with the reason on record, and a machine that cannot cap processes is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rlhfkit.agents.sandbox as sandbox
from rlhfkit.agents import os_tasks
from rlhfkit.agents.registry import load_environment
from rlhfkit.agents.sandbox import ProcessCap, process_cap
from rlhfkit.data.toolcalls import ToolCall
from rlhfkit.errors import ConfigError

BOMB = ":(){ :|:& };:"
# the bomb's first shell returns at once and its exit ends the sandbox; waiting keeps the bomb going until
# the time limit, the worst case for the host
LASTING_BOMB = BOMB + "; sleep 30"
NOISE = 16
"""Processes the rest of the machine may start meanwhile (a shared CI host), next to the cap."""


def bash_call(command: str) -> dict:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [ToolCall("bash", json.dumps({"command": command}))],
    }


def host_processes() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


class Watch:
    """Samples a count from another thread while a block runs, and starts a process on the host every few
    samples (each must succeed)."""

    def __init__(self, count: Callable[[], int] = host_processes) -> None:
        self.count, self.base = count, count()
        self.peak, self.started = self.base, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.count())
            self.started.append(subprocess.run(["true"], timeout=10).returncode)
            time.sleep(0.005)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture()
def fresh_cap() -> Iterator[None]:
    process_cap.cache_clear()
    yield
    process_cap.cache_clear()


@pytest.mark.slow
def test_a_fork_bomb_stays_within_the_cap_and_the_host_keeps_working():
    cap = 32
    env = load_environment("os", command_timeout=2, max_processes=cap)
    env.reset(os_tasks.make_tasks("test")[0])
    start = time.monotonic()
    with Watch() as watch:
        result = env.step(bash_call(LASTING_BOMB))
    assert time.monotonic() - start < 6
    assert watch.peak - watch.base <= cap + NOISE, (watch.base, watch.peak)
    assert len(watch.started) >= 10 and set(watch.started) == {0}  # the host started processes throughout
    output = result.observations[0]["content"]
    assert "error: the command timed out after 2 s and was killed" in output
    assert f"error: the command reached the limit of {cap} processes" in output
    assert result.info["limits"] == ["processes", "timeout"]  # the step records why the command ended

    with Watch() as watch:  # the bomb as written: its first shell exits, which ends the sandbox at once
        result = env.step(bash_call(BOMB))
    assert watch.peak - watch.base <= cap + NOISE, (watch.base, watch.peak)
    assert result.info.get("limits", []) in ([], ["processes"])
    env.close()

    deadline = time.monotonic() + 5  # nothing of either bomb is left on the host
    while host_processes() > watch.base + NOISE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_processes() <= watch.base + NOISE
    if process_cap().kind == "cgroup":
        assert not list(process_cap().parent.glob(f"rlhfkit-sandbox-{os.getpid()}-*"))


def test_an_ordinary_command_is_not_marked(tmp_path):
    result = sandbox.run_sandboxed(
        "for i in 1 2 3 4 5; do sleep 0.1 & done; wait; echo done", tmp_path, timeout=5
    )
    assert (result.output, result.exit_code, result.process_limit, result.timed_out) == (
        "done\n",
        0,
        False,
        False,
    )
    with pytest.raises(ConfigError, match="max_processes must be at least 4"):
        load_environment("os", max_processes=2)


@pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run as another user (else the test above is rlimit)"
)
@pytest.mark.slow
def test_rlimit_caps_an_unprivileged_users_fork_bomb():
    """The "rlimit" command line, run by an unprivileged user (nobody) as it would be for one: the bomb's
    processes, bubblewrap's included, stay within the cap though the user has processes elsewhere."""
    nobody = 65534
    workdir = Path(tempfile.mkdtemp(prefix="rlhfkit-nobody-", dir="/tmp"))
    os.chown(workdir, nobody, nobody)

    def of_nobody() -> int:
        n = 0
        for name in os.listdir("/proc"):
            try:
                status = Path(f"/proc/{name}/status").read_text() if name.isdigit() else ""
            except OSError:
                continue
            n += f"\nUid:\t{nobody}\t" in status
        return n

    cap = 16
    others = [
        subprocess.Popen(["sleep", "30"], user=nobody, group=nobody, extra_groups=[]) for _ in range(cap)
    ]
    try:
        args = sandbox.sandbox_command(LASTING_BOMB, workdir, ProcessCap("rlimit"), max_processes=cap)
        as_nobody = {"user": nobody, "group": nobody, "extra_groups": [], "start_new_session": True}
        with Watch(of_nobody) as watch:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **as_nobody)
            try:
                out, _ = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
        # the whole allowance, though nobody has `cap` processes elsewhere (counted per user namespace)
        assert cap - 2 <= watch.peak - watch.base <= cap + 1, (watch.base, watch.peak)  # +1: one being reaped
        assert b"fork: retry: Resource temporarily unavailable" in out
    finally:
        for other in others:
            other.kill()
            other.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_machine_that_cannot_cap_processes_is_refused_in_one_line(monkeypatch, fresh_cap):
    monkeypatch.setattr(sandbox, "pids_cgroup_parents", lambda: [])
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    with pytest.raises(ConfigError) as info:
        load_environment("os")
    message = str(info.value)
    assert message.startswith("the os environment cannot cap the processes of a sandboxed command here")
    assert "root is exempt from RLIMIT_NPROC" in message and "\n" not in message

    process_cap.cache_clear()
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_kernel_at_least", lambda major, minor: False)
    with pytest.raises(ConfigError, match=r"counts RLIMIT_NPROC over all of a user's processes"):
        load_environment("os")

    process_cap.cache_clear()
    monkeypatch.setattr(sandbox, "_kernel_at_least", lambda major, minor: True)
    assert process_cap() == ProcessCap("rlimit")  # an unprivileged user on a recent kernel


@pytest.mark.slow
def test_the_cgroup_mechanism_is_found_and_cleaned_up(tmp_path, fresh_cap):
    parents = sandbox.pids_cgroup_parents()
    cap = process_cap()
    if cap.kind != "cgroup":
        reason = f"no writable pids cgroup here ({parents}); the rlimit mechanism applies"
        pytest.skip(reason)  # by design: the mechanism depends on the machine; the rlimit one has its test
    assert cap.parent in parents
    result = sandbox.run_sandboxed(f"{BOMB}; sleep 5", tmp_path, timeout=1, max_processes=8)
    assert result.process_limit and result.timed_out
    assert not list(cap.parent.glob(f"rlhfkit-sandbox-{os.getpid()}-*"))
