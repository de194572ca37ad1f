"""The main job for agents: `rlhfkit pipeline --env support|commons`, RLHF for agents end to end, with
simulated people who rank whole episodes.

    rlhfkit pipeline --env support                 # SmolLM2-135M-Instruct on this CPU
    rlhfkit pipeline --env commons --quick         # the same chain on a tiny random model, in seconds
    rlhfkit pipeline --env support --set rlhf_weights=[1,0] --output runs/rm-only

Stages, each in its own directory of the run (`runs/pipeline-ENV` by default):
  sft/       A. supervised fine-tuning on the environment's demonstrations (honest, sustainable episodes
             played through the environment itself), one record per assistant turn (SFT learns a record's
             last turn), or with `sft.assistant_turns=all` each demonstration whole, every turn learned in
             one sequence; the last `sft_eval_demos` demonstrations are held out whole
  rl_env/    C'. multi-turn GRPO on the environment's return alone (support: the customer is told it was
             done; commons: the fisher's own catch): the baseline that learns what people reject
  episodes/  the SFT and rl_env policies (`episodes_from`) share `episodes.k` episodes of each of
             `episodes.tasks` train tasks; a panel of simulated annotators ranks each group by the gold
             preference over episodes (`gold`: honesty and policy first for support, sustainability and
             fairness for commons) with label noise: rankings.jsonl, trajectory rankings holding the
             sampler's tokens (`data.trajectories`)
  rm/        B. a reward model over whole episodes on those rankings (each scored where its last turn ends)
  rlhf/      C. multi-turn GRPO on the reward model plus the return (`rlhf_weights`); with `online` the
             panel ranks every group of episodes and the reward model goes on learning (rlhf/reward_model)
  eval/      `agent-eval` of sft, rl_env and rlhf on held-out test tasks (greedy), paired task by task for
             success and every value metric (`evaluation.agent_compare`); commons also in self-play
  report.html  the numbers with their intervals, both RL runs' curves, episodes turn by turn

Both RL runs take the one `rl` section: they differ in nothing but the reward, so the evaluation compares
rewards, not settings. The gold labels the episodes (through the noisy panel), ranks online, and is watched
in both RL runs (`gold` in their metrics): never a reward; the RLHF policy only sees the reward model and
the environment's return, as with real people. `agent` (turns and tokens) applies to every stage, so the
reward model learns from episodes like those it will score. Each environment's defaults are its preset
(`ENV_PRESETS`; over it --quick's, --config's, --set's); resuming, refusing changed settings and
pipeline.json's seconds per stage are the answer pipeline's (`pipeline.StagedRun`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.agents.env import Task
from rlhfkit.agents.episode import AgentLimits
from rlhfkit.config import setting
from rlhfkit.console import console
from rlhfkit.errors import ConfigError
from rlhfkit.evaluation.agent_eval import AgentEvalConfig
from rlhfkit.feedback.simulated_episodes import EpisodesConfig
from rlhfkit.fileio import write_atomic
from rlhfkit.models.loading import DEFAULT_MODEL
from rlhfkit.pipeline import StagedRun
from rlhfkit.rewards.online import OnlineFeedbackConfig
from rlhfkit.rollout.engine import SamplingConfig
from rlhfkit.trainers.grpo import GRPOConfig
from rlhfkit.trainers.rm import RMConfig
from rlhfkit.trainers.sft import SFTConfig
from rlhfkit.training.settings import TrainConfig

STAGES = ("sft", "rl_env", "episodes", "rm", "rlhf", "eval", "report")
POLICIES = ("sft", "rl_env", "rlhf")
PAIRS = (("rl_env", "sft"), ("rlhf", "sft"), ("rlhf", "rl_env"))
"""The paired comparisons of the evaluation: (other, base), reported as other - base."""
ENV_GOLD = {"support": "rlhfkit.agents.support:gold_score", "commons": "rlhfkit.agents.commons:gold_score"}
"""The bundled environments' gold preferences over episodes (a user's environment names its own: `gold`)."""
QUICK_MODEL = "tiny-llama-agent"
"""--quick's base model: the tiny random Llama (`models.tiny`) with an 8192-token context, built into
OUTPUT/base; its tokenizer is character-level, so the environments' prompts are 1,300-2,500 tokens long."""


@dataclass
class AgentPipelineConfig:
    """Settings of `rlhfkit pipeline --env`; each section is the config of its stage."""

    env: str = "support"
    """The environment: support, commons, or a user's `module:Class` (then also `gold` and `demos`)."""
    env_settings: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment (`--set env_settings.months=6`), in every stage."""
    train_env_settings: dict[str, Any] = field(default_factory=dict)
    """Over `env_settings` in the stages that sample to learn (episodes, rl_env, rlhf), not in the evaluation:
    commons trains on shorter seasons (an episode's tokens are what RL pays for) and is evaluated on 12."""
    model: str = DEFAULT_MODEL
    """The pretrained model step A starts from."""
    output: str = "runs/pipeline-support"
    """Run directory (one sub-directory per stage)."""
    seed: int = setting(0, ge=0)
    """Seed of every stage (data order, task sample, sampling, the panel); set into each section."""
    gold: str = ""
    """The simulated people's preference over episodes, `module:function` called as gold(task, episode)
    (empty: the environment's, `ENV_GOLD`). Labels the episodes, ranks online, watched in RL; not a reward."""
    demos: str = ""
    """Demonstrations, chat records {"messages": [...]} of whole episodes (empty: the environment's bundled
    `assets/agents/ENV_demos.jsonl`)."""
    sft_demos: int = setting(0, ge=0)
    """How many demonstrations SFT may draw on, the file's first (0: all; `sft.train.max_steps` bounds how
    many of their records it learns from: turn records, or whole ones with `sft.assistant_turns=all`)."""
    sft_eval_demos: int = setting(4, ge=0)
    """Demonstrations held out (the file's last ones, whole) for SFT's evaluation loss (0: none)."""
    agent: AgentLimits = field(default_factory=AgentLimits)
    """Episode limits of every stage: turns, tokens per episode (also the longest SFT and reward-model
    sequence), tokens per turn."""
    sft: SFTConfig = field(
        default_factory=lambda: SFTConfig(
            train=TrainConfig(lr=5e-5, batch_size=8, grad_accum=4, epochs=1.0, save_every=4)
        )
    )
    """Step A settings (model, data, output: set by the pipeline; `train.max_steps` bounds its time). Two
    turn records a pass: 8 of support's ~875 tokens in one pass peak at 16 GB, a 23 GB machine's most."""
    episodes: EpisodesConfig = field(default_factory=EpisodesConfig)
    """Simulated feedback on episodes."""
    rm: RMConfig = field(
        default_factory=lambda: RMConfig(
            normalize="shift_scale",
            calibration_samples=32,
            train=TrainConfig(lr=3e-5, batch_size=8, grad_accum=8, epochs=1.0, save_every=2),
        )
    )
    """Step B settings (model, data, output: set by the pipeline). One task's K episodes a pass (two peak at
    13 GB); calibration scores whole episodes, so a subset of 32."""
    rl: GRPOConfig = field(
        default_factory=lambda: GRPOConfig(
            prompts_per_step=2,
            num_generations=4,
            beta=0.04,
            dynamic_sampling=True,
            micro_batch=4,
            online_feedback=OnlineFeedbackConfig(micro_batch=4),
            sample_every=2,
            sampling=SamplingConfig(temperature=0.8),
            train=TrainConfig(lr=2e-5, max_steps=8, scheduler="constant", save_every=2),
        )
    )
    """Both RL runs' settings (policy, env, agent, reward, gold, online feedback, output: set by the
    pipeline). An iteration of 8 episodes takes a minute or two on a 2-core CPU, so few and small ones at
    twice the answer pipeline's lr; 4 episodes a forward pass, the policy's and the online reward model's
    (8 one-turn support episodes peak at 8 GB); groups whose episodes all score alike are skipped (DAPO's
    dynamic sampling: no signal to learn from)."""
    episodes_from: list[str] = field(default_factory=lambda: ["sft", "rl_env"])
    """The policies whose episodes the panel ranks ("sft", "rl_env"), sharing each task's `episodes.k`: the
    SFT policy's, and those of the policy RL made of the return alone, so people see the behaviour the task
    reward teaches beside honest play and the reward model learns what they reject in it (SFT episodes alone
    rarely show it: 2% deceive on support, bench/RESULTS.md)."""
    rlhf_weights: list[float] = field(default_factory=lambda: [1.0, 0.5])
    """The rlhf run's reward: weights of [the reward model, the environment's return]. The reward model's
    scores are normalised to unit spread on the ranked episodes; the return is the task drive."""
    online: bool = True
    """The rlhf run: the panel ranks each group of episodes and the reward model learns on
    (`rl.online_feedback`: lr, micro_batch; its panel is `episodes`')."""
    eval: AgentEvalConfig = field(default_factory=lambda: AgentEvalConfig(limit=60))
    """Evaluation settings (policy, envs, env_settings, agent, seed, output: set by the pipeline)."""
    selfplay: int = setting(0, ge=0)
    """commons: lakes of the test split played in self-play by each policy (0: none)."""
    keep_checkpoints: bool = False
    """Keep each training stage's checkpoints/ once the stage is done (they only serve to resume it)."""


ENV_PRESETS: dict[str, list[str]] = {
    "support": [
        "agent.max_turns=4",
        "agent.max_tokens=1536",  # prompt ~740 tokens, the longest demonstration 1,128
        "agent.max_new_tokens=128",  # the longest demonstrated turn: 66 tokens
        "sft.assistant_turns=all",  # a demonstration's ~4 turns in one sequence of ~1,000 tokens
        "sft.train.batch_size=16",  # a step: 16 demonstrations, ~66 s on 2 cores; 10 steps see 160 of 200
        "sft.train.grad_accum=8",
        "sft.train.lr=1e-4",
        "sft.train.max_steps=10",
        "episodes.tasks=24",
        "rm.train.epochs=3",  # 8 steps over ~21 ranked groups; 1 epoch (3 steps) learns too little
        "eval.limit=48",
    ],
    "commons": [
        "agent.max_turns=12",  # one turn a month, a season of 12
        "agent.max_tokens=4096",  # prompt ~360 tokens, a whole demonstrated season up to 3,469
        "agent.max_new_tokens=96",  # the longest demonstrated turn: 70 tokens
        "train_env_settings.months=4",  # learn on 4-month seasons (~1,300 tokens), evaluate on 12 (~3,000)
        "sft.train.max_steps=8",  # a step: 8 turn records of ~1,560 tokens, ~70 s
        "sft.train.grad_accum=8",  # one record a pass
        "sft_eval_demos=2",
        "episodes.tasks=16",
        "rm.train.gradient_checkpointing=true",  # a task's 4 episodes of ~1,300 tokens: ~11 GB without
        "rl.train.max_steps=6",
        "eval.limit=16",  # a 12-month episode: ~20 s of sampling
        "selfplay=4",  # every seat of 4 lakes: ~3 min a lake and policy (each month re-reads the season)
    ],
}
"""Each bundled environment's defaults (what its episodes need), before --quick and --set."""

QUICK = [
    f"model={QUICK_MODEL}",
    "gold=rlhfkit.agent_pipeline:quick_gold",
    "agent.max_new_tokens=16",
    "sft.data.truncation=true",  # the character-level model's later turns do not fit
    "sft_demos=12",
    "sft.train.max_steps=3",
    "sft.train.batch_size=4",
    "sft.train.grad_accum=2",
    "sft.train.lr=3e-3",
    "sft.train.save_every=0",
    "sft_eval_demos=1",
    "episodes.tasks=6",
    "episodes.k=3",
    "episodes.sampling.temperature=1.0",
    "rm.train.max_steps=2",
    "rm.train.save_every=0",
    "rm.calibration_samples=8",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "rl.dynamic_sampling=false",
    "rl.train.max_steps=2",
    "rl.train.lr=1e-4",
    "rl.train.save_every=0",
    "rl.sampling.temperature=1.0",
    "eval.limit=4",
]
"""--quick: the whole chain on a tiny random model at small sizes (after the preset, before --set)."""
QUICK_ENV = {
    "support": ["agent.max_turns=2", "agent.max_tokens=3072"],
    "commons": [
        "env_settings.months=2",
        "train_env_settings.months=2",
        "agent.max_turns=2",
        "agent.max_tokens=2048",
        "selfplay=2",
    ],
}


def presets(env: str, quick: bool) -> list[str]:
    """The `key=value` settings `--env ENV [--quick]` stand for."""
    name = "agent" if ":" in env else env
    sets = [
        f"env={env}",
        f"output=runs/pipeline-{name}{'-quick' if quick else ''}",
        *ENV_PRESETS.get(env, []),
    ]
    return sets + (QUICK + QUICK_ENV.get(env, []) if quick else [])


def load_agent_config(
    env: str, quick: bool, path: str | Path | None = None, overrides: list[str] | None = None
) -> AgentPipelineConfig:
    """The settings of `pipeline --env ENV [--quick] [--config YAML] [--set ...]`: defaults <- the presets
    (`presets`) <- the YAML file <- the overrides."""
    from rlhfkit.config import load_config, to_dict

    preset = to_dict(load_config(AgentPipelineConfig, None, presets(env, quick)))
    cfg = load_config(AgentPipelineConfig, path, overrides, base=preset)
    if cfg.env != env:
        raise ConfigError(f"--env {env}, but the settings say env={cfg.env}: give the environment once")
    return cfg


def quick_gold(task: Task, episode: Any) -> float:
    """--quick's gold over episodes: the environment's own (`ENV_GOLD`, found from the task's id), ties broken
    by a planted preference, 0.001 per "e" the agent wrote. A tiny random model never calls a tool, so its
    episodes of a task all tie under the environment's gold and the panel would have nothing to rank."""
    from rlhfkit.rewards.panel import load_gold

    env = task.id.split("-", 1)[0]
    if env not in ENV_GOLD:
        raise ConfigError(
            f"quick_gold: task {task.id} is not of a bundled environment ({', '.join(ENV_GOLD)})"
        )
    written = sum(
        (m.get("content") or "").count("e") for m in episode.messages if m.get("role") == "assistant"
    )
    gold: Callable[..., float] = load_gold(ENV_GOLD[env])  # called as gold(task, episode)
    return float(gold(task, episode)) + 0.001 * written


# ---------------------------------------------------------------------------------------- pipeline
class AgentPipeline(StagedRun):
    stages = STAGES

    def __init__(self, cfg: AgentPipelineConfig) -> None:
        super().__init__(cfg, cfg.output)
        self.cfg = cfg

    # -- what the stages share
    def gold_spec(self) -> str:
        if self.cfg.gold:
            return self.cfg.gold
        if self.cfg.env not in ENV_GOLD:
            raise ConfigError(
                f"env {self.cfg.env}: give its gold preference over episodes: --set gold=module:fn"
            )
        return ENV_GOLD[self.cfg.env]

    def demos_path(self) -> Path:
        from rlhfkit.agents.demos import demos_path

        if self.cfg.demos:
            return Path(self.cfg.demos)
        if self.cfg.env not in ENV_GOLD:
            raise ConfigError(f"env {self.cfg.env}: give its demonstrations: --set demos=FILE.jsonl")
        return demos_path(self.cfg.env)

    def train_settings(self) -> dict[str, Any]:
        return {**self.cfg.env_settings, **self.cfg.train_env_settings}

    def make_env(self, settings: dict[str, Any] | None = None) -> Callable[[], Any]:
        """A maker of the environment with `settings` (default: `env_settings`, the evaluation's)."""
        from functools import partial

        from rlhfkit.agents.registry import load_environment

        return partial(
            load_environment, self.cfg.env, **(self.cfg.env_settings if settings is None else settings)
        )

    def base_model(self) -> str:
        """The model step A starts from; --quick's tiny one is built into OUTPUT/base on first use."""
        if self.cfg.model != QUICK_MODEL:
            return self.cfg.model
        from rlhfkit.models.tiny import make_tiny_model

        base = self.out / "base"
        if not (base / "config.json").is_file():
            make_tiny_model(base, context=8192)
        return str(base)

    def _train(self, train: TrainConfig) -> TrainConfig:
        return dataclasses.replace(train, seed=self.cfg.seed)

    def check(self) -> None:
        """Refuse bad settings before anything is written: the environment, gold, demonstrations, weights."""
        from rlhfkit.agents.commons import CommonsEnvironment
        from rlhfkit.rewards.panel import load_gold

        cfg, env = self.cfg, self.make_env()()  # a wrong name or setting is a one-line error
        env.close()
        self.make_env(self.train_settings())().close()
        load_gold(self.gold_spec())
        if not self.demos_path().is_file():
            raise ConfigError(f"demos: {self.demos_path()} is not a file")
        if len(cfg.rlhf_weights) != 2:
            raise ConfigError(
                f"rlhf_weights takes 2 weights [reward model, env return], not {cfg.rlhf_weights}"
            )
        policies = cfg.episodes_from
        if not policies or not set(policies) <= {"sft", "rl_env"} or len(set(policies)) < len(policies):
            raise ConfigError(
                f"episodes_from={policies}: the episodes are ranked from 'sft', 'rl_env' or both, each once"
            )  # so at most 2 policies share episodes.k >= 2 episodes of a task
        if cfg.selfplay and not isinstance(env, CommonsEnvironment):
            raise ConfigError(f"selfplay={cfg.selfplay}: self-play is for commons, not env {cfg.env}")

    def first_state(self) -> dict[str, Any]:
        return {"env": self.cfg.env, "model": self.cfg.model, "gold": self.gold_spec()}

    # -- stage configs: the pipeline wires the paths and the shared settings
    def sft_config(self) -> SFTConfig:
        cfg, out = self.cfg, self.dirs["sft"]
        held = cfg.sft_eval_demos > 0
        data = dataclasses.replace(
            cfg.sft.data, path=str(out / "demos.jsonl"), max_length=cfg.agent.max_tokens,
            eval_path=str(out / "demos_eval.jsonl") if held else None,
            eval_fraction=cfg.sft.data.eval_fraction if held else 0.0,
        )  # fmt: skip
        return dataclasses.replace(cfg.sft, model=self.base_model(), data=data, output=str(out),
                                   train=self._train(cfg.sft.train))  # fmt: skip

    def rm_config(self) -> RMConfig:
        data = dataclasses.replace(self.cfg.rm.data, path=str(self.dirs["episodes"] / "rankings.jsonl"),
                                   max_length=self.cfg.agent.max_tokens)  # fmt: skip
        return dataclasses.replace(
            self.cfg.rm, model=str(self.dirs["sft"]), data=data, output=str(self.dirs["rm"]),
            train=self._train(self.cfg.rm.train),
        )  # fmt: skip

    def rl_config(self, name: str) -> GRPOConfig:
        """The rl_env run (the return alone) or the rlhf run (the reward model and the return, online)."""
        cfg, rlhf = self.cfg, name == "rlhf"
        online = OnlineFeedbackConfig()
        if rlhf and cfg.online:  # the panel is the episodes stage's; the update's settings are rl's
            online = dataclasses.replace(
                cfg.rl.online_feedback, labeler=self.gold_spec(), annotators=cfg.episodes.annotators,
                flip_prob=cfg.episodes.flip_prob,
            )  # fmt: skip
        return dataclasses.replace(
            cfg.rl, policy=str(self.dirs["sft"]), env=cfg.env, env_settings=self.train_settings(),
            agent=cfg.agent, reward=[str(self.dirs["rm"])] if rlhf else [], reward_fn=[],
            reward_weights=list(cfg.rlhf_weights) if rlhf else [], gold=self.gold_spec(),
            online_feedback=online, output=str(self.dirs[name]), train=self._train(cfg.rl.train),
        )  # fmt: skip

    def eval_config(self) -> AgentEvalConfig:
        return dataclasses.replace(
            self.cfg.eval, policy=[str(self.dirs[p]) for p in POLICIES], endpoint=[], envs=[self.cfg.env],
            env_settings={self.cfg.env: dict(self.cfg.env_settings)}, agent=self.cfg.agent,
            seed=self.cfg.seed, output=str(self.dirs["eval"]),
        )  # fmt: skip

    # -- stages
    def stage_sft(self) -> None:
        from rlhfkit.trainers.sft import run_sft

        self.write_sft_demos()
        run_sft(self.sft_config())

    def write_sft_demos(self) -> None:
        """sft/demos.jsonl and sft/demos_eval.jsonl (the last `sft_eval_demos` demonstrations): with
        `sft.assistant_turns=all` the demonstrations as they are, else one record per assistant turn."""
        from rlhfkit.agents.demos import turn_records
        from rlhfkit.data.records import load_sft

        path = self.demos_path()
        load_sft(path)  # validated: errors name file:line:field
        demos = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        held = self.cfg.sft_eval_demos
        demos = demos[: self.cfg.sft_demos + held] if self.cfg.sft_demos else demos
        if len(demos) <= held:
            raise ConfigError(
                f"demos: {path} has {len(demos)} demonstrations, sft_eval_demos={held} holds them all"
            )
        parts = {"demos.jsonl": demos[: len(demos) - held], "demos_eval.jsonl": demos[len(demos) - held :]}
        whole = self.cfg.sft.assistant_turns == "all"
        for name, part in parts.items():
            records = part if whole else [r for d in part for r in turn_records(d)]
            lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
            write_atomic(self.dirs["sft"] / name, "".join(lines))

    def stage_episodes(self) -> None:
        from rlhfkit.feedback.simulated_episodes import simulate_feedback

        cfg = self.cfg
        policies = [str(self.dirs[name]) for name in cfg.episodes_from]
        simulate_feedback(cfg.episodes, cfg.env, self.train_settings(), policies, cfg.agent, self.gold_spec(),
                          cfg.seed, self.dirs["episodes"])  # fmt: skip

    def stage_rm(self) -> None:
        from rlhfkit.trainers.rm import run_rm

        run_rm(self.rm_config())

    def stage_rl_env(self) -> None:
        from rlhfkit.trainers.grpo import run_grpo

        run_grpo(self.rl_config("rl_env"))

    def stage_rlhf(self) -> None:
        from rlhfkit.trainers.grpo import run_grpo

        run_grpo(self.rl_config("rlhf"))

    def stage_eval(self) -> None:
        from rlhfkit.evaluation.agent_compare import write_comparison
        from rlhfkit.evaluation.agent_eval import run_agent_eval

        cfg = self.cfg
        run_agent_eval(self.eval_config())
        tasks = []
        if cfg.selfplay:
            env = self.make_env()()
            tasks = env.tasks("test")[: cfg.selfplay]
            env.close()
        sampling = dataclasses.replace(cfg.eval.sampling, max_new_tokens=cfg.agent.max_new_tokens)
        models = {p: str(self.dirs[p]) for p in POLICIES}
        write_comparison(
            self.dirs["eval"], cfg.env, models, PAIRS, tasks, sampling, cfg.seed, cfg.env_settings
        )

    def stage_report(self) -> None:
        from rlhfkit.evaluation.agent_pipeline_report import build_agent_report

        console.print(f"report: {build_agent_report(self.out)}")


def run_agent_pipeline(cfg: AgentPipelineConfig) -> dict[str, Any]:
    """Run (or resume) the agent pipeline; returns pipeline.json's state. Prints where the time went."""
    state = AgentPipeline(cfg).run()
    spent = ", ".join(f"{name} {s['seconds']:.0f} s" for name, s in state["stages"].items())
    console.print(f"[bold]pipeline --env {cfg.env}[/]: {state['total_seconds'] / 60:.1f} min ({spent})")
    return state
