"""Step A: supervised fine-tuning on demonstrations.

    rlhfkit sft --model smollm2-135m-instruct --data demos.jsonl --output runs/sft

Loss: mean cross-entropy over the answer tokens of the whole global batch (prompt tokens masked by
default; `completion_only_loss: false` trains on the prompt too). The EOS that ends every answer is a
label, so the model learns to stop; the pad token is distinct from EOS so it is never masked away.
A `{"messages": [...]}` record teaches its last assistant turn; with `assistant_turns: all` it is one
sequence whose every assistant turn is labelled (TRL's `assistant_only_loss`): for a causal model its
summed loss is that of one record per turn, each holding the conversation up to the turn, at the cost of
one pass over the conversation instead of a pass over each of its prefixes.

Where we depart from a plain `model(input_ids, labels=...)`:
- the output layer (576 x 49,152 for SmolLM2, ~20% of the FLOPs) runs only on the positions that have a
  label, not on prompt and padding positions, and the full (B, T, V) logits are never materialised;
- the cross-entropy is `losses.token_logprobs_entropy`: one (N, V) softmax buffer that the backward pass
  turns into the gradient in place (F.cross_entropy keeps a log-softmax and zero-fills a second buffer);
- batches are grouped by length (sorted within windows of `group_window` batches, then the batch order
  is shuffled), so almost no compute is spent on padding.

Shapes: B batch, T tokens, C hidden size, V vocabulary, N labelled positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch

from rlhfkit.data.encoding import SequenceExample, encode_answer, encode_conversation, pad
from rlhfkit.data.records import DATA_RENAMED, DataSettings, SFTRecord, load_sft
from rlhfkit.device import resolve_runtime
from rlhfkit.losses import token_logprobs_entropy
from rlhfkit.models.loading import (
    DEFAULT_MODEL,
    decoder_and_head,
    load_causal_lm,
    load_tokenizer,
    save_model,
)
from rlhfkit.trainers.base import SupervisedTrainer
from rlhfkit.training.settings import StageConfig, TrainConfig, set_seed


@dataclass
class SFTConfig(StageConfig):
    """Settings of `rlhfkit sft`."""

    model: str = DEFAULT_MODEL
    """Model to fine-tune: a registered name, a local directory or a hub id."""
    data: DataSettings = field(default_factory=lambda: DataSettings(path="bundled:sft.jsonl"))
    """Demonstrations (`data.path`), held-out demonstrations, lengths."""
    output: str = "runs/sft"
    """Output directory: the fine-tuned model (transformers format), metrics, checkpoints."""
    completion_only_loss: bool = True
    """Train on answer tokens only (prompt tokens masked)."""
    assistant_turns: Literal["last", "all"] = "last"
    """Which assistant turns of a `messages` record are learned: the last (the rest is its prompt), or all,
    the conversation encoded once with each assistant turn's text and end-of-turn token labelled (needs a
    fast tokenizer and a chat template that only appends; with `data.truncation` a too-long conversation
    is cut at `data.max_length`, its later turns not learned). Prompt/completion records are unaffected."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5, batch_size=8, epochs=2.0))
    """The shared training loop."""

    RENAMED: ClassVar[dict[str, str]] = DATA_RENAMED


def encode_sft(
    records: list[SFTRecord], tokenizer: Any, data: DataSettings, assistant_turns: str = "last"
) -> list[SequenceExample]:
    """Tokenise and length-check every record before training starts (errors name file:line:field); records
    truncation left with nothing to learn are dropped. `assistant_turns`: see `SFTConfig`."""
    examples = []
    for rec in records:
        conversation = rec.conversation if assistant_turns == "all" else None
        if conversation is not None:
            example = encode_conversation(
                tokenizer, conversation, max_length=data.max_length, truncation=data.truncation,
                path=rec.source.path, line=rec.source.line, field=rec.answer_field,
            )  # fmt: skip
        else:
            example = encode_answer(
                tokenizer, rec, rec.completion, rec.answer_field, data.max_length, data.truncation
            )
        if example is not None:
            examples.append(example)
    return examples


class SFTTrainer(SupervisedTrainer[SequenceExample]):
    name = "sft"
    stage: SFTConfig

    def __init__(self, cfg: SFTConfig, train: list[SequenceExample], evals: list[SequenceExample]) -> None:
        set_seed(cfg.train.seed)
        model, tokenizer = load_causal_lm(
            cfg.model, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code,
            runtime=resolve_runtime(cfg.train), gradient_checkpointing=cfg.train.gradient_checkpointing,
        )  # fmt: skip
        super().__init__(cfg, model, tokenizer, train, evals)
        head_weight = cast(torch.Tensor, decoder_and_head(model)[1].weight)  # (V, D)
        self.uniform_loss = math.log(head_weight.shape[0])  # ln V

    def example_length(self, example: SequenceExample) -> int:
        return len(example)

    def collate(self, examples: list[SequenceExample]) -> dict[str, Any]:
        input_ids, attention_mask, position_ids = pad(
            [ex.input_ids for ex in examples], self.tokenizer.pad_token_id
        )
        label_mask = attention_mask.bool().clone()  # (B, T)
        if self.stage.completion_only_loss:
            for i, ex in enumerate(examples):
                if ex.label_mask is not None:  # a conversation's assistant turns (assistant_turns: all)
                    label_mask[i, : len(ex)] = torch.tensor(ex.label_mask, dtype=torch.bool)
                else:
                    label_mask[i, : ex.answer_start] = False
        else:
            label_mask[:, 0] = False  # the first token has no prediction
        num_items = int(label_mask[:, 1:].sum())
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "label_mask": label_mask,
            "num_items": num_items,
            "num_tokens": int(attention_mask.sum()),
        }

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        decoder, head = decoder_and_head(model)
        hidden = decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).last_hidden_state  # (B, T, C)
        select = batch["label_mask"][:, 1:]  # (B, T-1): position t predicts token t+1
        targets = batch["input_ids"][:, 1:][select]  # (N,)
        logits = head(hidden[:, :-1][select])  # (N, V)
        logprobs, _ = token_logprobs_entropy(logits, targets, entropy=False)  # (N,)
        loss_sum = -logprobs.sum()  # = cross-entropy, without its (N, V) log-softmax and zero-filled gradient
        correct = (logits.detach().argmax(-1) == targets).sum()
        return loss_sum, {"token_accuracy": correct}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        loss_sum, correct, count = 0.0, 0.0, 0
        for _, batch in self.eval_batches():
            part, metrics = self.forward(self.loss, batch)
            loss_sum += float(part)
            correct += float(metrics["token_accuracy"])
            count += batch["num_items"]
        mean = loss_sum / max(count, 1)
        return {
            "loss": mean,
            "perplexity": math.exp(min(mean, 50.0)),
            "token_accuracy": correct / max(count, 1),
        }

    def save_final(self) -> None:
        save_model(self.model, self.tokenizer, self.output_dir, self.final_state())


def prepare_sft(cfg: SFTConfig) -> tuple[list[SequenceExample], list[SequenceExample]]:
    """Read, validate and tokenise the data (nothing is written anywhere until this succeeds)."""
    train_records, eval_records = cfg.data.split(load_sft, cfg.train.seed, "demonstrations")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    turns = cfg.assistant_turns
    return (
        encode_sft(train_records, tokenizer, cfg.data, turns),
        encode_sft(eval_records, tokenizer, cfg.data, turns),
    )


def run_sft(cfg: SFTConfig) -> dict[str, float]:
    train, evals = prepare_sft(cfg)
    return SFTTrainer(cfg, train, evals).run()
