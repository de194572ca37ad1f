"""The main job: `rlhfkit pipeline`, RLHF end to end with simulated human feedback.

    rlhfkit pipeline                      # the embedded default model and the bundled data
    rlhfkit pipeline --quick              # the same chain on a tiny random model, in a minute or two
    rlhfkit pipeline --set rl.algorithm=grpo --set gold=my_module:my_preference
    rlhfkit pipeline --env support        # RLHF for agents: `rlhfkit.agent_pipeline`

Stages, each in its own directory of the run (`runs/pipeline` by default):
  sft/        A. supervised fine-tuning on the bundled demonstrations (the reference policy)
  feedback/   the SFT model answers `feedback.k` times each of `feedback.num_prompts` prompts; a panel of
              simulated annotators (rewards.panel: the gold preference plus label noise) ranks each set
  rm/         B. a reward model on those rankings (all K-choose-2 pairs of a prompt together)
  rl/         C. GRPO (or RLOO, PPO) against the reward model, KL-anchored to the SFT model; the gold score of
              the rollouts is logged beside (never used as a reward) for the over-optimisation curve. With
              GRPO / RLOO the panel also ranks each group of the policy's answers and the reward model goes
              on learning from those rankings (`feedback.online`, `rlhfkit.rewards.online`): rl/reward_model
  eval/       the SFT and the final policy answer the held-out prompts; the gold judge compares them
  report.html the numbers and plots

A stage that finished is skipped when the command runs again; an interrupted one resumes from its last
checkpoint (the trainers' exact resume), so killing the pipeline loses at most one checkpoint interval.
`pipeline.json` records each stage's status and seconds. The pipeline's settings are saved in
`config.yaml`; running again with different ones is refused, as for each trainer.

The gold preference (`gold`, default: rlhfkit.rewards.panel.gold_score) labels the feedback (through the noisy
panel) and judges the evaluation, nothing else: the policy only ever sees the reward model, as with real
people.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.allocator import release_freed_memory
from rlhfkit.config import claim_run_dir, setting
from rlhfkit.console import console
from rlhfkit.errors import ConfigError
from rlhfkit.evaluation.evaluate import EvalConfig
from rlhfkit.feedback.agreement import pair_agreement
from rlhfkit.feedback.export import ranking_json
from rlhfkit.fileio import write_atomic
from rlhfkit.models.loading import DEFAULT_MODEL
from rlhfkit.rewards.online import OnlineFeedbackConfig
from rlhfkit.rollout.engine import SamplingConfig
from rlhfkit.trainers.grpo import ONLINE_RM_DIR, GRPOConfig
from rlhfkit.trainers.ppo import PPOConfig
from rlhfkit.trainers.rm import RMConfig
from rlhfkit.trainers.sft import SFTConfig
from rlhfkit.training.settings import TrainConfig

STAGES = ("sft", "feedback", "rm", "rl", "eval", "report")


@dataclass
class FeedbackConfig:
    """Simulated human feedback: K answers per prompt from the SFT model, ranked by a noisy panel."""

    prompts: str = "bundled:prompts.jsonl"
    """Prompts to collect answers for (the first `num_prompts`)."""
    num_prompts: int = setting(96, ge=1)
    """How many prompts are labelled."""
    k: int = setting(4, ge=2)
    """Answers per prompt (the annotators rank all K; duplicates are dropped)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.5))
    """How answers are sampled (`max_new_tokens`: set by the pipeline). T 0.5, as step C samples: at T 1.0
    most answers are cut off, so few ranked pairs compare two finished answers and the reward model learns
    little but "finish" (measured: bench/RESULTS.md)."""
    batch_size: int = setting(64, ge=1)
    """Rollouts per generation batch."""
    annotators: int = setting(4, ge=1)
    """Size of the simulated panel; items are dealt round-robin."""
    labels_per_item: int = setting(1, ge=1)
    """How many annotators rank each item (> 1 gives inter-annotator agreement and repeated labels)."""
    flip_prob: float = setting(0.25, ge=0, le=1)
    """Each annotator swaps each adjacent pair of its ranking with this probability (AlpacaFarm: 0.25)."""
    seed: int = setting(0, ge=0)
    """Sampling and panel seed."""
    online: bool = True
    """Step C with GRPO / RLOO: the panel also ranks every group of the policy's answers and the reward model
    goes on learning from those rankings during RL (iterated online RLHF, `rlhfkit.rewards.online`); it is
    saved as rl/reward_model, which the evaluation then uses. The panel is this stage's (gold, annotators,
    flip_prob); the update's own settings are `rl.grpo.online_feedback` (lr, micro_batch). PPO has no
    groups: its reward model stays frozen."""


@dataclass
class RLSection:
    """Step C: which algorithm, and its settings (policy, reward and output are set by the pipeline)."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "grpo"
    """Critic-free GRPO (default) or RLOO, or PPO with a value model. GRPO is the default because its policy
    wins more often with the same reward model on the bundled data (bench/RESULTS.md)."""
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(
            rollout_batch=16,
            ppo_epochs=2,
            kl_coef=0.05,
            lam=1.0,
            sample_every=5,
            train=TrainConfig(lr=8e-6, max_steps=12, scheduler="constant", save_every=4),
        )
    )
    """PPO settings. lam = 1: in a run of a dozen iterations the critic is still poor, and with lambda 0.95
    the final score reaches the first of ~50 answer tokens weighted by 0.95^50 = 0.08; Monte-Carlo returns
    minus the value baseline carry it to every token."""
    grpo: GRPOConfig = field(
        default_factory=lambda: GRPOConfig(
            prompts_per_step=8,
            num_generations=4,
            beta=0.04,
            no_eos_score=-1.0,
            sample_every=5,
            sampling=SamplingConfig(temperature=0.5),
            train=TrainConfig(lr=1e-5, max_steps=12, scheduler="constant", save_every=4),
        )
    )
    """GRPO / RLOO settings (`advantage` is set from `algorithm`). T 0.5 like the feedback answers, so the
    reward model scores answers like the ones it learned from; lr 1e-5, because half of it hardly moves the
    policy in 12 iterations and twice it makes some seeds loop (bench/RESULTS.md)."""


@dataclass
class PipelineConfig:
    """Settings of `rlhfkit pipeline`; each section is the config of its stage."""

    model: str = DEFAULT_MODEL
    """The pretrained model step A starts from."""
    output: str = "runs/pipeline"
    """Run directory (one sub-directory per stage)."""
    seed: int = setting(0, ge=0)
    """Seed of every stage (data order, sampling, the annotator panel, evaluation samples); set into each
    section by the pipeline. `rlhfkit pipeline --seeds N` runs seeds 0..N-1."""
    max_new_tokens: int = setting(64, ge=1)
    """Longest answer everywhere: feedback sampling, RL and evaluation (so the reward model sees answers
    like the ones it will score, and the evaluation cuts them where training did)."""
    gold: str = "default"
    """The simulated people's preference: "default" (rlhfkit.rewards.panel.gold_score) or module:function
    (prompt, answer) -> float. Labels the feedback and judges the evaluation; never a training reward."""
    sft: SFTConfig = field(
        default_factory=lambda: SFTConfig(train=TrainConfig(lr=2e-5, batch_size=8, epochs=1.0, save_every=10))
    )
    """Step A settings (model, output: set by the pipeline)."""
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    """Simulated feedback settings."""
    rm: RMConfig = field(
        default_factory=lambda: RMConfig(
            normalize="shift_scale", train=TrainConfig(lr=3e-5, batch_size=8, epochs=1.0, save_every=10)
        )
    )
    """Step B settings (model, data, output: set by the pipeline). lr 3e-5: 96 rankings make only 12 steps,
    and at a third of it a reward model may still order finished answers at chance (bench/RESULTS.md)."""
    rl: RLSection = field(default_factory=RLSection)
    """Step C settings (policy, reward, gold, output, `sampling.max_new_tokens`: set by the pipeline)."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(policy="", reference="", batch_size=32))
    """Evaluation settings (policy, reference, reward, gold, output, max_new_tokens: set by the pipeline)."""
    keep_checkpoints: bool = False
    """Keep each training stage's checkpoints/ once the stage is done (they only serve to resume it; the
    stage's model is saved beside them). Off: 10-17 GB less per run of the default model, as RL checkpoints
    hold the policy, the online reward model and both optimizers' moments."""


# The --quick preset: the same chain on a tiny random model with small sizes (applied before --set).
QUICK = [
    "model=tiny-llama",
    "output=runs/pipeline-quick",
    "max_new_tokens=16",
    "sft.train.max_steps=6",
    "sft.train.save_every=0",
    "feedback.num_prompts=24",
    "feedback.k=3",
    "rm.train.max_steps=6",
    "rm.train.save_every=0",
    "rm.calibration_samples=64",
    "rl.ppo.rollout_batch=8",
    "rl.ppo.train.max_steps=3",
    "rl.ppo.train.lr=1e-4",
    "rl.ppo.train.save_every=0",
    "rl.grpo.prompts_per_step=4",
    "rl.grpo.train.max_steps=3",
    "rl.grpo.train.lr=1e-4",
    "rl.grpo.train.save_every=0",
    "eval.limit=16",
]


# ---------------------------------------------------------------------------------------- feedback
def collect_feedback(
    cfg: FeedbackConfig, policy_dir: str, out_dir: Path, gold: Callable[[str, str], float]
) -> dict:
    """Sample K answers per prompt with the policy, have the panel rank them; write rankings.jsonl."""
    import torch

    from rlhfkit.data.encoding import chat_prompt_text
    from rlhfkit.data.records import load_prompts, resolve_data_path
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.rewards.panel import gold_ranks, make_panel
    from rlhfkit.rollout import RolloutEngine

    records = load_prompts(resolve_data_path(cfg.prompts))[: cfg.num_prompts]
    engine = RolloutEngine(*load_causal_lm(policy_dir))
    ids = engine.encode_prompts(records, cfg.sampling.max_new_tokens)
    rows = [i for i in range(len(records)) for _ in range(cfg.k)]
    answers = engine.sample_texts(
        [ids[i] for i in rows], cfg.sampling,
        torch.Generator().manual_seed(cfg.seed), cfg.batch_size, "feedback: sampling",
    ).texts  # fmt: skip
    panel = make_panel(cfg.annotators, cfg.flip_prob, cfg.seed)
    lines, skipped, agree, compared, gold_means = [], 0, [0, 0], [0, 0], []
    for p, rec in enumerate(records):
        text = chat_prompt_text(rec.prompt)
        chat = isinstance(rec.prompt, list)  # answers take the prompt's form (the data format requires it)
        unique = list(dict.fromkeys(a for a in answers[p * cfg.k : (p + 1) * cfg.k] if a))
        scores = [gold(text, a) for a in unique]
        gold_means += scores
        levels = gold_ranks(scores)
        if len(unique) < 2 or len(set(levels)) < 2:  # nothing to rank
            skipped += 1
            continue
        labels: list[list[int]] = []
        for n in range(cfg.labels_per_item):
            annotator = panel[(p * cfg.labels_per_item + n) % len(panel)]
            ranks = annotator.rank(scores)
            a, c = pair_agreement(ranks, levels)
            agree[0], compared[0] = agree[0] + a, compared[0] + c
            for other in labels:
                a, c = pair_agreement(ranks, other)
                agree[1], compared[1] = agree[1] + a, compared[1] + c
            labels.append(ranks)
            if len(set(ranks)) < 2:
                continue
            completions = [[{"role": "assistant", "content": a}] for a in unique] if chat else unique
            row = {"prompt": rec.prompt, "completions": completions, "ranking": ranking_json(ranks),
                   "annotator": annotator.name, "gold": [round(s, 4) for s in scores]}  # fmt: skip
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    if not lines:
        raise ConfigError("feedback: no prompt got at least two answers the annotators could tell apart")
    write_atomic(out_dir / "rankings.jsonl", "".join(lines))
    stats = {
        "items": len(lines),
        "prompts_skipped": skipped,
        "answers": len(answers),
        "mean_answer_gold": sum(gold_means) / max(len(gold_means), 1),
        "label_agreement_with_gold": agree[0] / max(compared[0], 1),
        "inter_annotator_agreement": agree[1] / compared[1] if compared[1] else None,
    }
    write_atomic(out_dir / "feedback.json", json.dumps(stats, indent=2))
    return stats


# ---------------------------------------------------------------------------------------- stages
class StagedRun:
    """Named stages run in order, each a method `stage_<name>` writing into OUTPUT/<name> (the last, "report",
    into OUTPUT itself). A stage that finished is skipped when the command runs again (the report is always
    rebuilt); an interrupted one resumes from its last checkpoint. OUTPUT/pipeline.json records each finished
    stage's status and seconds, `config.yaml` the settings (`config.claim_run_dir`: other settings in the
    same OUTPUT are refused). Between stages, the memory the last one freed goes back to the kernel
    (`allocator.release_freed_memory`). `rlhfkit pipeline` and `rlhfkit pipeline --env`
    (`rlhfkit.agent_pipeline`) are two such runs."""

    stages: tuple[str, ...] = STAGES

    def __init__(self, settings: Any, output: str) -> None:
        self.settings = settings  # a config dataclass with `keep_checkpoints`
        self.out = Path(output)
        self.dirs = {name: self.out / name for name in self.stages if name != "report"}
        self.state_path = self.out / "pipeline.json"

    def check(self) -> None:
        """Refuse bad settings before anything is written."""

    def first_state(self) -> dict[str, Any]:
        """What pipeline.json holds besides the stages (the run's model, ...)."""
        return {}

    def load_state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        return {**self.first_state(), "stages": {}}

    def run(self) -> dict[str, Any]:
        self.check()
        claim_run_dir(self.settings, self.out)
        state = self.load_state()
        for name in self.stages:
            done = state["stages"].get(name, {}).get("status") == "done"
            if done and name != "report":
                console.print(
                    f"[bold]pipeline[/]: {name} already done ({state['stages'][name]['seconds']:.0f} s)"
                )
                continue
            console.rule(f"[bold]pipeline: {name}")
            t0 = time.perf_counter()
            previous = state["stages"].get(name, {}).get("seconds", 0.0) if not done else 0.0
            getattr(self, f"stage_{name}")()
            release_freed_memory()  # the stage's models: gone before the next stage loads its own
            seconds = previous + time.perf_counter() - t0
            state["stages"][name] = {"status": "done", "seconds": round(seconds, 1)}
            state["total_seconds"] = round(sum(s["seconds"] for s in state["stages"].values()), 1)
            write_atomic(self.state_path, json.dumps(state, indent=2))
            checkpoints = self.dirs[name] / "checkpoints" if name in self.dirs else None
            if checkpoints is not None and checkpoints.is_dir() and not self.settings.keep_checkpoints:
                shutil.rmtree(checkpoints)  # after the stage is recorded done: it is never resumed again
        return state


# ---------------------------------------------------------------------------------------- pipeline
class Pipeline(StagedRun):
    def __init__(self, cfg: PipelineConfig) -> None:
        super().__init__(cfg, cfg.output)
        self.cfg = cfg

    # -- stage configs: the pipeline wires the paths; everything else comes from the sections
    def _train(self, train: TrainConfig) -> TrainConfig:
        return dataclasses.replace(train, seed=self.cfg.seed)

    def feedback_config(self) -> FeedbackConfig:
        sampling = dataclasses.replace(self.cfg.feedback.sampling, max_new_tokens=self.cfg.max_new_tokens)
        return dataclasses.replace(self.cfg.feedback, sampling=sampling, seed=self.cfg.seed)

    def sft_config(self) -> SFTConfig:
        return dataclasses.replace(self.cfg.sft, model=self.cfg.model, output=str(self.dirs["sft"]),
                                   train=self._train(self.cfg.sft.train))  # fmt: skip

    def rm_config(self) -> RMConfig:
        data = dataclasses.replace(self.cfg.rm.data, path=str(self.dirs["feedback"] / "rankings.jsonl"))
        return dataclasses.replace(
            self.cfg.rm, model=str(self.dirs["sft"]), data=data, output=str(self.dirs["rm"]),
            train=self._train(self.cfg.rm.train),
        )  # fmt: skip

    def rl_config(self) -> PPOConfig | GRPOConfig:
        section = self.cfg.rl
        cfg = section.ppo if section.algorithm == "ppo" else section.grpo
        sampling = dataclasses.replace(cfg.sampling, max_new_tokens=self.cfg.max_new_tokens)
        wiring: dict[str, Any] = {"policy": str(self.dirs["sft"]), "reward": [str(self.dirs["rm"])],
                                  "reward_fn": [], "gold": self.cfg.gold, "output": str(self.dirs["rl"]),
                                  "sampling": sampling, "train": self._train(cfg.train)}  # fmt: skip
        if section.algorithm == "ppo":
            return dataclasses.replace(section.ppo, **wiring)
        online = self.online_feedback()
        return dataclasses.replace(
            section.grpo, advantage=section.algorithm, online_feedback=online, **wiring
        )

    def online_feedback(self) -> OnlineFeedbackConfig:
        fb = self.cfg.feedback
        if not fb.online or self.cfg.rl.algorithm == "ppo":
            return OnlineFeedbackConfig()
        # the panel is the feedback stage's; the update's own settings (lr, micro_batch) are rl.grpo's
        return dataclasses.replace(
            self.cfg.rl.grpo.online_feedback,
            labeler=self.cfg.gold,
            annotators=fb.annotators,
            flip_prob=fb.flip_prob,
        )

    def final_reward_model(self) -> Path:
        """The reward model step C ended with: the one it went on training with online feedback."""
        online = self.dirs["rl"] / ONLINE_RM_DIR
        return online if self.online_feedback().labeler and online.is_dir() else self.dirs["rm"]

    def eval_config(self) -> EvalConfig:
        return dataclasses.replace(
            self.cfg.eval, policy=str(self.dirs["rl"]), reference=str(self.dirs["sft"]),
            reward=str(self.final_reward_model()), gold=self.cfg.gold, output=str(self.dirs["eval"]),
            max_new_tokens=self.cfg.max_new_tokens,  # answers cut where training cut them
            seed=self.cfg.seed,
        )  # fmt: skip

    # -- stages
    def stage_sft(self) -> None:
        from rlhfkit.trainers.sft import run_sft

        run_sft(self.sft_config())

    def stage_feedback(self) -> None:
        from rlhfkit.rewards.panel import load_gold

        stats = collect_feedback(
            self.feedback_config(), str(self.dirs["sft"]), self.dirs["feedback"], load_gold(self.cfg.gold)
        )
        console.print(
            f"feedback: {stats['items']} ranked items; labels agree with the gold preference on "
            f"{stats['label_agreement_with_gold']:.1%} of pairs"
        )

    def stage_rm(self) -> None:
        from rlhfkit.trainers.rm import run_rm

        run_rm(self.rm_config())

    def stage_rl(self) -> None:
        cfg = self.rl_config()
        if self.cfg.feedback.online and self.cfg.rl.algorithm == "ppo":
            console.print(
                "feedback.online: PPO has no groups of answers to rank; the reward model stays frozen"
            )
        if isinstance(cfg, PPOConfig):
            from rlhfkit.trainers.ppo import run_ppo

            run_ppo(cfg)
        else:
            from rlhfkit.trainers.grpo import run_grpo

            run_grpo(cfg)

    def stage_eval(self) -> None:
        from rlhfkit.evaluation.evaluate import run_eval

        run_eval(self.eval_config())

    def stage_report(self) -> None:
        from rlhfkit.evaluation.report import build_report

        path = build_report(self.out)
        console.print(f"report: {path}")

    # -- orchestration
    def check(self) -> None:
        from rlhfkit.rewards.panel import load_gold

        load_gold(self.cfg.gold)  # a wrong gold is an error now, not after the SFT stage

    def first_state(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "algorithm": self.cfg.rl.algorithm, "gold": self.cfg.gold}


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    return Pipeline(cfg).run()


def run_seeds(cfg: PipelineConfig, seeds: int) -> dict[str, Any]:
    """The whole pipeline with seeds 0..seeds-1, each in OUTPUT/seed-N (each resumable on its own), then
    OUTPUT/seeds.json: every seed's win rate with its interval, KL, reward-model accuracy and minutes, and
    the mean and standard deviation of the win rate over seeds."""
    import statistics

    out, rows = Path(cfg.output), []
    for seed in range(seeds):
        console.rule(f"[bold]pipeline: seed {seed} of {seeds}")
        run_dir = out / f"seed-{seed}"
        state = run_pipeline(dataclasses.replace(cfg, seed=seed, output=str(run_dir)))
        ev = json.loads((run_dir / "eval" / "eval.json").read_text(encoding="utf-8"))
        wr = ev["win_rate"]
        rows.append({"seed": seed, "win_rate": wr["rate"], "low": wr["low"], "high": wr["high"],
                     "kl": ev["kl"]["mean"], "rm_accuracy": (ev.get("rm_accuracy") or {}).get("accuracy"),
                     "minutes": state["total_seconds"] / 60})  # fmt: skip
    rates = [r["win_rate"] for r in rows]
    summary = {"seeds": rows, "mean_win_rate": statistics.fmean(rates),
               "sd_win_rate": statistics.stdev(rates) if len(rates) > 1 else 0.0}  # fmt: skip
    write_atomic(out / "seeds.json", json.dumps(summary, indent=2))
    for r in rows:
        console.print(f"seed {r['seed']}: win rate {r['win_rate']:.1%} [{r['low']:.1%}, {r['high']:.1%}], "
                      f"KL {r['kl']:.2f}, {r['minutes']:.1f} min")  # fmt: skip
    console.print(f"mean win rate {summary['mean_win_rate']:.1%} (sd {summary['sd_win_rate']:.1%})")
    return summary
