"""`os`: shell tasks in a throw-away folder, with a `bash` tool that runs only inside bubblewrap
(AgentBench's OS task).

`reset` writes the task's files (`agents.os_tasks`) into a fresh temporary folder, which the sandbox shows as
/home/agent, the only writable place (`agents.sandbox`: no network, read-only system, a time, memory, file
size, process and output limit per command). A question's answer is checked exactly: a number equal to the
gold, a file or person named among the task's candidates; a job ("copy these files") is checked by a command
run in the same sandbox after the episode, whose output must equal the gold.

A command stopped by a limit says so in its output (an "error: ..." line: timed out, or reached the cap of
`max_processes` processes and threads, 64 by default) and in the step's `info["limits"]` ("timeout",
"processes"), so an episode with a fork bomb ends on record instead of filling the host's process table.

Constructing the environment checks that bubblewrap works here and that commands' processes can be capped
(`sandbox.process_cap`: a pids cgroup, or RLIMIT_NPROC in the sandbox's user namespace), and raises a
one-line `ConfigError` otherwise; there is no unsandboxed or uncapped fallback.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfkit.agents.answers import last_number, named_values, normalize, numbers_match
from rlhfkit.agents.env import Message, Split, StepResult, Task
from rlhfkit.agents.os_tasks import make_tasks
from rlhfkit.agents.sandbox import HOME, MIN_PROCESSES, check_sandbox, process_cap, run_sandboxed
from rlhfkit.agents.tools import ToolEnvironment
from rlhfkit.errors import ConfigError


def write_files(root: Path, files: dict[str, str]) -> None:
    """Create `files` ({relative path: text}, "dir/" for an empty folder) under `root`."""
    for relative, content in files.items():
        path = root / relative
        if not path.resolve().is_relative_to(root.resolve()):
            raise ValueError(f"task file {relative!r} is outside the working folder")
        if relative.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


class OSEnvironment(ToolEnvironment):
    """Shell tasks with a sandboxed `bash` tool (see the module docstring)."""

    name = "os"

    def __init__(
        self,
        tool_timeout: float | None = None,
        max_output_chars: int = 2000,
        command_timeout: float = 10.0,
        memory_mb: int = 1024,
        max_processes: int = 64,
    ) -> None:
        if int(max_processes) < MIN_PROCESSES:
            raise ConfigError(f"os: max_processes must be at least {MIN_PROCESSES}, got {max_processes}")
        check_sandbox()
        process_cap()
        self.command_timeout, self.memory_mb = float(command_timeout), int(memory_mb)
        self.max_processes = int(max_processes)
        self.workdir: Path | None = None
        self.limits_hit: list[str] = []  # of this step's commands: "timeout", "processes"
        # the sandbox kills a command at command_timeout; the thread limit is only the last guard
        super().__init__(tool_timeout if tool_timeout is not None else command_timeout + 5, max_output_chars)

    def tools(self) -> list[Callable[..., Any]]:
        return [self.bash]

    def bash(self, command: str) -> str:
        """Run a bash command in the task's working directory and return its output (stdout and stderr).

        Args:
            command: The command line, e.g. "find . -name '*.log' | wc -l". There is no network access.
        """
        if self.workdir is None:
            return "error: no working directory (the episode has not started)"
        if "\0" in command:
            return "error: the command contains a NUL character"
        result = run_sandboxed(
            command,
            self.workdir,
            self.command_timeout,
            self.memory_mb,
            max_output=self.max_output_chars - 200,
            max_processes=self.max_processes,
        )
        text = result.output.rstrip("\n")
        if result.truncated:
            text += "\n... [output truncated]"
        if result.timed_out:
            self.limits_hit.append("timeout")
            text += f"\nerror: the command timed out after {self.command_timeout:g} s and was killed"
        if result.process_limit:
            self.limits_hit.append("processes")
            cap = self.max_processes
            text += f"\nerror: the command reached the limit of {cap} processes; forks beyond it failed"
        if not result.timed_out and result.exit_code != 0:
            text += f"\n(exit code {result.exit_code})"
        return text.strip("\n") or "(no output)"

    def step(self, message: Message) -> StepResult:
        self.limits_hit = []
        result = super().step(message)
        if self.limits_hit:
            result.info["limits"] = sorted(set(self.limits_hit))
        return result

    def tasks(self, split: Split) -> list[Task]:
        return list(make_tasks(split))

    def reset(self, task: Task) -> list[Message]:
        self.close()
        self.workdir = Path(tempfile.mkdtemp(prefix="rlhfkit-os-"))
        write_files(self.workdir, task.data["files"])
        return super().reset(task)

    def instructions(self, task: Task) -> str:
        return (
            f"You work in a Linux shell. Use the bash tool to run commands; they run in {HOME}, where the "
            "task's files are, without network access. When you know the answer (or have done the job), "
            "reply without a tool call and give only the answer."
        )

    def check(self, task: Task, answer: str) -> float:
        data = task.data
        if data["kind"] == "check":
            if self.workdir is None:
                return 0.0
            result = run_sandboxed(
                data["check"],
                self.workdir,
                self.command_timeout,
                self.memory_mb,
                max_processes=self.max_processes,
            )
            return float(result.exit_code == 0 and result.output.strip() == data["answer"])
        if data["kind"] == "number":
            return float(numbers_match(last_number(answer), float(data["answer"]), rel_tol=0.0, abs_tol=1e-9))
        gold = normalize(data["answer"])
        return float(normalize(answer) == gold or named_values(answer, data["choices"]) == {gold})

    def close(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
