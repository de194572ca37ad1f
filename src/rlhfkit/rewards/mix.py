"""Rewards for RL: one interface, `score(prompts, completions) -> tensor`, here over a trained reward model.

    rlhfkit score --reward runs/rm --data samples.jsonl --output scored.jsonl

    from rlhfkit.rewards.mix import RewardModelScorer
    scorer = RewardModelScorer("runs/rm")
    scorer.score(prompts, completions)          # (B,) normalised rewards, in input order
    scorer.score_token_ids(sequences)           # RL: prompt_ids + answer_ids, EOS or not

A reward model is a plain transformers `AutoModelForSequenceClassification` directory with one output
(written by `rlhfkit rm`). The score of prompt + answer is the head applied to the hidden state of the
*last real token*: the EOS of a complete answer, the last generated token of a truncated one. We find that
token from the attention mask (not from the pad id, as transformers does), so left padding, right padding
and padding holes in the middle (a left-padded prompt followed by a right-padded rollout) all give the same
value, and we apply the head to those N hidden states only, never to all (N, T) positions.

Normalisation: the raw score r is turned into `(r - shift) / scale`, the constants being stored in the
model's config.json as `rlhfkit_reward_shift` and `rlhfkit_reward_scale` (set by `rlhfkit rm` so that the
reference policy's answers score mean 0, std 1 with `normalize: shift_scale`). Plain transformers ignores
them and returns the RAW score in `logits`: Llama's head has no bias, so the shift cannot be folded into the
weights without changing the architecture. Elsewhere, normalise by hand:
    (model(**inputs).logits[:, 0] - config.rlhfkit_reward_shift) / config.rlhfkit_reward_scale

Prompts and answers are tokenised exactly as in training (`encoding.prompt_answer_ids`).
Shapes: N sequences, T tokens, C hidden size.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhfkit.config import import_spec
from rlhfkit.data.encoding import encode_answer, encode_trajectory, pad, prompt_answer_ids
from rlhfkit.data.records import (
    PreferenceRecord,
    RankingRecord,
    SFTRecord,
    load_preferences,
    load_sft,
    read_rows,
    resolve_data_path,
)
from rlhfkit.data.trajectories import TrajectoryRecord
from rlhfkit.device import Runtime, model_device
from rlhfkit.errors import ConfigError, NonFiniteRewardError
from rlhfkit.fileio import write_atomic
from rlhfkit.models.loading import context_length, load_reward_model, normalization, reward_parts
from rlhfkit.models.prefix import SharedPromptBatch, last_token_hidden, shared_prompt_forward

if TYPE_CHECKING:
    from rlhfkit.data.records import PromptRecord
    from rlhfkit.rollout import Rollout

# (prompts, completions, rollout, records) -> scores (B,): what RL trainers call once per rollout batch
Scorer = Callable[[list[str], list[str], "Rollout", list["PromptRecord"]], torch.Tensor]
# a verifiable reward: (prompts, completions, **fields) -> one float per completion; fields are the extra
# columns of the prompt data set (e.g. `answer`), one list each
RewardFn = Callable[..., Sequence[float]]
Record = SFTRecord | PreferenceRecord | RankingRecord | TrajectoryRecord


# ------------------------------------------------------------------------------------------- the score
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row, whatever the padding side (-1 for an empty row)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)  # (N,)


def sequence_rewards(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw rewards (N,): one decoder pass, then the head on the hidden state of each row's last real token.

    Equivalent to transformers' `model(input_ids, attention_mask).logits[:, 0]` for right-padded rows
    (which computes (N, T, 1) logits and picks the last non-pad token). Position ids default to the count
    of real tokens before each position, so left padding gives the same positions as no padding."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, T)
    decoder, head = reward_parts(model)
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (N, T, C)
    last = last_token_index(attention_mask)  # (N,)
    rows = torch.arange(hidden.shape[0], device=hidden.device)  # (N,)
    return head(hidden[rows, last]).squeeze(-1)  # (N, C) -> (N,)


def shared_sequence_rewards(model: Any, batch: SharedPromptBatch) -> torch.Tensor:
    """Raw rewards (N,) of (prompt, answer) rows with each distinct prompt run once (`rlhfkit.models.prefix`):
    the head on the hidden state of each row's last real token, as in `sequence_rewards`."""
    decoder, head = reward_parts(model)
    last_prompt, answers = shared_prompt_forward(decoder, batch)  # (N, C), (N, T, C)
    return head(last_token_hidden(last_prompt, answers, batch.answer_mask)).squeeze(-1)  # (N,)


def shared_rewards_at(
    model: Any, batch: SharedPromptBatch, rows: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder pass, two reads: the raw rewards (N,) at each row's last real token, and (F,) at the
    answer `positions` of `rows` (-1 = the row's last prompt token). A causal model's state at a position
    sees only what came before, so the score read there is the score of the sequence cut there: the
    per-turn scores of an agent episode come from the same pass as its final score."""
    decoder, head = reward_parts(model)
    last_prompt, answers = shared_prompt_forward(decoder, batch)  # (N, C), (N, T, C)
    final = head(last_token_hidden(last_prompt, answers, batch.answer_mask)).squeeze(-1)  # (N,)
    if not len(rows):
        return final, final.new_zeros(0)
    states = torch.cat([last_prompt[:, None], answers], dim=1)  # (N, 1 + T, C)
    return final, head(states[rows.to(states.device), positions.to(states.device) + 1]).squeeze(-1)  # (F,)


@torch.no_grad()
def score_sequences(
    model: Any, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16
) -> torch.Tensor:
    """Raw rewards (N,) of token sequences, run in batches of similar length, returned in input order."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("score_sequences: every sequence needs at least one token")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = torch.zeros(len(sequences))  # (N,)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        ids, mask, pos = pad([list(sequences[i]) for i in index], pad_token_id)  # (b, T) each
        ids, mask, pos = (t.to(model_device(model)) for t in (ids, mask, pos))
        out[index] = sequence_rewards(model, ids, mask, pos).float().cpu()
    return out


# ------------------------------------------------------------------------------------------- the scorer
class RewardModelScorer:
    """Normalised rewards of a trained reward model; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        runtime: Runtime | None = None,
    ) -> None:
        self.model, self.tokenizer = load_reward_model(str(path), trust_remote_code, runtime)
        self.batch_size = batch_size
        self.shift, self.scale = normalization(self.model.config)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift) / self.scale  # (N,)

    def encode(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[list[int]]:
        """Token ids of each prompt + answer (strings or message lists), as in training."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        pairs = (prompt_answer_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True))
        return [p_ids + a_ids for p_ids, a_ids in pairs]

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> torch.Tensor:
        """Normalised rewards (N,) of prompt + completion pairs, in input order."""
        return self.score_token_ids(self.encode(prompts, completions))

    def score_token_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Normalised rewards (N,) of tokenised prompt + answer sequences (the RM's tokenizer); an answer
        cut before its EOS (a truncated generation) is scored at its last token."""
        return self.normalize(
            score_sequences(self.model, sequences, self.tokenizer.pad_token_id, self.batch_size)
        )

    @torch.no_grad()
    def score_rollout(self, rollout: Rollout) -> torch.Tensor:
        """Normalised rewards (B,) of a rollout's rows, each distinct prompt run once."""
        batch = SharedPromptBatch.from_rollout(rollout, self.tokenizer.pad_token_id)
        return self.normalize(shared_sequence_rewards(self.model, batch).float().cpu())


def rollout_scorer(path: str | Path, batch_size: int = 16, runtime: Runtime | None = None) -> Any:
    """A PPO/GRPO scorer `(prompts, completions, rollout, records) -> (B,)` that scores the rollout's own
    tokens (no decode/re-encode round trip); the policy must share the reward model's tokenizer."""
    scorer = RewardModelScorer(path, batch_size, runtime=runtime)

    def score(
        prompts: list[str], completions: list[str], rollout: Rollout, records: list[PromptRecord]
    ) -> torch.Tensor:
        return scorer.score_rollout(rollout)

    return score


# ------------------------------------------------------------------------------ functions and mixtures
def load_reward_function(spec: str) -> RewardFn:
    """Import `module:function`."""
    return import_spec(spec, "reward_fn")


def function_scorer(fn: RewardFn) -> Scorer:
    """A Scorer over a Python reward function; extra prompt fields are passed as keyword lists."""

    def score(
        prompts: list[str], completions: list[str], rollout: Rollout, records: list[PromptRecord]
    ) -> torch.Tensor:
        keys = sorted({k for r in records for k in r.fields})
        fields = {k: [r.fields.get(k) for r in records] for k in keys}
        values = list(fn(prompts, completions, **fields))
        if len(values) != len(prompts):
            raise ValueError(f"reward function returned {len(values)} scores for {len(prompts)} answers")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    return score


@dataclass(frozen=True)
class RewardComponent:
    name: str
    weight: float
    scorer: Scorer
    source: str = ""
    """Where it comes from (a reward model directory or `module:function`), for messages."""


class RewardMix:
    """r = sum_i w_i r_i over reward models and functions; each component's scores are returned for logging.

    Called like a Scorer, it returns (total (B,), {name: component scores (B,)})."""

    def __init__(self, components: Sequence[RewardComponent]) -> None:
        if not components:
            raise ConfigError(
                "RL needs a reward: --reward DIR (a reward model) or --reward-fn module:function"
            )
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward components need distinct names, got {names}")
        self.components = list(components)

    @classmethod
    def from_specs(
        cls,
        models: Sequence[str],
        functions: Sequence[str],
        weights: Sequence[float] = (),
        runtime: Runtime | None = None,
    ) -> RewardMix:
        """Reward models first (frozen, on `runtime`'s device: default the CPU), then functions; `weights`
        (one per component) default to 1."""
        specs = [("rm", m) for m in models] + [("fn", f) for f in functions]
        if weights and len(weights) != len(specs):
            raise ConfigError(
                f"reward_weights has {len(weights)} entries for {len(specs)} reward components "
                "(reward models first, then reward functions)"
            )
        components: list[RewardComponent] = []
        for i, (kind, spec) in enumerate(specs):
            if kind == "rm":
                scorer = rollout_scorer(spec, runtime=runtime)
            else:
                scorer = function_scorer(load_reward_function(spec))
            name = Path(spec).name if kind == "rm" else spec.rpartition(":")[2]
            if any(c.name == name for c in components):
                name = f"{name}_{i}"
            weight = float(weights[i]) if weights else 1.0
            components.append(RewardComponent(name, weight, scorer, source=spec))
        return cls(components)

    def __call__(
        self, prompts: list[str], completions: list[str], rollout: Rollout, records: list[PromptRecord]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {}
        for c in self.components:
            scores = c.scorer(prompts, completions, rollout, records).float().cpu()  # (B,)
            bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
            if bad:
                rows = ", ".join(f"{i} ({_where(records[i])}: {scores[i].item()})" for i in bad[:5])
                more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                raise NonFiniteRewardError(
                    f"reward '{c.name}' ({c.source or c.name}) returned non-finite scores for {len(bad)} of "
                    f"{len(scores)} answers: rows {rows}{more}"
                )
            parts[c.name] = scores
        total = sum(c.weight * parts[c.name] for c in self.components)  # (B,)
        return torch.as_tensor(total), parts


def _where(record: Any) -> str:
    source = getattr(record, "source", None)
    return f"prompt {source.path}:{source.line}" if source is not None else "prompt"


# ------------------------------------------------------------------------------------- `rlhfkit score`
def _sequences(tokenizer: Any, rec: Record, limit: int) -> list[tuple[int, ...]]:
    """Token ids of each answer (or episode) of a record, length-checked (errors name file:line:field)."""
    if isinstance(rec, TrajectoryRecord):
        episodes = encode_trajectory(tokenizer, rec, limit, truncation=False)
        assert episodes is not None  # without truncation an episode that does not fit is a DataError
        return [a.input_ids for a in episodes.answers]
    if isinstance(rec, SFTRecord):
        answers = [(rec.completion, rec.answer_field)]
    elif isinstance(rec, RankingRecord):
        answers = [(a, f"completions[{i}]") for i, a in enumerate(rec.completions)]
    else:
        answers = [(rec.chosen, "chosen"), (rec.rejected, "rejected")]
    sequences = []
    for answer, name in answers:
        example = encode_answer(tokenizer, rec, answer, name, limit, truncation=False)
        assert example is not None  # without truncation an answer that does not fit is a DataError
        sequences.append(example.input_ids)
    return sequences


def score_file(
    reward: str, data: str, output: str | None = None, batch_size: int = 16, max_length: int | None = None
) -> int:
    """Add rewards to every record of a data file; JSONL to `output` (atomically) or stdout.

    prompt/completion or messages records get `reward`; preference pairs `reward_chosen` and
    `reward_rejected`; rankings `rewards` (one per completion), trajectory rankings `rewards` (one per
    episode, scored where its last turn ends: `data.episode_tokens`). Every prompt + answer must fit in
    `max_length` tokens (default: the reward model's context), checked on characters before tokenising;
    one that does not is an error naming file:line:field. Returns the number of records."""
    if batch_size < 1 or (max_length is not None and max_length < 2):
        raise ConfigError(
            f"--batch-size must be >= 1 and --max-length >= 2, got {batch_size} and {max_length}"
        )
    path = resolve_data_path(data)
    rows = [row for _, row in read_rows(path)]
    preference = any(key in rows[0] for key in ("chosen", "rejected", "completions", "episodes"))
    records: Sequence[Record] = (
        load_preferences(path) if preference else load_sft(path)
    )  # every record is validated before the model is loaded
    scorer = RewardModelScorer(reward, batch_size)
    limit = max_length or context_length(scorer.model)
    answers = [_sequences(scorer.tokenizer, rec, limit) for rec in records]
    flat = scorer.score_token_ids([ids for group in answers for ids in group]).tolist()  # (sum of K,)
    lines, start = [], 0
    for row, rec, group in zip(rows, records, answers, strict=True):
        values = flat[start : start + len(group)]
        start += len(group)
        if isinstance(rec, SFTRecord):
            extra: dict[str, Any] = {"reward": values[0]}
        elif isinstance(rec, RankingRecord | TrajectoryRecord):
            extra = {"rewards": values}
        else:
            extra = {"reward_chosen": values[0], "reward_rejected": values[1]}
        lines.append(json.dumps({**row, **extra}, ensure_ascii=False) + "\n")
    if output is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    else:
        write_atomic(Path(output), "".join(lines))
    return len(lines)
