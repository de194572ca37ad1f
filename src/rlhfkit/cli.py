"""The `rlhfkit` command line. Each command maps its options onto the stage's config dataclass:

    defaults  <-  --config YAML  <-  explicit options (--model, --data, --output)  <-  --set key=value

User errors (bad data, bad config, a model that cannot be loaded, a non-finite loss) print one line and
exit with code 2; nothing is written to the output directory when the input is rejected.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from rlhfkit.errors import RlhfkitError

app = typer.Typer(
    name="rlhfkit",
    help="Align language models with human preferences: SFT -> reward model -> PPO/GRPO, on a CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with settings.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a setting: --set train.lr=1e-5 (repeatable).")
]


@app.callback()
def _root() -> None:
    """rlhfkit: RLHF end to end (run a command with --help for its options)."""


def _run(fn: Callable[[], T]) -> T:
    """Run a command, turning user errors into one line on stderr and exit code 2."""
    try:
        return fn()
    except RlhfkitError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted; the last checkpoint is kept and the same command resumes from it")
        raise typer.Exit(code=130) from None


def _overrides(sets: list[str] | None, **explicit: Any) -> list[str]:
    return [f"{k}={v}" for k, v in explicit.items() if v is not None] + list(sets or [])


@app.command()
def sft(
    model: Annotated[str | None, typer.Option(help="Model: registered name, local dir or hub id.")] = None,
    data: Annotated[str | None, typer.Option(help="Demonstrations file (or bundled:NAME).")] = None,
    output: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Step A: supervised fine-tuning on demonstrations."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.sft import SFTConfig, run_sft

    def go() -> None:
        cfg = load_config(SFTConfig, config, _overrides(set_, model=model, data=data, output=output))
        metrics = run_sft(cfg)
        if metrics:
            err.print(
                f"[bold]sft[/]: eval loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}; "
                f"model saved to {cfg.output}"
            )

    _run(go)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="rlhfkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
