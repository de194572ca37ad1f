"""TRL side of the side-by-side bench: one TRL trainer, `--warmup` + `--steps` optimizer steps, then JSON.

    bench/.venv-trl/bin/python bench/workers/trl_worker.py --trainer sft --steps 4 --warmup 1 \
        --model ~/.cache/rlhfkit/models/smollm2-135m-instruct --out /tmp/sft.json

Runs in TRL's own virtual environment (bench/.venv-trl: TRL 1.16.0; bench/.venv-trl-ppo: TRL 1.12.0, the
last release with PPO, in `trl.experimental.ppo`), never with rlhfkit installed. The settings are those of
shared/ANCHORS.md and `common.SETTINGS`: float32 (bf16 and fp16 off; TRL's configs default to bf16),
activation checkpointing off (TRL's default is on), no eval, no saving, no logging backends, 2 threads.
Everything else is TRL's default, including its optimizer and the metrics it computes every step.

A `TrainerCallback` times each optimizer step (on_step_begin -> on_step_end; TRL's PPO loop has no
on_step_begin, so there a step runs from one on_step_end to the next); the inputs of `compute_loss`
(for PPO: the sequences `batch_generation` returns) give the token statistics the FLOP counts need.
GRPO and PPO generate exactly `completion_length` tokens per answer (`min_new_tokens`; PPO without a stop
token does so already), as the rlhfkit side does.
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
from common import (
    SETTINGS,
    StepRecorder,
    length_reward,
    read_jsonl,
    rows_of,
    sequence_stats,
    trie_tokens,
    worker_args,
)

S = SETTINGS


def common_args(out: str, total: int, lr: float, batch_size: int) -> dict[str, Any]:
    """TrainingArguments shared by every TRL config here."""
    return {
        "output_dir": out,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": total,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "seed": 0,
        "bf16": False,
        "fp16": False,
        "activation_checkpointing": False,
        "use_cpu": True,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def dataset(path: str) -> Any:
    from datasets import Dataset

    return Dataset.from_list(read_jsonl(path))


def timer(rec: StepRecorder) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds of each optimizer step, from on_step_begin (or the previous step's end) to on_step_end."""

        def __init__(self) -> None:
            self.t0: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            rec.end_step(now - self.t0)
            self.t0 = now  # PPO calls no on_step_begin: its next step starts here

    return StepTimer()


def tap_loss(trainer: Any, count: Any) -> None:
    """Call `count(inputs)` on every batch `compute_loss` receives (after GRPO's generation)."""
    original = trainer.compute_loss

    def compute_loss(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        count(inputs)
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss


def supervised_counter(rec: StepRecorder, logits_from: str | None) -> Any:
    def count(inputs: dict[str, Any]) -> None:
        real, padded, sum_sq = sequence_stats(inputs["attention_mask"])
        if logits_from == "labels":  # SFT: positions with a label (completion only)
            logit_tokens = int((inputs["labels"][:, 1:] != -100).sum())
        elif logits_from == "completion_mask":  # DPO: the answer tokens
            logit_tokens = int(inputs["completion_mask"].sum())
        else:
            logit_tokens = 0
        trie = trie_tokens(rows_of(inputs["input_ids"], inputs["attention_mask"]))
        rec.add(
            real_tokens=real, padded_tokens=padded, sum_sq=sum_sq, logit_tokens=logit_tokens, trie_tokens=trie
        )

    return count


def build_sft(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **common_args(out, total, S.sft_lr, S.batch_size),
        max_length=args.max_length,
        completion_only_loss=True,
        packing=False,
        model_init_kwargs={"dtype": torch.float32},
    )
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=dataset(f"{args.data_dir}/sft.jsonl"))
    tap_loss(trainer, supervised_counter(rec, "labels"))
    return trainer


def build_rm(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(
        **common_args(out, total, S.rm_lr, S.batch_size),
        max_length=args.max_length,
        model_init_kwargs={"dtype": torch.float32},
    )
    data = dataset(f"{args.data_dir}/preference.jsonl")
    trainer = RewardTrainer(model=args.model, args=config, train_dataset=data)
    tap_loss(trainer, supervised_counter(rec, None))
    return trainer


def build_dpo(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from trl import DPOConfig, DPOTrainer

    # no ref_model given and no peft: TRL loads a separate frozen copy; no precompute (the anchor's run)
    config = DPOConfig(
        **common_args(out, total, S.dpo_lr, S.batch_size),
        max_length=args.max_length,
        beta=S.dpo_beta,
        precompute_ref_log_probs=False,
        model_init_kwargs={"dtype": torch.float32},
    )
    data = dataset(f"{args.data_dir}/preference.jsonl")
    trainer = DPOTrainer(model=args.model, args=config, train_dataset=data)
    tap_loss(trainer, supervised_counter(rec, "completion_mask"))
    return trainer


def build_grpo(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    rows = S.batch_size * S.num_generations  # one generation batch = one optimizer step
    config = GRPOConfig(
        **common_args(out, total, S.rl_lr, rows),
        num_generations=S.num_generations,
        max_completion_length=S.completion_length,
        temperature=S.grpo_temperature,
        beta=S.grpo_beta,
        loss_type="dapo",
        steps_per_generation=1,
        generation_kwargs={"min_new_tokens": S.completion_length},
        model_init_kwargs={"dtype": torch.float32},
    )
    data = dataset(f"{args.data_dir}/grpo_prompts.jsonl")
    trainer = GRPOTrainer(model=args.model, reward_funcs=[length_reward], args=config, train_dataset=data)

    def count(inputs: dict[str, Any]) -> None:
        prompt, completion = inputs["prompt_mask"], inputs["completion_mask"]
        mask = torch.cat([prompt, completion.to(prompt.dtype)], dim=1)  # (B, P+T)
        real, padded, sum_sq = sequence_stats(mask)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (B, P+T)
        rec.add(
            real_tokens=real,
            padded_tokens=padded,
            sum_sq=sum_sq,
            logit_tokens=int(completion.sum()),
            rows=prompt.shape[0],
            prompt_tokens=int(prompt.sum()),
            unique_prompt_tokens=int(prompt.sum()) / S.num_generations,
            new_tokens=completion.shape[1],
            trie_tokens=trie_tokens(rows_of(ids, mask)),
        )

    tap_loss(trainer, count)
    return trainer


def build_ppo(args: Any, out: str, total: int, rec: StepRecorder) -> Any:
    """TRL 1.12's experimental PPO: policy, reference, and value and reward models (sequence classifiers
    with a new head) all from the same checkpoint, as in the anchor; no stop token, so every answer has
    `response_length` tokens."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    causal = [AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32) for _ in range(2)]
    heads = [
        AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
        for _ in range(2)
    ]
    prompts = [row["prompt"] for row in read_jsonl(f"{args.data_dir}/grpo_prompts.jsonl")]
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
    ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": ids})
    config = PPOConfig(
        **common_args(out, total, S.rl_lr, S.ppo_rollouts),
        num_ppo_epochs=S.ppo_epochs,
        num_mini_batches=1,
        total_episodes=total * S.ppo_rollouts,
        local_rollout_forward_batch_size=S.ppo_rollouts,
        response_length=S.completion_length,
        temperature=S.ppo_temperature,
        kl_coef=S.ppo_kl_coef,
        stop_token=None,
        num_sample_generations=0,
    )
    original = module.batch_generation

    def batch_generation(model: Any, queries: torch.Tensor, *a: Any, **k: Any) -> Any:
        query_responses, logits = original(model, queries, *a, **k)
        prompt = queries != tokenizer.pad_token_id  # (B, P)
        new = query_responses.shape[1] - queries.shape[1]
        mask = torch.cat([prompt, torch.ones(len(queries), new, dtype=torch.bool)], dim=1)  # (B, P+T)
        real, padded, sum_sq = sequence_stats(mask.long())
        rec.add(
            real_tokens=real,
            padded_tokens=padded,
            sum_sq=sum_sq,
            logit_tokens=len(queries) * new,
            rows=len(queries),
            prompt_tokens=int(prompt.sum()),
            unique_prompt_tokens=int(prompt.sum()),
            new_tokens=new,
            epochs=S.ppo_epochs,
            trie_tokens=trie_tokens(rows_of(query_responses, mask)),
        )
        return query_responses, logits

    module.batch_generation = batch_generation
    return PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=causal[0],
        ref_model=causal[1],
        reward_model=heads[0],
        value_model=heads[1],
        train_dataset=data,
    )


def run_generate(args: Any, rec: StepRecorder) -> None:
    """Generation alone: plain `model.generate` (what TRL's GRPO calls without vLLM)."""
    from bench_rollout import chat_prompts, hf_generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = chat_prompts(tokenizer, f"{args.data_dir}/grpo_prompts.jsonl", S.generate_batch)
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (B, P) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, P)
    torch.manual_seed(0)
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        n = hf_generate(model, ids, mask, pad, S.completion_length)
        seconds = time.perf_counter() - t0
        rec.add(
            rows=len(prompts),
            prompt_tokens=sum(map(len, prompts)),
            new_tokens=S.completion_length,
            real_tokens=n,
        )
        rec.end_step(seconds)


BUILDERS = {"sft": build_sft, "rm": build_rm, "dpo": build_dpo, "grpo": build_grpo, "ppo": build_ppo}


def main() -> None:
    args = worker_args(__doc__.splitlines()[0])
    rec = StepRecorder()
    optimizer = "-"
    if args.trainer == "generate":
        run_generate(args, rec)
    else:
        with tempfile.TemporaryDirectory(prefix=f"bench-trl-{args.trainer}-") as out:
            trainer = BUILDERS[args.trainer](args, out, args.warmup + args.steps, rec)
            trainer.add_callback(timer(rec))
            optimizer = str(getattr(trainer.args.optim, "value", trainer.args.optim))
            trainer.train()
    versions = {p: metadata.version(p) for p in ("trl", "torch", "transformers")}
    rec.write(args.out, args.warmup, side="trl", trainer=args.trainer, versions=versions, optimizer=optimizer)


if __name__ == "__main__":
    main()
