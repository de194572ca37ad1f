"""Forward passes that run each shared prompt once: (prompt, answer) rows whose prompts repeat.

Preference pairs share their prompt, a GRPO group shares it G times, and with a chat template every
prompt of a batch starts with the same tokens (SmolLM2's default system prompt is ~30 of a ~40-token
prompt). A plain forward pass recomputes all of that for every row. Here a batch is split in three
levels, each run once through the decoder with a KV cache that keeps its autograd graph:

  0. the prefix every distinct prompt shares (1 row, only when >= `min_shared` tokens);
  1. the rest of each distinct prompt (U rows, left-padded), attending to the prefix;
  2. each row's answer (B rows, right-padded), attending to its own prompt.

The cache is expanded between levels with `index_select`, whose backward sums the rows' gradients
into the shared keys and values, so log-probs, rewards and gradients equal those of the plain forward
over the concatenated rows (to float rounding; tests/models/test_prefix.py checks both). Positions count real
tokens, as everywhere in rlhfkit, so a row gets the positions it would get unpadded.

Shapes: B rows, U distinct prompts, c shared-prefix length, P padded prompt-tail length, T padded
answer length, C hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.distributed.tensor import DTensor

from rlhfkit.data.encoding import SequenceExample, common_prefix_len, pad
from rlhfkit.device import to_device
from rlhfkit.losses import token_logprobs_entropy
from rlhfkit.models.compat import cache_keyword
from rlhfkit.models.loading import decoder_and_head

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rlhfkit.rollout import Rollout

__all__ = [
    "SharedPromptBatch",
    "answer_predictors",
    "completion_logprobs",
    "last_token_hidden",
    "shared_prompt_forward",
]


@dataclass
class SharedPromptBatch:
    """B (prompt, answer) rows with each distinct prompt stored once; see the module docstring."""

    prefix_ids: torch.Tensor  # (1, c) tokens every distinct prompt starts with (c may be 0)
    prompt_ids: torch.Tensor  # (U, P) the rest of each distinct prompt, left-padded
    prompt_mask: torch.Tensor  # (U, P) 1 = real token
    inverse: torch.Tensor  # (B,) distinct prompt of each row
    answer_ids: torch.Tensor  # (B, T) right-padded
    answer_mask: torch.Tensor  # (B, T) 1 = real token

    @classmethod
    def build(
        cls,
        prompts: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        pad_id: int,
        min_shared: int = 4,
    ) -> SharedPromptBatch:
        """From token lists; every prompt needs a token. Answers may be empty (then T may be 0)."""
        if len(prompts) != len(answers) or not prompts:
            raise ValueError(f"need as many prompts as answers, at least one: {len(prompts)}, {len(answers)}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        index: dict[tuple[int, ...], int] = {}
        inverse = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompts])  # (B,)
        distinct = list(index)
        shared = 0
        if len(distinct) > 1:  # each tail keeps >= 1 token, so every row has a last prompt position
            shared = min(common_prefix_len(distinct), min(map(len, distinct)) - 1)
            shared = shared if shared >= min_shared else 0
        prompt_ids, prompt_mask, _ = pad([p[shared:] for p in distinct], pad_id, side="left")  # (U, P)
        width = max(map(len, answers))
        answer_ids = torch.full((len(answers), width), pad_id, dtype=torch.long)  # (B, T)
        answer_mask = torch.zeros((len(answers), width), dtype=torch.long)  # (B, T)
        for i, a in enumerate(answers):
            answer_ids[i, : len(a)] = torch.as_tensor(list(a), dtype=torch.long)
            answer_mask[i, : len(a)] = 1
        prefix = torch.tensor([list(distinct[0][:shared])], dtype=torch.long).view(1, shared)  # (1, c)
        return cls(prefix, prompt_ids, prompt_mask, inverse, answer_ids, answer_mask)

    @classmethod
    def from_examples(cls, examples: Sequence[SequenceExample], pad_id: int) -> SharedPromptBatch:
        """From encoded (prompt + answer) examples, split at their `answer_start`."""
        prompts = [ex.input_ids[: ex.answer_start] for ex in examples]
        return cls.build(prompts, [ex.input_ids[ex.answer_start :] for ex in examples], pad_id)

    @classmethod
    def from_rollout(cls, rollout: Rollout, pad_id: int, min_shared: int = 4) -> SharedPromptBatch:
        """From a rollout: its left-padded prompts (B, P) and right-padded answers (B, T), kept as they are
        (so per-token results line up with the rollout's (B, T) tensors)."""
        masks = rollout.prompt_mask.bool()
        prompts = [row[m].tolist() for row, m in zip(rollout.prompt_ids, masks, strict=True)]
        batch = cls.build(prompts, [[]] * len(prompts), pad_id, min_shared)
        batch.answer_ids, batch.answer_mask = rollout.completion_ids, rollout.completion_mask.long()
        return batch

    def select(self, rows: torch.Tensor) -> SharedPromptBatch:
        """The batch restricted to `rows` (B',): only the distinct prompts those rows use are kept, and
        left-padding columns no kept prompt needs are dropped; answers keep their width T."""
        used, inverse = torch.unique(self.inverse[rows], return_inverse=True)  # (U',), (B',)
        prompt_mask = self.prompt_mask[used]  # (U', P)
        first = int((prompt_mask.sum(0) > 0).nonzero().min())  # left padding: drop all-pad columns
        return SharedPromptBatch(
            self.prefix_ids, self.prompt_ids[used, first:], prompt_mask[:, first:], inverse,
            self.answer_ids[rows], self.answer_mask[rows],
        )  # fmt: skip

    def sequences(self) -> list[list[int]]:
        """The plain prompt + answer token list of every row (what a forward without sharing would run)."""
        prefix = self.prefix_ids[0].tolist()
        prompts = [ids[m.bool()].tolist() for ids, m in zip(self.prompt_ids, self.prompt_mask, strict=True)]
        answers = [ids[m.bool()].tolist() for ids, m in zip(self.answer_ids, self.answer_mask, strict=True)]
        return [prefix + prompts[u] + a for u, a in zip(self.inverse.tolist(), answers, strict=True)]

    @property
    def rows(self) -> int:
        return self.inverse.shape[0]

    @property
    def prompt_lengths(self) -> torch.Tensor:  # (B,) real prompt tokens of each row, prefix included
        return self.prefix_ids.shape[1] + self.prompt_mask.sum(-1)[self.inverse]

    @property
    def tokens_processed(self) -> int:
        """Real tokens the shared forward runs (the plain forward runs sum(prompt_lengths + answers))."""
        return int(self.prefix_ids.numel() + self.prompt_mask.sum() + self.answer_mask.sum())


def _positions(mask: torch.Tensor, offset: torch.Tensor | int) -> torch.Tensor:
    return offset + (mask.long().cumsum(-1) - 1).clamp(min=0)


def shared_prompt_forward(
    decoder: torch.nn.Module, batch: SharedPromptBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `batch` through a transformers decoder stack (e.g. `LlamaModel`); returns
    (hidden state of each row's last prompt token (B, C), hidden states of its answer tokens (B, T, C)).

    The hidden state at answer position t predicts answer token t + 1; the last prompt token's predicts
    answer token 0. Differentiable: call it under autograd to train. The three levels are embedded in one
    lookup, so training builds one dense (vocabulary x C) embedding gradient per call, not three."""
    from transformers import DynamicCache

    embed = cast("PreTrainedModel", decoder).get_input_embeddings()  # nn.Module does not declare it
    device = cast(torch.Tensor, embed.weight).device
    batch = to_device(batch, device)  # rollouts and collated batches are built on the CPU
    checkpointed = getattr(decoder, "gradient_checkpointing", False) and decoder.training
    # FSDP2 re-gathers a sharded layer's weights for the backward of its output; a KV cache shared between
    # calls would reach back into a call whose weights are already freed: one call per layer then
    sharded = any(isinstance(p, DTensor) for p in decoder.parameters())
    if (checkpointed or sharded) and torch.is_grad_enabled():
        return _unshared_forward(decoder, batch)
    config = getattr(decoder, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    key = cache_keyword(decoder)
    c = batch.prefix_ids.shape[1]
    u = batch.prompt_ids.shape[0]
    levels = (batch.prefix_ids, batch.prompt_ids, batch.answer_ids)
    flat = embed(torch.cat([ids.flatten() for ids in levels]))  # (n, C)
    parts = flat.split([ids.numel() for ids in levels])
    prefix_emb, prompt_emb, answer_emb = (
        part.view(*ids.shape, flat.shape[-1]) for part, ids in zip(parts, levels, strict=True)
    )  # (1, c, C), (U, P, C), (B, T, C)
    if c:
        decoder(
            inputs_embeds=prefix_emb,
            attention_mask=torch.ones_like(batch.prefix_ids),
            position_ids=torch.arange(c, device=device)[None],
            **{key: cache},
            use_cache=True,
        )
        first = torch.zeros(u, dtype=torch.long, device=device)  # (U,) every row reads row 0
        cache.reorder_cache(cast(torch.LongTensor, first))  # (1, ...) -> (U, ...)
    prompt_mask = torch.cat([batch.prompt_mask.new_ones(u, c), batch.prompt_mask], dim=1)  # (U, c + P)
    hidden = decoder(
        inputs_embeds=prompt_emb,
        attention_mask=prompt_mask,
        position_ids=_positions(batch.prompt_mask, c),
        **{key: cache},
        use_cache=True,
    ).last_hidden_state  # (U, P, C)
    if cache.get_seq_length() != prompt_mask.shape[1]:  # e.g. a model forcing use_cache off
        raise RuntimeError(f"{type(decoder).__name__} did not fill the KV cache the shared forward needs")
    last_prompt = hidden[:, -1][batch.inverse]  # (B, C): left padding puts the last real token last
    if batch.answer_ids.shape[1] == 0:
        return last_prompt, hidden.new_zeros(batch.rows, 0, hidden.shape[-1])
    cache.reorder_cache(cast(torch.LongTensor, batch.inverse))  # (U, ...) -> (B, ...)
    mask = torch.cat([prompt_mask[batch.inverse], batch.answer_mask], dim=1)  # (B, c + P + T)
    steps = torch.arange(batch.answer_ids.shape[1], device=device)  # (T,)
    answer_pos = batch.prompt_lengths[:, None] + steps  # (B, T)
    answers = decoder(
        inputs_embeds=answer_emb,
        attention_mask=mask,
        position_ids=answer_pos,
        **{key: cache},
        use_cache=True,
    ).last_hidden_state  # (B, T, C)
    return last_prompt, answers


def _unshared_forward(
    decoder: torch.nn.Module, batch: SharedPromptBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_prompt_forward` as one plain forward over every row's prefix + prompt + answer (no cache):
    activation checkpointing recomputes each layer in the backward pass, which a KV cache that the forward
    appends to cannot survive (transformers drops the cache under checkpointing). Same values; each row's
    prompt is then computed once per row. Rows are (1, c) + (P, left-padded) + (T, right-padded) tokens;
    the padding in the middle is masked and positions count real tokens, as in the shared forward."""
    b, c, p = batch.rows, batch.prefix_ids.shape[1], batch.prompt_ids.shape[1]
    ids = torch.cat([batch.prefix_ids.expand(b, c), batch.prompt_ids[batch.inverse], batch.answer_ids], 1)
    mask = torch.cat(
        [batch.prompt_mask.new_ones(b, c), batch.prompt_mask[batch.inverse], batch.answer_mask.long()], 1
    )  # (B, c + P + T)
    hidden = decoder(
        input_ids=ids, attention_mask=mask, position_ids=_positions(mask, 0), use_cache=False
    ).last_hidden_state  # (B, c + P + T, C)
    return hidden[:, c + p - 1], hidden[:, c + p :]  # (B, C), (B, T, C)


def last_token_hidden(
    last_prompt: torch.Tensor, answers: torch.Tensor, answer_mask: torch.Tensor
) -> torch.Tensor:
    """The hidden state (B, C) at each row's last real token: its answer's last, or its prompt's last when
    the answer is empty (where a sequence classifier reads its score)."""
    lengths = answer_mask.to(last_prompt.device).sum(-1)  # (B,)
    if answers.shape[1] == 0:
        return last_prompt
    rows = torch.arange(answers.shape[0], device=answers.device)  # (B,)
    picked = answers[rows, (lengths - 1).clamp(min=0)]  # (B, C)
    return torch.where((lengths > 0)[:, None], picked, last_prompt)


def answer_predictors(last_prompt: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """The hidden states (B, T, C) whose logits predict answer tokens 0..T-1."""
    return torch.cat([last_prompt[:, None], answers[:, :-1]], dim=1)


def completion_logprobs(
    model: Any, batch: SharedPromptBatch, temperature: float = 1.0, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropy or None) of a causal LM's answer tokens under logits / temperature, both (B, T)
    and zero on padding: one shared-prompt forward, the output layer only on the real answer positions.
    Differentiable in the log-probs (the trainers' policy pass); the entropy never carries a gradient."""
    decoder, head = decoder_and_head(model)
    batch = to_device(batch, cast(torch.Tensor, head.weight).device)
    last_prompt, answers = shared_prompt_forward(decoder, batch)  # (B, C), (B, T, C)
    select = batch.answer_mask.bool()  # (B, T)
    logits = head(answer_predictors(last_prompt, answers)[select])  # (N, V)
    lp, ent = token_logprobs_entropy(logits, batch.answer_ids[select], max(temperature, 1e-7), entropy)
    logprobs = lp.new_zeros(select.shape).masked_scatter(select, lp)  # (B, T)
    if ent is None:
        return logprobs, None
    return logprobs, ent.new_zeros(select.shape).masked_scatter(select, ent)
