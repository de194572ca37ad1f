"""Running an agent's shell command in a throw-away sandbox: bubblewrap (`bwrap`), nothing else.

    result = run_sandboxed("ls -l | wc -l", workdir="/tmp/episode-1", timeout=10)

The command runs as `bash -c` inside new namespaces (`--unshare-all`: no network, its own PIDs, IPC, UTS
and, where the kernel lets us, users) with all capabilities dropped. What it sees of the machine:

* /usr (and the /bin, /sbin, /lib* links or folders beside it) and a few files of /etc (users, groups,
  the loader cache, `alternatives` links), all read-only;
* a fresh /proc, a minimal /dev and an empty /tmp of its own;
* the episode's working directory at /home/agent (also $HOME and the current directory): the only place
  that outlives the command and the only host folder it can write; the rest of the root is read-only.

Limits: `timeout` seconds of wall clock (then the whole process group is killed; `--die-with-parent` and
the PID namespace take every process of the sandbox with it), `memory_mb` of address space and
`file_mb` per written file (`ulimit -v` / `-f` as hard limits), and at most `max_output` characters of
output read back (stdout and stderr together, in order).

`check_sandbox` raises `ConfigError` with how to install bubblewrap when it is missing or cannot create its
namespaces here (a container without user namespaces, for example).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import ConfigError

HOME = "/home/agent"
ETC = [
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/ld.so.cache",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/mime.types",
]
INSTALL = "install it with `apt-get install bubblewrap` (Debian, Ubuntu) or `dnf install bubblewrap` (Fedora)"


@dataclass(frozen=True)
class SandboxResult:
    """What a command gave: its output (stdout and stderr), exit code, and whether a limit stopped it."""

    output: str
    exit_code: int
    timed_out: bool = False
    truncated: bool = False


def bwrap_arguments(workdir: str | Path) -> list[str]:
    """The bubblewrap command line up to (not including) the program to run."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ConfigError(
            f"the os environment runs commands in bubblewrap, but `bwrap` is not on PATH: {INSTALL}"
        )
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in ETC:
        args += ["--ro-bind-try", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    args += ["--bind", str(Path(workdir).resolve()), HOME, "--chdir", HOME, "--remount-ro", "/"]
    args += ["--hostname", "sandbox", "--clearenv", "--setenv", "HOME", HOME, "--setenv", "TMPDIR", "/tmp"]
    args += [
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "USER",
        "agent",
    ]
    return args


@functools.cache
def check_sandbox() -> None:
    """Raise ConfigError (with how to install bubblewrap) unless a sandbox can be started here."""
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bwrap-") as workdir:
        args = bwrap_arguments(workdir)
        try:
            probe = subprocess.run(
                [*args, "/bin/sh", "-c", "echo ok"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"the os environment cannot start bubblewrap ({exc}): {INSTALL}") from None
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        why = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        raise ConfigError(
            f"bubblewrap cannot create a sandbox here ({why}): the os environment needs user namespaces "
            f"(or root) and bwrap; {INSTALL}"
        )


def run_sandboxed(
    command: str,
    workdir: str | Path,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    max_output: int = 20_000,
) -> SandboxResult:
    """Run `command` with bash inside the sandbox, `workdir` as its home (see the module docstring)."""
    limits = (
        f'ulimit -v {memory_mb * 1024} && ulimit -f {file_mb * 1024} && ulimit -c 0 && exec /bin/bash -c "$0"'
    )
    args = [*bwrap_arguments(workdir), "/bin/bash", "-c", limits, command]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        out.seek(0)
        raw = out.read(max_output * 4 + 4)
    text = raw.decode("utf-8", errors="replace")
    truncated = len(text) > max_output
    return SandboxResult(text[:max_output], code, timed_out, truncated)
