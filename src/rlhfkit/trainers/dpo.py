"""Step C offline: Direct Preference Optimization (DPO) and its IPO / conservative variants.

    rlhfkit dpo --policy runs/sft --data preferences.jsonl --output runs/dpo

The policy pi is trained directly on preference pairs (x, y_w, y_l), with the frozen starting model as
the reference pi_ref (Rafailov et al. 2023, Eq. 7):

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    sigmoid: L = -log sigmoid(beta h)                                          (DPO)
    cDPO:    L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)     (Mitchell 2023, noisy labels)
    IPO:     L = (h - 1 / (2 beta))^2                                          (Azar et al. 2023, Eq. 17)

`losses.dpo_loss` holds the math; log pi(y|x) is the SUM of the answer tokens' log-probs (EOS included).
The implicit reward of an answer is beta * (log pi - log pi_ref); "accuracy" is the fraction of pairs
whose chosen answer has the strictly higher implicit reward (0 at step 0, where every reward is 0).

Where we depart from TRL's DPOTrainer and why:
- the reference log-probs are computed ONCE per dataset, before training, in one no-grad pass (TRL
  without `precompute_ref_log_probs` runs the reference model on every batch of every epoch). With LoRA
  the reference is the policy with its adapters disabled (no second model in memory); otherwise the
  reference is loaded, run, and freed before training. The values are cached in the output directory
  (`reference_logprobs.safetensors`) under a hash of the token ids of every answer (so of the data, the
  tokenizer, the chat template and max_length/truncation) and of the reference weights: a resumed or
  repeated run reuses them, any change recomputes them;
- chosen and rejected answers of a micro-batch run through one batched forward that computes their
  shared prompt once, and the prefix all prompts share (the chat template's system prompt) once
  (`rlhfkit.models.prefix`); answers are padded to the longest of them only, and pairs are grouped by length
  (as in SFT and the RM), so little compute goes into padding or repeated prompts;
- the output layer runs only on answer positions and the full (2B, T, V) logits are never materialised;
- rankings of K answers are expanded into all their K-choose-2 (better, worse) pairs, each one training
  pair (the margin field of a pair has no role in DPO and is ignored);
- IPO uses length-averaged log-probs (as TRL does; Azar et al. leave the choice open), sigmoid and cDPO
  use sums as in the DPO paper.

Shapes: B pairs in a micro-batch, S = 2B sequences (all chosen answers first, then all rejected),
T tokens, C hidden size, V vocabulary, N answer-token positions of a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import math
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from rlhfkit.config import setting, validate
from rlhfkit.console import console, progress
from rlhfkit.data.encoding import PreferenceExample, SequenceExample, load_preference_examples
from rlhfkit.data.records import DATA_RENAMED, DataSettings
from rlhfkit.device import resolve_runtime
from rlhfkit.fileio import write_atomic
from rlhfkit.losses import dpo_loss
from rlhfkit.models.loading import (
    DEFAULT_MODEL,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    save_model,
)
from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs
from rlhfkit.trainers.base import SupervisedTrainer
from rlhfkit.training.settings import StageConfig, TrainConfig, set_seed

CACHE_FILE = "reference_logprobs.safetensors"
CACHE_VERSION = 1  # bump when the meaning of the cached numbers changes


@dataclass
class DPOConfig(StageConfig):
    """Settings of `rlhfkit dpo`."""

    policy: str = DEFAULT_MODEL
    """Policy to optimise (normally the SFT model): registered name, directory or hub id."""
    reference: str | None = None
    """Frozen reference model (default: the starting policy); it must share the policy's tokenizer."""
    data: DataSettings = field(default_factory=DataSettings)
    """Preference pairs and/or rankings (`data.path`), held-out pairs, lengths."""
    output: str = "runs/dpo"
    """Output directory: the policy (transformers format), metrics, checkpoints, reference log-probs."""
    beta: float = setting(0.1, gt=0)
    """Strength of the implicit KL constraint to the reference (DPO's beta; TRL's default 0.1)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """"sigmoid": DPO (with `label_smoothing` > 0: conservative DPO); "ipo": IPO on mean log-probs."""
    label_smoothing: float = setting(0.0, ge=0, lt=0.5)
    """cDPO: the assumed probability that a preference label is flipped (0: plain DPO; sigmoid only)."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-6, batch_size=8, epochs=1.0, scheduler="linear")
    )
    """The shared training loop; `batch_size` counts pairs."""

    RENAMED: ClassVar[dict[str, str]] = DATA_RENAMED


@dataclass(frozen=True)
class DPOExample:
    """One (chosen, rejected) pair of prompt + answer token ids, with the reference's summed answer
    log-probs once the reference pass has filled them in."""

    chosen: SequenceExample
    rejected: SequenceExample
    ref_chosen: float = math.nan
    ref_rejected: float = math.nan

    @property
    def length(self) -> int:
        """The longer answer: the padded length this pair brings into a batch."""
        return max(len(self.chosen), len(self.rejected))


# ------------------------------------------------------------------------------------------ log-probs
def answer_logprobs(model: Any, batch: SharedPromptBatch) -> torch.Tensor:
    """log pi(answer | prompt) = sum over answer tokens t of log pi(y_t | x, y_<t), for each of the S rows:
    one shared-prompt forward (`prefix.completion_logprobs`: each pair's prompt once, the output layer only
    on answer positions, no (S, T, V) logits). Returns (S,)."""
    logprobs, _ = completion_logprobs(model, batch, entropy=False)  # (S, T), zero on padding
    return logprobs.sum(-1)


@torch.no_grad()
def reference_logprobs(
    model: Any, sequences: list[SequenceExample], pad_id: int, batch_size: int
) -> torch.Tensor:
    """Summed answer log-probs (S,) of every sequence under `model`, in length-sorted no-grad batches,
    with a progress bar (or a line per quarter when stderr is not a terminal)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = torch.zeros(len(sequences))  # (S,)
    t0, done, quarter = time.perf_counter(), 0, 0
    with progress() as bar:
        task = bar.add_task("dpo reference log-probs", total=len(sequences), status="")
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            out[index] = answer_logprobs(
                model, SharedPromptBatch.from_examples([sequences[i] for i in index], pad_id)
            ).cpu()
            done += len(index)
            bar.update(task, completed=done)
            if bar.disable and done * 4 >= (quarter + 1) * len(sequences):
                quarter = done * 4 // len(sequences)
                seconds = time.perf_counter() - t0
                console.print(f"dpo reference log-probs: {done}/{len(sequences)} answers ({seconds:.0f}s)")
    return out


# ------------------------------------------------------------------------------------------ the cache
def model_fingerprint(name_or_path: str) -> str:
    """sha256 of a model directory's config and weight files (a hub id stands for itself)."""
    path = Path(resolve_model(name_or_path))
    if not path.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for file in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for block in iter(functools.partial(fh.read, 1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_key(reference: str, splits: dict[str, list[DPOExample]], dtype: str = "float32") -> str:
    """Hash of everything the reference log-probs depend on: the reference weights, the precision it ran in,
    and the exact token ids of every answer in order (which capture the data, tokenizer, chat template,
    max_length, truncation)."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "reference": reference,
                                        "dtype": dtype}).encode())  # fmt: skip
    for name, examples in splits.items():
        digest.update(f"|{name}:{len(examples)}".encode())
        for ex in examples:
            for seq in (ex.chosen, ex.rejected):
                digest.update(array("q", [seq.answer_start, len(seq), *seq.input_ids]).tobytes())
    return digest.hexdigest()


def read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors if `path` exists and was written under `key`, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        if (fh.metadata() or {}).get("key") != key:
            return None
    return load_file(str(path))


def write_cache(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically (`fileio.write_atomic`): a crash never leaves a half-written cache."""
    from safetensors.torch import save

    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata={"key": key}))


# ------------------------------------------------------------------------------------------ trainer
class DPOTrainer(SupervisedTrainer[DPOExample]):
    name = "dpo"
    stage: DPOConfig

    def __init__(self, cfg: DPOConfig, train: list[DPOExample], evals: list[DPOExample]) -> None:
        set_seed(cfg.train.seed)
        self.runtime = resolve_runtime(cfg.train)
        model, tokenizer = load_causal_lm(
            cfg.policy, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code, runtime=self.runtime,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )  # fmt: skip
        super().__init__(cfg, model, tokenizer, train, evals)
        self._tb = None  # `run` opens it after `prepare_output`, which already logs the reference pass

    def example_length(self, example: DPOExample) -> int:
        return example.length

    # ---- reference log-probs, once per dataset -----------------------------------------------------
    def prepare_output(self) -> bool:
        """The output directory is checked (or created) first, then the reference log-probs are read from
        its cache or computed, before any training step or checkpoint is loaded."""
        if not super().prepare_output():
            return False
        self.attach_reference()
        return True

    def attach_reference(self) -> None:
        """Fill in `ref_chosen` / `ref_rejected` of every train and eval pair (cached, or one pass)."""
        t0 = time.perf_counter()
        splits = {"train": self.train_examples, "eval": self.eval_examples}
        reference = model_fingerprint(self.stage.reference or self.stage.policy)
        key = cache_key(reference, splits, self.reference_dtype())
        path = self.output_dir / CACHE_FILE
        cached = read_cache(path, key)
        stats: dict[str, Any] = {"cached": cached is not None}
        if cached is None and self.is_main:
            cached = self.compute_reference(splits)
            write_cache(path, key, cached)
        self.accelerator.wait_for_everyone()  # every process, cached or not: no mismatched barriers
        cached = cached if cached is not None else read_cache(path, key)
        assert cached is not None
        filled = {
            name: [dataclasses.replace(ex, ref_chosen=c, ref_rejected=r)
                   for ex, (c, r) in zip(examples, cached[name].tolist(), strict=True)]
            for name, examples in splits.items()
        }  # fmt: skip
        self.train_examples, self.eval_examples = filled["train"], filled["eval"]
        stats["seconds"] = time.perf_counter() - t0
        stats["pairs"] = len(self.train_examples) + len(self.eval_examples)
        console.print(f"[bold]dpo[/]: reference log-probs of {stats['pairs']} pairs "
                      f"{'read from' if stats['cached'] else 'computed and cached in'} {path} "
                      f"({stats['seconds']:.1f}s)")  # fmt: skip
        self.log("reference", stats)

    def reference_dtype(self) -> str:
        """How the reference runs: "float32", or "bfloat16" (bf16 weights, or the policy under autocast)."""
        return str(self.runtime.inference_dtype).removeprefix("torch.")

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[Any]:
        """The frozen reference: the policy with LoRA adapters disabled, or a model loaded for the pass
        (freed when the pass ends)."""
        own = self.stage.reference in (None, self.stage.policy)
        if self.stage.lora.enabled and own:
            with self.model.disable_adapter():
                yield self.model
            return
        reference, _ = load_causal_lm(
            self.stage.reference or self.stage.policy, trust_remote_code=self.stage.trust_remote_code,
            runtime=self.runtime, frozen=True,
        )  # fmt: skip
        try:
            yield reference
        finally:
            del reference
            gc.collect()

    def compute_reference(self, splits: dict[str, list[DPOExample]]) -> dict[str, torch.Tensor]:
        """One no-grad pass over the distinct answers of all splits -> {split: (n_pairs, 2)} summed
        log-probs (chosen, rejected) under the reference."""
        index: dict[tuple[int, tuple[int, ...]], int] = {}  # rankings repeat answers across their pairs
        for examples in splits.values():
            for ex in examples:
                for seq in (ex.chosen, ex.rejected):
                    index.setdefault((seq.answer_start, seq.input_ids), len(index))
        sequences = [SequenceExample(ids, start) for start, ids in index]
        size = max(1, 2 * self.cfg.batch_size // self.cfg.grad_accum)  # a training micro-batch's rows
        with self.reference_model() as reference, self.autocast():
            logps = reference_logprobs(reference, sequences, self.tokenizer.pad_token_id, size)  # (U,)
            del reference  # a loaded reference is then freed as the context exits, before training
        out = {}
        for name, examples in splits.items():
            rows = [index[(s.answer_start, s.input_ids)] for ex in examples for s in (ex.chosen, ex.rejected)]
            out[name] = logps[torch.tensor(rows, dtype=torch.long)].view(-1, 2)  # (n_pairs, 2)
        return out

    # ---- the loss ------------------------------------------------------------------------------------
    def collate(self, examples: list[DPOExample]) -> dict[str, Any]:
        """All chosen answers, then all rejected ones, as ONE batch of S = 2B rows sharing their prompts."""
        sequences = [ex.chosen for ex in examples] + [ex.rejected for ex in examples]
        shared = SharedPromptBatch.from_examples(sequences, self.tokenizer.pad_token_id)
        ref = [ex.ref_chosen for ex in examples] + [ex.ref_rejected for ex in examples]
        return {
            "batch": shared,
            "ref_logprobs": torch.tensor(ref),  # (S,)
            "answer_tokens": shared.answer_mask.sum(1),  # (S,)
            "num_items": len(examples),  # pairs
            "num_tokens": shared.tokens_processed,
        }

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs = answer_logprobs(model, batch["batch"])  # (S,)
        return self.pair_loss(logprobs, batch)

    def pair_loss(
        self, logprobs: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum over pairs of the DPO/IPO loss, metric sums) from the policy's summed log-probs (S,)."""
        ref_logprobs = batch["ref_logprobs"]  # (S,)
        if self.stage.loss_type == "ipo":  # mean log-prob per answer token, for the policy and the reference
            logprobs = logprobs / batch["answer_tokens"]  # (S,)
            ref_logprobs = ref_logprobs / batch["answer_tokens"]  # (S,)
        chosen, rejected = logprobs.chunk(2)  # (B,), (B,)
        ref_chosen, ref_rejected = ref_logprobs.chunk(2)  # (B,), (B,)
        mean, metrics = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=self.stage.beta,
            loss_type=self.stage.loss_type, label_smoothing=self.stage.label_smoothing,
        )  # fmt: skip
        n = batch["num_items"]
        sums = {
            "accuracy": metrics["rewards/accuracy"] * n,
            "margin": metrics["rewards/margin"] * n,
            "reward_chosen": metrics["rewards/chosen"] * n,
            "reward_rejected": metrics["rewards/rejected"] * n,
        }
        return mean * n, sums

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = super().train_step(step)
        metrics["pairs_per_s"] = self.cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        totals: dict[str, float] = {}
        for _, batch in self.eval_batches():
            loss_sum, sums = self.forward(self.loss, batch)
            for key, value in {"loss": loss_sum, **sums}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return {key: value / len(self.eval_examples) for key, value in totals.items()}

    def save_final(self) -> None:
        save_model(self.model, self.tokenizer, self.output_dir, self.final_state())


# ------------------------------------------------------------------------------------------ entry points
def preference_pairs(examples: list[PreferenceExample]) -> list[DPOExample]:
    """Every (better, worse) pair of each prompt's answers: a pair record gives one, a ranking of K
    answers up to K(K-1)/2 (tied answers form no pair)."""
    pairs = []
    for ex in examples:
        for i, better in enumerate(ex.answers):
            for j, worse in enumerate(ex.answers):
                if ex.ranks[i] < ex.ranks[j]:
                    pairs.append(DPOExample(better, worse))
    return pairs


def prepare_dpo(cfg: DPOConfig) -> tuple[list[DPOExample], list[DPOExample]]:
    """Read, validate and tokenise all data (nothing is written anywhere until this succeeds)."""
    validate(cfg)  # before the data is read
    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    # the reward model's encoder: same validation (length, identical answers) and messages
    train_examples, eval_examples = load_preference_examples(cfg.data, tokenizer, cfg.train.seed, "dpo")
    train, evals = preference_pairs(train_examples), preference_pairs(eval_examples)
    return train, evals


def run_dpo(cfg: DPOConfig) -> dict[str, float]:
    train, evals = prepare_dpo(cfg)
    return DPOTrainer(cfg, train, evals).run()
