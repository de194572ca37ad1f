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


@app.command()
def rm(
    model: Annotated[str | None, typer.Option(help="Start from: SFT model dir, name or hub id.")] = None,
    data: Annotated[str | None, typer.Option(help="Preference pairs / rankings file.")] = None,
    output: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Step B: train a reward model on preference pairs and rankings."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.rm import RMConfig, run_rm

    def go() -> None:
        cfg = load_config(RMConfig, config, _overrides(set_, model=model, data=data, output=output))
        metrics = run_rm(cfg)
        if metrics:
            err.print(
                f"[bold]rm[/]: eval loss {metrics['loss']:.4f}, pairwise accuracy {metrics['accuracy']:.3f}; "
                f"reward model saved to {cfg.output}"
            )

    _run(go)


@app.command()
def score(
    reward: Annotated[str, typer.Option(help="Reward model directory (from `rlhfkit rm`).")],
    data: Annotated[str, typer.Option(help="prompt/completion, messages, pair or ranking records.")],
    output: Annotated[str | None, typer.Option(help="JSONL file to write (default: stdout).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
) -> None:
    """Add normalised rewards to records: `reward`, or `reward_chosen` and `reward_rejected`, or `rewards`."""
    from rlhfkit.rewards import score_file

    def go() -> None:
        n = score_file(reward, data, output, batch_size)
        if output is not None:
            err.print(f"[bold]score[/]: {n} records written to {output}")

    _run(go)


@app.command()
def ppo(
    policy: Annotated[str | None, typer.Option(help="Policy (and frozen reference): the SFT model.")] = None,
    reward: Annotated[str | None, typer.Option(help="Reward model directory (from `rlhfkit rm`).")] = None,
    reward_fn: Annotated[str | None, typer.Option(help="Or a Python reward: module:function.")] = None,
    prompts: Annotated[str | None, typer.Option(help="RL prompts file (or bundled:NAME).")] = None,
    output: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Step C: PPO against the reward with a KL penalty to the reference model."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.ppo import PPOConfig, run_ppo

    def go() -> None:
        named = {"policy": policy, "reward": reward, "reward_fn": reward_fn, "prompts": prompts}
        cfg = load_config(PPOConfig, config, _overrides(set_, output=output, **named))
        run_ppo(cfg)
        err.print(f"[bold]ppo[/]: policy saved to {cfg.output}")

    _run(go)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="rlhfkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
