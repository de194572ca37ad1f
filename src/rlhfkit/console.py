"""What the user sees on the terminal: one stderr console, progress bars, quiet library logs, and the way
every command turns a user error into one line and exit code 2.

Every module that prints goes through `console` (stderr, so stdout stays free for data, e.g. `rlhfkit
score` without `--output`). Progress bars show only on a terminal; in logs and CI they are silent.

A message (a note, a warning, an error) is one line in a log whatever its length: off a terminal Rich would
wrap text at 80 columns (its width when it cannot ask a terminal), so a line-based reader (`grep`, a CI log
viewer) would see half a message. On a terminal the window wraps it, as usual.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlhfkit.errors import RlhfkitError

T = TypeVar("T")


class MessageConsole(Console):
    """A Rich console whose plain-text messages are never wrapped when it does not write to a terminal.

    Only `print` calls made of strings change (soft wrap: no line breaks added, nothing cropped); tables
    and other renderables keep Rich's layout, and an explicit `soft_wrap=` is respected.
    """

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        if soft_wrap is None and all(isinstance(o, str) for o in objects) and not self.is_terminal:
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


console = MessageConsole(stderr=True)


def progress(enabled: bool = True) -> Progress:
    """A progress bar on stderr (label, bar, done/total, elapsed, eta, a `status` field); off unless
    `enabled` and stderr is a terminal. Add a task with `add_task(label, total=N, status="")`."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not (enabled and sys.stderr.isatty()),
    )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports, warnings and progress bars (we report what matters ourselves);
    `RLHFKIT_VERBOSE=1` keeps them."""
    from transformers.utils import logging

    if os.environ.get("RLHFKIT_VERBOSE"):
        yield
        return

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        # the GGUF reader draws its bar with plain tqdm, which transformers' switch does not reach
        with _tqdm_off("transformers.modeling_gguf_pytorch_utils"):
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def run_command(fn: Callable[[], T]) -> T:
    """Run a CLI command: a user error (`RlhfkitError`) prints one line on stderr and exits with its code
    (2); Ctrl-C says that the last checkpoint is kept and exits with 130. Anything else is a bug and keeps
    its traceback."""
    import typer

    try:
        return fn()
    except RlhfkitError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("interrupted; the last checkpoint is kept and the same command resumes from it")
        raise typer.Exit(code=130) from None


@contextlib.contextmanager
def _tqdm_off(module_name: str) -> Iterator[None]:
    """`module_name`'s `tqdm` draws no bar while this runs (the module is left alone if it has none)."""
    import functools
    import importlib

    try:
        module: Any = importlib.import_module(module_name)  # sets the attribute `tqdm` below
    except ImportError:
        yield
        return
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original
