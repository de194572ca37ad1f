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
`file_mb` per written file (`ulimit -v` / `-f` as hard limits), `max_processes` processes and threads at
once, and at most `max_output` characters of output read back (stdout and stderr together, in order).

The process cap keeps a fork bomb (`:(){ :|:& };:`) from filling the host's process table: without it,
every process a command starts is a process of the host until the timeout kills them all. A fork beyond
the cap fails with EAGAIN inside the sandbox (bash retries, then gives up); the host is untouched.
`process_cap` picks the mechanism once per process, the first that works here:

* "cgroup": each command runs in a new pids cgroup of its own (`pids.max` = the cap; cgroup v1's `pids`
  hierarchy, or v2 where the pids controller is enabled), made under this process's cgroup (v2: or its
  parent). It counts every task of the command, bubblewrap's own included, and says exactly whether the cap
  was reached (`pids.events`). Needs write access to the cgroup file system: root, or a delegated subtree.
* "rlimit": `ulimit -u` (RLIMIT_NPROC) set inside the sandbox, whose own user namespace maps the command to
  this unprivileged user. Linux 5.14+ counts RLIMIT_NPROC per user namespace and user, so the cap is the
  command's alone (older kernels count every process of the user on the host: a cap on the user, not the
  command). It is set to the cap minus one, for bubblewrap's outer process outside the namespace. Root is
  exempt from RLIMIT_NPROC (even mapped to another id inside the namespace), so this serves only other
  users. Whether the cap was reached is read from the output (bash's "fork: ... Resource temporarily
  unavailable").

Where neither works (root without a writable pids cgroup, or a kernel older than 5.14 without one),
`process_cap` raises a one-line `ConfigError` rather than run commands uncapped. `check_sandbox` raises
`ConfigError` with how to install bubblewrap when it is missing or cannot create its namespaces here (a
container without user namespaces, for example).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
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
MIN_PROCESSES = 4
"""The smallest process cap that runs a command at all (bubblewrap's two processes, bash, one child)."""
# moves the shell into the cgroup named by $0, then becomes bubblewrap: nothing runs outside the cap
ENTER_CGROUP = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
_GROUPS = itertools.count()


@dataclass(frozen=True)
class SandboxResult:
    """What a command gave: its output (stdout and stderr), exit code, and whether a limit stopped it."""

    output: str
    exit_code: int
    timed_out: bool = False
    truncated: bool = False
    process_limit: bool = False
    """A fork or thread failed because the command had `max_processes` of them."""


@dataclass(frozen=True)
class ProcessCap:
    """How commands' processes are capped here: "cgroup" (under `parent`) or "rlimit" (module docstring)."""

    kind: str
    parent: Path | None = None


def bwrap_arguments(workdir: str | Path, own_user_namespace: bool = False) -> list[str]:
    """The bubblewrap command line up to (not including) the program to run; `own_user_namespace` makes
    bubblewrap fail rather than run without one (`--unshare-all` only tries)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ConfigError(
            f"the os environment runs commands in bubblewrap, but `bwrap` is not on PATH: {INSTALL}"
        )
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if own_user_namespace:
        args.append("--unshare-user")
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


def _bwrap_fails(own_user_namespace: bool = False) -> str | None:
    """Why bubblewrap cannot run `echo ok` in a sandbox here (its last line of stderr), or None if it can;
    ConfigError if it cannot even be started."""
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bwrap-") as workdir:
        args = bwrap_arguments(workdir, own_user_namespace)
        try:
            probe = subprocess.run(
                [*args, "/bin/sh", "-c", "echo ok"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"the os environment cannot start bubblewrap ({exc}): {INSTALL}") from None
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        return (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
    return None


@functools.cache
def check_sandbox() -> None:
    """Raise ConfigError (with how to install bubblewrap) unless a sandbox can be started here."""
    why = _bwrap_fails()
    if why is not None:
        raise ConfigError(
            f"bubblewrap cannot create a sandbox here ({why}): the os environment needs user namespaces "
            f"(or root) and bwrap; {INSTALL}"
        )


def pids_cgroup_parents() -> list[Path]:
    """Folders under which a pids cgroup for a command could be made: this process's own cgroup in a v1
    `pids` hierarchy; in v2, its own cgroup or the parent of it, where the pids controller is enabled for
    children (v2 allows no processes in a cgroup that hands controllers down, so the parent is the usual
    place). Read from /proc/self/cgroup and /proc/self/mountinfo; nothing is written."""
    try:
        memberships = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found: list[Path] = []
    for line in mounts:
        before, _, after = line.partition(" - ")
        fields, kind = before.split(), [*after.split(), "", "", ""][:3]
        fstype, options = kind[0], kind[2].split(",")
        v1 = fstype == "cgroup" and "pids" in options
        if not (v1 or fstype == "cgroup2") or len(fields) < 5:
            continue
        root, point = fields[3], Path(fields[4])
        for entry in memberships:
            if len(entry) != 3 or not entry[2].startswith(root):
                continue
            if (v1 and "pids" in entry[1].split(",")) or (not v1 and entry[0] == "0"):
                own = point / entry[2][len(root) :].lstrip("/")
                for folder in [own] if v1 else [own, own.parent]:
                    try:
                        enabled = v1 or "pids" in (folder / "cgroup.subtree_control").read_text().split()
                    except OSError:
                        enabled = False
                    if enabled and folder.is_relative_to(point) and folder not in found:
                        found.append(folder)
    return found


def new_cgroup(parent: Path, max_processes: int) -> Path:
    """A new pids cgroup under `parent` that allows `max_processes` tasks; OSError if it cannot be made."""
    group = parent / f"rlhfkit-sandbox-{os.getpid()}-{next(_GROUPS)}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(f"{max_processes}\n")
    except OSError:
        group.rmdir()
        raise
    return group


def cgroup_limit_reached(group: Path) -> bool:
    """Whether a fork in `group` was refused for its pids.max (the `max` count of pids.events)."""
    try:
        events = dict(line.split()[:2] for line in (group / "pids.events").read_text().splitlines())
    except (OSError, ValueError):
        return False
    return events.get("max", "0") != "0"


def remove_cgroup(group: Path, wait: float = 5.0) -> None:
    """Kill whatever is left in `group` (the PID namespace's end usually took it already) and remove it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            pids = (group / "cgroup.procs").read_text().split()
        except OSError:
            return  # already gone
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            group.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                return  # left behind: its processes are killed, the kernel has yet to let them go
            time.sleep(0.01)


def _cgroup_works(parent: Path) -> bool:
    try:
        group = new_cgroup(parent, 8)
    except OSError:
        return False
    try:
        enter = subprocess.run(
            ["/bin/sh", "-c", ENTER_CGROUP, str(group), "/bin/true"], capture_output=True, timeout=30
        )
        return enter.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        remove_cgroup(group)


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


@functools.cache
def process_cap() -> ProcessCap:
    """How this machine caps a command's processes (see the module docstring); one-line ConfigError if it
    cannot."""
    for parent in pids_cgroup_parents():
        if _cgroup_works(parent):
            return ProcessCap("cgroup", parent)
    if os.geteuid() == 0:
        why = "root is exempt from RLIMIT_NPROC"
    elif not _kernel_at_least(5, 14):
        release = os.uname().release
        why = f"Linux {release} counts RLIMIT_NPROC over all of a user's processes (5.14+: per namespace)"
    else:
        failure = _bwrap_fails(own_user_namespace=True)
        if failure is None:
            return ProcessCap("rlimit")
        why = f"bubblewrap cannot give a command a user namespace of its own for RLIMIT_NPROC ({failure})"
    raise ConfigError(
        "the os environment cannot cap the processes of a sandboxed command here: no pids cgroup can be "
        f"made (cgroup v1 `pids`, or v2 with the pids controller, writable) and {why}; run rlhfkit as an "
        "unprivileged user on Linux 5.14+, or as root with a writable pids cgroup"
    )


def sandbox_command(
    command: str,
    workdir: str | Path,
    cap: ProcessCap,
    memory_mb: int = 1024,
    file_mb: int = 16,
    max_processes: int = 64,
    cgroup: Path | None = None,
) -> list[str]:
    """The whole command line that runs `command` in the sandbox under `cap` (for "cgroup": entering the
    made `cgroup` before bubblewrap starts, so nothing of the command runs outside it)."""
    limits = f"ulimit -v {memory_mb * 1024} && ulimit -f {file_mb * 1024} && ulimit -c 0"
    if cap.kind == "rlimit":  # minus bubblewrap's outer process, which the namespace does not count
        limits += f" && ulimit -u {max_processes - 1}"
    args = [
        *bwrap_arguments(workdir, cap.kind == "rlimit"),
        "/bin/bash",
        "-c",
        f'{limits} && exec /bin/bash -c "$0"',
    ]
    if cgroup is not None:
        args = ["/bin/sh", "-c", ENTER_CGROUP, str(cgroup), *args]
    return [*args, command]


def run_sandboxed(
    command: str,
    workdir: str | Path,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    max_output: int = 20_000,
    max_processes: int = 64,
) -> SandboxResult:
    """Run `command` with bash inside the sandbox, `workdir` as its home (see the module docstring)."""
    if max_processes < MIN_PROCESSES:
        raise ConfigError(f"max_processes must be at least {MIN_PROCESSES}, got {max_processes}")
    cap = process_cap()
    group = new_cgroup(cap.parent, max_processes) if cap.parent is not None else None
    try:
        args = sandbox_command(command, workdir, cap, memory_mb, file_mb, max_processes, group)
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
        reached = cgroup_limit_reached(group) if group is not None else False
    finally:
        if group is not None:
            remove_cgroup(group)
    text = raw.decode("utf-8", errors="replace")
    if group is None:
        reached = "fork: " in text and "Resource temporarily unavailable" in text
    truncated = len(text) > max_output
    return SandboxResult(text[:max_output], code, timed_out, truncated, reached)
