"""The `rlhfkit` command line. Each command maps its options onto the stage's config dataclass:

    defaults  <-  --config YAML  <-  explicit options (--model, --data, --output)  <-  --set key=value

User errors (bad data, bad config, a model that cannot be loaded, a non-finite loss) print one line and
exit with code 2; nothing is written to the output directory when the input is rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rlhfkit.allocator import keep_freed_memory
from rlhfkit.console import console as err
from rlhfkit.console import run_command
from rlhfkit.feedback.cli import feedback_app

app = typer.Typer(
    name="rlhfkit",
    help="Align language models with human preferences: SFT -> reward model -> PPO/GRPO, on a CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with settings.")]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume-with-changes",
        help="Resume a stopped run in --output although its learning rate, schedule, step count or guard "
        "settings changed (recorded in config_history.jsonl); other changes are still refused.",
    ),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a setting: --set train.lr=1e-5 (repeatable).")
]


@app.callback()
def _root() -> None:
    """rlhfkit: RLHF end to end (run a command with --help for its options)."""
    keep_freed_memory()


def _claim_changes(cfg: Any, resume_with_changes: bool) -> None:
    """With --resume-with-changes, the changed config takes over its stopped run (config.accept_changes)."""
    if not resume_with_changes:
        return
    from rlhfkit.config import accept_changes
    from rlhfkit.training.settings import RESUMABLE

    for change in accept_changes(cfg, Path(cfg.output), RESUMABLE):
        err.print(f"resuming with a changed setting: {change}")


def _overrides(sets: list[str] | None, **explicit: Any) -> list[str]:
    """`key=value` strings for the config loader; lists are written as JSON (a YAML flow sequence)."""
    import json

    pairs = [(k, json.dumps(v) if isinstance(v, list) else v) for k, v in explicit.items() if v]
    return [f"{k}={v}" for k, v in pairs] + list(sets or [])


@app.command()
def sft(
    model: Annotated[str | None, typer.Option(help="Model: registered name, local dir or hub id.")] = None,
    data: Annotated[str | None, typer.Option(help="Demonstrations file (or bundled:NAME).")] = None,
    output: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume_with_changes: ResumeOpt = False,
) -> None:
    """Step A: supervised fine-tuning on demonstrations."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.sft import SFTConfig, run_sft

    def go() -> None:
        cfg = load_config(
            SFTConfig, config, _overrides(set_, model=model, output=output, **{"data.path": data})
        )
        _claim_changes(cfg, resume_with_changes)
        metrics = run_sft(cfg)
        if metrics:
            err.print(
                f"[bold]sft[/]: eval loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}; "
                f"model saved to {cfg.output}"
            )

    run_command(go)


@app.command()
def rm(
    model: Annotated[str | None, typer.Option(help="Start from: SFT model dir, name or hub id.")] = None,
    data: Annotated[str | None, typer.Option(help="Preference pairs / rankings file.")] = None,
    output: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume_with_changes: ResumeOpt = False,
) -> None:
    """Step B: train a reward model on preference pairs and rankings."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.rm import RMConfig, run_rm

    def go() -> None:
        cfg = load_config(
            RMConfig, config, _overrides(set_, model=model, output=output, **{"data.path": data})
        )
        _claim_changes(cfg, resume_with_changes)
        metrics = run_rm(cfg)
        if metrics:
            err.print(
                f"[bold]rm[/]: eval loss {metrics['loss']:.4f}, pairwise accuracy {metrics['accuracy']:.3f}; "
                f"reward model saved to {cfg.output}"
            )

    run_command(go)


@app.command()
def dpo(
    policy: Annotated[str | None, typer.Option(help="Policy (and frozen reference): the SFT model.")] = None,
    data: Annotated[str | None, typer.Option(help="Preference pairs / rankings file.")] = None,
    output: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume_with_changes: ResumeOpt = False,
) -> None:
    """Step C offline: DPO / IPO / conservative DPO on preference pairs, no reward model."""
    from rlhfkit.config import load_config
    from rlhfkit.trainers.dpo import DPOConfig, run_dpo

    def go() -> None:
        cfg = load_config(
            DPOConfig, config, _overrides(set_, policy=policy, output=output, **{"data.path": data})
        )
        _claim_changes(cfg, resume_with_changes)
        metrics = run_dpo(cfg)
        summary = f"eval loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f}; " if metrics else ""
        err.print(f"[bold]dpo[/]: {summary}policy saved to {cfg.output}")

    run_command(go)


@app.command()
def score(
    reward: Annotated[str, typer.Option(help="Reward model directory (from `rlhfkit rm`).")],
    data: Annotated[str, typer.Option(help="prompt/completion, messages, pair or ranking records.")],
    output: Annotated[str | None, typer.Option(help="JSONL file to write (default: stdout).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.", min=1)] = 16,
    max_length: Annotated[
        int | None,
        typer.Option(help="Longest prompt + answer in tokens (default: the model's context).", min=2),
    ] = None,
) -> None:
    """Add normalised rewards to records: `reward`, or `reward_chosen` and `reward_rejected`, or `rewards`."""
    from rlhfkit.rewards.mix import score_file

    def go() -> None:
        n = score_file(reward, data, output, batch_size, max_length)
        if output is not None:
            err.print(f"[bold]score[/]: {n} records written to {output}")

    run_command(go)


@app.command()
def pipeline(
    output: Annotated[str | None, typer.Option(help="Run directory (default runs/pipeline).")] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The whole chain on a tiny random model, in a minute or two.")
    ] = False,
    seeds: Annotated[
        int, typer.Option(help="Run seeds 0..N-1 in OUTPUT/seed-N and report the win rate's mean and spread.")
    ] = 0,
    env: Annotated[
        str | None,
        typer.Option(
            help="RLHF for agents in an environment: support or commons (default runs/pipeline-ENV)."
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The main job: SFT -> simulated feedback -> reward model -> PPO/GRPO -> evaluation -> report. With
    --env, for agents: SFT -> ranked episodes -> reward model -> RL on the return, RLHF -> agent-eval."""
    from rlhfkit.config import load_config
    from rlhfkit.errors import ConfigError
    from rlhfkit.pipeline import QUICK, PipelineConfig, run_pipeline, run_seeds

    def go() -> None:
        if env is not None:
            from rlhfkit.agent_pipeline import load_agent_config, run_agent_pipeline

            if seeds:
                raise ConfigError(
                    "--seeds is not supported with --env: run each seed with --set seed=N --output DIR"
                )
            run_agent_pipeline(load_agent_config(env, quick, config, _overrides(set_, output=output)))
            return
        sets = (QUICK if quick else []) + _overrides(set_, output=output)
        cfg = load_config(PipelineConfig, config, sets)
        if seeds < 0:
            raise ConfigError(f"--seeds must be 0 (one run) or more, got {seeds}")
        if seeds:
            summary = run_seeds(cfg, seeds)
            err.print(f"[bold]pipeline[/]: {seeds} seeds; summary in {cfg.output}/seeds.json "
                      f"(mean win rate {summary['mean_win_rate']:.1%})")  # fmt: skip
            return
        state = run_pipeline(cfg)
        err.print(
            f"[bold]pipeline[/]: done in {state['total_seconds'] / 60:.1f} min; "
            f"report: {cfg.output}/report.html"
        )

    run_command(go)


def _rl_command(name: str, module: str, config_class: str, runner: str, doc: str) -> None:
    """Register `rlhfkit NAME`: the on-policy RL commands share their options."""

    def command(
        policy: Annotated[
            str | None, typer.Option(help="Policy (and frozen reference): the SFT model.")
        ] = None,
        reward: Annotated[
            list[str] | None,
            typer.Option(help="Reward model directory (repeatable; weights: reward_weights)."),
        ] = None,
        reward_fn: Annotated[
            list[str] | None, typer.Option(help="Python reward module:function (repeatable).")
        ] = None,
        prompts: Annotated[str | None, typer.Option(help="RL prompts file (or bundled:NAME).")] = None,
        env: Annotated[
            str | None,
            typer.Option(help="GRPO/RLOO: multi-turn RL in an environment (name or module:Class)."),
        ] = None,
        output: Annotated[str | None, typer.Option(help="Output directory.")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
        resume_with_changes: ResumeOpt = False,
    ) -> None:
        import importlib

        from rlhfkit.config import load_config

        trainer = importlib.import_module(module)

        def go() -> None:
            named = {
                "policy": policy,
                "reward": reward,
                "reward_fn": reward_fn,
                "prompts": prompts,
                "env": env,
            }
            cfg = load_config(
                getattr(trainer, config_class), config, _overrides(set_, output=output, **named)
            )
            _claim_changes(cfg, resume_with_changes)
            getattr(trainer, runner)(cfg)
            err.print(f"[bold]{name}[/]: policy saved to {cfg.output}")

        run_command(go)

    command.__doc__ = doc
    app.command(name=name)(command)


_rl_command(
    "ppo", "rlhfkit.trainers.ppo", "PPOConfig", "run_ppo",
    "Step C: PPO against the reward with a KL penalty to the reference model.",
)  # fmt: skip
_rl_command(
    "grpo", "rlhfkit.trainers.grpo", "GRPOConfig", "run_grpo",
    "Step C without a critic: GRPO (group-normalised advantages, k3 KL in the loss).",
)  # fmt: skip
_rl_command(
    "rloo", "rlhfkit.trainers.grpo", "RLOOConfig", "run_rloo",
    "Step C without a critic: RLOO (leave-one-out baseline, KL in the reward).",
)  # fmt: skip


@app.command()
def opro(
    task: Annotated[str, typer.Argument(help="The problem: linreg, tsp or prompt.")],
    optimizer: Annotated[
        str | None, typer.Option(help="The LLM that proposes solutions: model dir, registered name or URL.")
    ] = None,
    scorer: Annotated[
        str | None,
        typer.Option(help="prompt task: the LLM whose instruction is optimised (default: optimizer)."),
    ] = None,
    output: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    export_episodes: Annotated[
        str | None,
        typer.Option(help="Write (meta-prompt, proposal, improvement) records for `rlhfkit grpo`."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The LLM as optimiser (OPRO, Yang et al. 2023): linear regression, TSP and prompts vs random search."""
    from rlhfkit.config import load_config
    from rlhfkit.opro.loop import OPROConfig, run_opro

    def go() -> None:
        cfg = load_config(
            OPROConfig, config, _overrides(set_, task=task, optimizer=optimizer, scorer=scorer, output=output)
        )
        result = run_opro(cfg, export_episodes=export_episodes)
        found = (
            f"optimum at step {result['optimum_step']}" if result["optimum_found"] else "optimum not reached"
        )
        baseline = result["random_search"]["best"]
        versus = f"random search {baseline:.6g}" if baseline is not None else "nothing scored to compare"
        err.print(
            f"[bold]opro[/]: {result['scored']} solutions scored in {result['steps']} steps, {found}; best "
            f"{result['best']['score']:.6g} ({versus}); report: {Path(cfg.output) / 'report.html'}"
        )

    run_command(go)


@app.command("eval")
def eval_(
    policy: Annotated[str | None, typer.Option(help="Trained policy: model dir, name or hub id.")] = None,
    reference: Annotated[str | None, typer.Option(help="Model to compare with: the SFT model.")] = None,
    reward: Annotated[str | None, typer.Option(help="Reward model dir: adds RM scores and accuracy.")] = None,
    prompts: Annotated[str | None, typer.Option(help="Held-out prompts file (or bundled:NAME).")] = None,
    output: Annotated[str | None, typer.Option(help="Output directory (eval.json, answers.jsonl).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Gold win rate (95% CI), gold and RM scores, KL to the reference, lengths, RM accuracy vs gold."""
    from rlhfkit.config import load_config
    from rlhfkit.evaluation.evaluate import EvalConfig, run_eval

    def go() -> None:
        named = {"policy": policy, "reference": reference, "reward": reward, "prompts": prompts}
        cfg = load_config(EvalConfig, config, _overrides(set_, output=output, **named))
        res = run_eval(cfg)
        wr = res["win_rate"]
        err.print(
            f"[bold]eval[/]: win rate {wr['rate']:.3f} [{wr['low']:.3f}, {wr['high']:.3f}], "
            f"gold {res['gold']['reference']:.3f} -> {res['gold']['policy']:.3f}, "
            f"KL {res['kl']['mean']:.3f} nats; written to {cfg.output}"
        )

    run_command(go)


@app.command("agent-eval")
def agent_eval(
    policy: Annotated[
        list[str] | None, typer.Option(help="Local model to evaluate (repeatable: models are compared).")
    ] = None,
    endpoint: Annotated[
        list[str] | None,
        typer.Option(help="OpenAI-compatible server URL (its /v1) to evaluate (repeatable)."),
    ] = None,
    envs: Annotated[
        str | None, typer.Option(help="Environments, comma-separated: calc,db,os or module:Class.")
    ] = None,
    output: Annotated[
        str | None, typer.Option(help="Output directory (agent_eval.json, report.html).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Agents: success rates (95% CI), turns, tokens and AgentBench's overall score in environments."""
    from rlhfkit.config import load_config
    from rlhfkit.evaluation.agent_eval import AgentEvalConfig, run_agent_eval

    def go() -> None:
        names = [e.strip() for e in envs.split(",") if e.strip()] if envs else None
        named = {"policy": policy, "endpoint": endpoint, "envs": names}
        cfg = load_config(AgentEvalConfig, config, _overrides(set_, output=output, **named))
        run_agent_eval(cfg)
        err.print(f"[bold]agent-eval[/]: written to {Path(cfg.output) / 'agent_eval.json'} and report.html")

    run_command(go)


@app.command()
def report(
    run: Annotated[Path, typer.Option(help="Run directory (written by `rlhfkit pipeline`).")],
    output: Annotated[Path | None, typer.Option(help="HTML file (default: RUN/report.html).")] = None,
) -> None:
    """Write a self-contained HTML report of a run: results, timings, curves, over-optimisation, answers."""
    from rlhfkit.evaluation.report import build_report

    def go() -> None:
        err.print(f"[bold]report[/]: written to {build_report(run, output)}")

    run_command(go)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Model to serve: local directory or registered name.")],
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="RLHFKIT_API_KEY", help="Require `Authorization: Bearer KEY` (or set RLHFKIT_API_KEY)."
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Answers decoded together at most.", min=1)] = 32,
    max_queue: Annotated[int, typer.Option(help="Answers waiting at most; beyond: HTTP 429.", min=0)] = 128,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.", min=1)] = 2048,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Let transformers run the model's own code.")
    ] = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, tool calls)."""
    from rlhfkit.serve import serve as run_server

    run_command(
        lambda: run_server(
            model, host, port, api_key, max_batch, max_queue, max_tokens, trust_remote_code=trust_remote_code
        )
    )


@app.command()
def generate(
    model: Annotated[str | None, typer.Option(help="Model: local directory or registered name.")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompts file (or bundled:NAME).")] = None,
    output: Annotated[str | None, typer.Option(help="JSONL file to write.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Answers per prompt.", min=1)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Sample answers to a file of prompts offline (batched), one JSONL row per prompt and sample."""
    from rlhfkit.chat.generate import GenerateConfig, run_generate
    from rlhfkit.config import load_config

    def go() -> None:
        named = {"model": model, "prompts": prompts, "output": output, "n": n}
        cfg = load_config(GenerateConfig, config, _overrides(set_, **named))
        rows = run_generate(cfg)
        err.print(f"[bold]generate[/]: {rows} answers written to {cfg.output}")

    run_command(go)


app.add_typer(feedback_app, name="feedback")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="rlhfkit")


if __name__ == "__main__":  # pragma: no cover
    main()
