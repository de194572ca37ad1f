"""rlhfkit side of the side-by-side bench: one trainer, `--warmup` + `--steps` optimizer steps, then JSON.

    .venv/bin/python bench/workers/rlhfkit_worker.py --trainer sft --steps 4 --warmup 1 \
        --model ~/.cache/rlhfkit/models/smollm2-135m-instruct --out /tmp/sft.json

Runs the real trainers through `TrainLoop.run` (seeding, AdamW, clipping: everything a user's run does)
with the settings of `common.SETTINGS`; a loop callback takes each step's `step_seconds`, and the batches
the trainer builds (`collate`, or `sample` for RL) give the token statistics the FLOP counts need. What
differs from a user's run: no checkpoints, no final model save (`save_final` is skipped), no eval split,
and for GRPO / PPO EOS stopping is off so every answer has exactly `completion_length` tokens (as on the
TRL side). The driver, `bench/side_by_side.py`, runs this in a fresh process per measurement.
"""

from __future__ import annotations

import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import SETTINGS, StepRecorder, length_reward, rows_of, sequence_stats, trie_tokens, worker_args

S = SETTINGS


def tap(obj: Any, name: str, after: Any) -> None:
    """Replace the method `name` of the instance `obj` by one that also passes its result to `after`."""
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        after(out)
        return out

    setattr(obj, name, wrapper)


def train_base(steps: int, lr: float, batch_size: int) -> dict[str, Any]:
    return {
        "seed": 0,
        "lr": lr,
        "scheduler": "constant",
        "batch_size": batch_size,
        "max_steps": steps,
        "save_every": 0,
        "threads": torch.get_num_threads(),  # set by worker_args from --threads (default: SETTINGS.threads)
    }


def build_sft(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from rlhfkit.config import load_config
    from rlhfkit.trainers.sft import SFTConfig, SFTTrainer, prepare_sft

    base = {
        "model": args.model,
        "data": {
            "path": f"{args.data_dir}/sft.jsonl",
            "max_length": args.max_length,
            "truncation": True,
            "eval_fraction": 0.0,
        },
        "output": out,
        "train": train_base(total, S.sft_lr, S.batch_size),
    }
    cfg = load_config(SFTConfig, base=base)
    trainer = SFTTrainer(cfg, prepare_sft(cfg)[0], [])

    def count(batch: dict[str, Any]) -> None:
        real, padded, sum_sq = sequence_stats(batch["attention_mask"])
        labelled = int(batch["label_mask"][:, 1:].sum())
        trie = trie_tokens(rows_of(batch["input_ids"], batch["attention_mask"]))
        rec.add(
            real_tokens=real, padded_tokens=padded, sum_sq=sum_sq, logit_tokens=labelled, trie_tokens=trie
        )

    tap(trainer, "collate", count)
    return trainer


def build_rm(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from rlhfkit.config import load_config
    from rlhfkit.trainers.rm import RMConfig, RMTrainer, prepare_rm

    base = {
        "model": args.model,
        "data": {
            "path": f"{args.data_dir}/preference.jsonl",
            "max_length": args.max_length,
            "truncation": True,
            "eval_fraction": 0.0,
        },
        "output": out,
        "normalize": "none",
        "train": train_base(total, S.rm_lr, S.batch_size),
    }
    cfg = load_config(RMConfig, base=base)
    train, _, _ = prepare_rm(cfg)
    trainer = RMTrainer(cfg, train, [], [])

    tap(trainer, "collate", lambda batch: count_shared(rec, batch["batch"], logits=False))
    return trainer


def count_shared(rec: StepRecorder, shared: Any, logits: bool) -> None:
    """Token statistics of a `SharedPromptBatch` (RM, DPO): the plain rows it stands for, and what ran."""
    sequences = shared.sequences()
    lengths = [len(x) for x in sequences]
    u, p = shared.prompt_ids.shape
    rec.add(
        real_tokens=sum(lengths),
        padded_tokens=shared.prefix_ids.shape[1] + u * p + shared.answer_ids.numel(),
        sum_sq=sum(n * n for n in lengths),
        logit_tokens=int(shared.answer_mask.sum()) if logits else 0,
        processed_tokens=shared.tokens_processed,
        trie_tokens=trie_tokens(sequences),
    )


def build_dpo(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from rlhfkit.config import load_config
    from rlhfkit.trainers.dpo import DPOConfig, DPOTrainer, prepare_dpo

    base = {
        "policy": args.model,
        "data": {
            "path": f"{args.data_dir}/preference.jsonl",
            "max_length": args.max_length,
            "truncation": True,
            "eval_fraction": 0.0,
        },
        "output": out,
        "beta": S.dpo_beta,
        "train": train_base(total, S.dpo_lr, S.batch_size),
    }
    cfg = load_config(DPOConfig, base=base)
    trainer = DPOTrainer(cfg, prepare_dpo(cfg)[0], [])

    tap(trainer, "collate", lambda batch: count_shared(rec, batch["batch"], logits=True))
    # the reference log-probs are computed once for the whole data set, before the first step: time it
    # apart, so the driver can show it amortised over an epoch next to the step time
    if hasattr(trainer, "attach_reference"):
        original = trainer.attach_reference

        def timed() -> None:
            t0 = time.perf_counter()
            original()
            rec.extra["reference_seconds"] = time.perf_counter() - t0
            rec.extra["reference_pairs"] = len(trainer.train_examples)

        trainer.attach_reference = timed
    return trainer


def count_rollout(rec: StepRecorder, group: int, extra: dict[str, float]) -> Any:
    def count(samples: Any) -> None:
        r = samples.rollout
        mask = torch.cat([r.prompt_mask, r.completion_mask.to(r.prompt_mask.dtype)], dim=1)  # (B, P+T)
        real, padded, sum_sq = sequence_stats(mask)
        trie = trie_tokens(rows_of(torch.cat([r.prompt_ids, r.completion_ids], dim=1), mask))
        prompt = float(r.prompt_mask.sum())
        rec.add(
            real_tokens=real,
            padded_tokens=padded,
            sum_sq=sum_sq,
            logit_tokens=float(r.completion_mask.sum()),
            rows=mask.shape[0],
            prompt_tokens=prompt,
            unique_prompt_tokens=prompt / group,
            new_tokens=r.completion_ids.shape[1],
            processed_tokens=samples.shared.tokens_processed,
            trie_tokens=trie,
            **extra,
        )

    return count


def build_grpo(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from rlhfkit.config import load_config
    from rlhfkit.data import load_prompts
    from rlhfkit.rewards import function_scorer
    from rlhfkit.trainers.grpo import GRPOConfig, GRPOTrainer

    path = f"{args.data_dir}/grpo_prompts.jsonl"
    base = {
        "policy": args.model,
        "prompts": path,
        "output": out,
        "prompts_per_step": S.batch_size,
        "num_generations": S.num_generations,
        # every answer runs to completion_length tokens, as TRL's side does (min_new_tokens)
        "sampling": {
            "max_new_tokens": S.completion_length,
            "temperature": S.grpo_temperature,
            "stop_at_eos": False,
        },
        "beta": S.grpo_beta,
        "loss_type": "dapo",
        "sample_every": 0,
        "train": train_base(total, S.rl_lr, S.batch_size),
    }
    cfg = load_config(GRPOConfig, base=base)
    trainer = GRPOTrainer(cfg, load_prompts(path), function_scorer(length_reward))
    tap(trainer, "sample", count_rollout(rec, S.num_generations, {}))
    return trainer


def build_ppo(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from rlhfkit.prefix import SharedPromptBatch

    from rlhfkit.config import load_config
    from rlhfkit.data import load_prompts
    from rlhfkit.rewards import shared_sequence_rewards
    from rlhfkit.trainers.ppo import PPOConfig, PPOTrainer
    from rlhfkit.trainers.rm import build_reward_model

    path = f"{args.data_dir}/grpo_prompts.jsonl"
    base = {
        "policy": args.model,
        "value_model": args.model,
        "prompts": path,
        "output": out,
        "rollout_batch": S.ppo_rollouts,
        "ppo_epochs": S.ppo_epochs,
        "minibatches": 1,
        "sampling": {
            "max_new_tokens": S.completion_length,
            "temperature": S.ppo_temperature,
            "stop_at_eos": False,
        },
        "kl_coef": S.ppo_kl_coef,
        "no_eos_score": None,
        "sample_every": 0,
        "train": train_base(total, S.rl_lr, S.ppo_rollouts),
    }
    cfg = load_config(PPOConfig, base=base)
    # the reward model: the same checkpoint with a new one-output head, as on the TRL side
    reward_model, tokenizer = build_reward_model(args.model)
    reward_model.requires_grad_(False).eval()

    def score(prompts: Any, completions: Any, rollout: Any, records: Any) -> torch.Tensor:
        return shared_sequence_rewards(
            reward_model, SharedPromptBatch.from_rollout(rollout, tokenizer.pad_token_id)
        ).float()

    trainer = PPOTrainer(cfg, load_prompts(path), score)
    tap(trainer, "sample", count_rollout(rec, 1, {"epochs": S.ppo_epochs}))
    return trainer


def run_generate(args: Any, rec: StepRecorder) -> None:
    """Generation alone: the rollout engine on `generate_batch` prompts, `completion_length` tokens each."""
    from bench_rollout import chat_prompts

    from rlhfkit.models import load_causal_lm
    from rlhfkit.rollout import RolloutEngine, SamplingConfig

    model, tokenizer = load_causal_lm(args.model)
    model.eval()
    prompts = chat_prompts(tokenizer, f"{args.data_dir}/grpo_prompts.jsonl", S.generate_batch)
    engine = RolloutEngine(model, tokenizer)
    config = SamplingConfig(max_new_tokens=S.completion_length, temperature=1.0, stop_at_eos=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        rollout = engine.generate(prompts, config, generator)
        seconds = time.perf_counter() - t0
        rec.add(
            rows=len(prompts),
            prompt_tokens=sum(map(len, prompts)),
            new_tokens=S.completion_length,
            real_tokens=float(rollout.completion_mask.sum()),
        )
        rec.end_step(seconds)


BUILDERS = {"sft": build_sft, "rm": build_rm, "dpo": build_dpo, "grpo": build_grpo, "ppo": build_ppo}


def main() -> None:
    args = worker_args(__doc__.splitlines()[0])
    rec = StepRecorder()
    if args.trainer == "generate":
        run_generate(args, rec)
    else:
        with tempfile.TemporaryDirectory(prefix=f"bench-rlhfkit-{args.trainer}-") as out:
            trainer = BUILDERS[args.trainer](args, out, args.warmup + args.steps, rec)

            def on_step(loop: Any, metrics: dict[str, float]) -> None:
                # the phases of an RL step (seconds_rollout, seconds_scoring, seconds_training) go along
                rec.add(**{k: v for k, v in metrics.items() if k.startswith("seconds_")})
                rec.end_step(metrics["step_seconds"])

            trainer.callbacks.append(on_step)
            trainer.save_final = lambda: None  # the bench times steps; writing the model is not one
            trainer.run()
    versions = {p: metadata.version(p) for p in ("rlhfkit", "torch", "transformers")}
    rec.write(
        args.out,
        args.warmup,
        side="rlhfkit",
        trainer=args.trainer,
        versions=versions,
        optimizer="-" if args.trainer == "generate" else "torch.optim.AdamW (fused)",
    )


if __name__ == "__main__":
    main()
