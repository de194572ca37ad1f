"""User-facing errors: each one prints as a single line and exits with code 2, without a traceback."""

from __future__ import annotations


class RlhfkitError(Exception):
    """An error caused by the user's input or environment, shown as one line (exit code 2)."""

    exit_code = 2


class DataError(RlhfkitError):
    """A bad record in a data file; the message names the file, the line (or row) and the field."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


class ConfigError(RlhfkitError):
    """A bad configuration value (YAML file or --set override)."""


class NonFiniteLossError(RlhfkitError):
    """Training produced a NaN/inf loss; the run stops and the last good checkpoint is kept."""


class DivergenceError(RlhfkitError):
    """The divergence guard stopped a run (loss spike, dead gradients); the good checkpoints are kept."""


class NonFiniteRewardError(RlhfkitError):
    """A reward component returned NaN or inf; the message names the component and the rows."""


class SaveError(RlhfkitError):
    """Writing a checkpoint or a model failed (disk full, no permission): one line naming the path."""


class HealthError(RlhfkitError):
    """An RL health check stopped a run (`train.health.action=stop`); the last good checkpoint is kept."""
