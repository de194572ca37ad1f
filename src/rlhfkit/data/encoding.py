"""Tokenisation shared by every trainer: prompts and answers to token ids, and padded batches.

Conventions (the field's, as in TRL):
- A prompt or answer given as a list of messages is rendered with the tokenizer's chat template; the
  prompt ends with the generation prompt (`<|im_start|>assistant\\n` for SmolLM2) and the answer is the
  rest of the rendered conversation, cut right after its final EOS (the template's trailing newline after
  EOS is not trained on, so the model learns to stop at EOS).
- Plain strings are used as they are: ids(prompt) + ids(answer) + [EOS].
- A mixed record (string prompt, message answer or the reverse) is treated as a conversation.
- A whole conversation whose every assistant turn is learned (`encode_conversation`) is rendered once; its
  label mask holds each assistant turn's text and end-of-turn token, as the answer of the last-turn path.

Shapes: B batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from rlhfkit.data.episode_tokens import Render, conversation_tokens, episode_tokens, flag_positions
from rlhfkit.data.records import Answer, DataSettings, PreferenceRecord, RankingRecord, load_preferences
from rlhfkit.data.trajectories import TrajectoryRecord
from rlhfkit.errors import ConfigError, DataError


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _ids(encoded: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template; older versions a list."""
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: the longest token string of the vocabulary, special
    tokens included (a byte-level token string has at least one character per byte it decodes to). Cached
    on the tokenizer."""
    cached = getattr(tokenizer, "_rlhfkit_max_token_chars", None)
    if cached is None:
        cached = max((len(token) for token in tokenizer.get_vocab()), default=1)
        tokenizer._rlhfkit_max_token_chars = cached
    return cached


def text_chars(value: Any) -> int:
    """Characters of a prompt or answer: the string, or the contents of its messages."""
    if isinstance(value, list):
        return sum(len(m.get("content") or "") for m in value)
    return len(value)


def char_limit(tokenizer: Any, max_tokens: int) -> int:
    """A text longer than this many characters cannot fit in `max_tokens` tokens, whatever it says: the
    cheap check before tokenising (a 10 MB string is refused in microseconds, not after gigabytes). Eight
    tokens of slack cover merges at the edges of a chat template."""
    return (max_tokens + 8) * max_token_chars(tokenizer)


def _cut(value: Any, limit: int) -> Any:
    """A text (or each message's content) cut to `limit` characters, for truncation before tokenising."""
    if isinstance(value, list):
        return [{**m, "content": m["content"][:limit]} for m in value]
    return value[:limit]


def checked_prompt_ids(tokenizer: Any, rec: Any, max_tokens: int, setting: str) -> list[int]:
    """`prompt_ids` of a record's prompt, refused (DataError naming file:line) when it is longer than
    `max_tokens`, checked on characters before tokenising and then on tokens; `setting` names the limit."""
    chars = text_chars(rec.prompt)
    if chars > char_limit(tokenizer, max_tokens):
        message = f"is {chars} characters long, far more than {setting}={max_tokens} tokens hold"
        raise DataError(rec.source.path, rec.source.line, "prompt", message)
    ids = prompt_ids(tokenizer, rec.prompt)
    if len(ids) > max_tokens:
        message = f"is {len(ids)} tokens, more than {setting}={max_tokens}"
        raise DataError(rec.source.path, rec.source.line, "prompt", message)
    return ids


def prompt_ids(tokenizer: Any, prompt: Any, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of a prompt, ready for the model to continue with an answer; `tools` (JSON schemas) go to
    a chat template that renders them (`serve.tools` decides when)."""
    if is_conversational(prompt):
        extra = {"tools": tools} if tools else {}
        rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, **extra)
        return _ids(rendered)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def prompt_answer_ids(tokenizer: Any, prompt: Any, answer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids); the answer ids end with EOS."""
    eos = tokenizer.eos_token_id
    if is_conversational(prompt) or is_conversational(answer):
        messages = _as_messages(prompt, "user")
        p_ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        full = _ids(
            tokenizer.apply_chat_template(messages + _as_messages(answer, "assistant"), tokenize=True)
        )
        if full[: len(p_ids)] != p_ids:
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        a_ids = full[len(p_ids) :]
        if eos in a_ids:  # cut after the final EOS: the template's trailing newline is not trained on
            a_ids = a_ids[: len(a_ids) - a_ids[::-1].index(eos)]
        else:
            a_ids.append(eos)
        return p_ids, a_ids
    p_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    a_ids = [*tokenizer(answer, add_special_tokens=False)["input_ids"], eos]
    return p_ids, a_ids


@dataclass(frozen=True)
class SequenceExample:
    """One prompt + answer: `input_ids` with the answer starting at `answer_start`."""

    input_ids: tuple[int, ...]
    answer_start: int
    path: str = ""
    line: int = 0
    label_mask: tuple[int, ...] | None = None
    """1 on each token to learn, one per input id (a conversation's assistant turns, `encode_conversation`);
    None: every token from `answer_start` on."""

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_pair(
    tokenizer: Any,
    prompt: Any,
    answer: Any,
    *,
    max_length: int,
    truncation: bool,
    path: str,
    line: int,
    field: str,
) -> SequenceExample | None:
    """Encode prompt + answer, enforcing `max_length`.

    Too long with truncation off: a DataError naming the record. With truncation on: the answer is cut
    from the right (it then has no EOS); None when not even one answer token fits. Lengths are checked
    on characters first (`char_limit`), so a huge text is refused or cut before it is tokenised."""
    limit = char_limit(tokenizer, max_length)
    chars = text_chars(prompt) + text_chars(answer)
    if chars > limit:
        if not truncation:
            raise DataError(
                path, line, field,
                f"is {chars} characters long with its prompt, far more than max_length={max_length} tokens "
                "hold (raise max_length or set truncation: true)",
            )  # fmt: skip
        if text_chars(prompt) > limit:
            return None  # the prompt alone does not fit
        answer = _cut(answer, limit)  # the cut lies beyond every token that can be kept
    p_ids, a_ids = prompt_answer_ids(tokenizer, prompt, answer)
    total = len(p_ids) + len(a_ids)
    if total > max_length:
        if not truncation:
            raise DataError(
                path, line, field,
                f"is {total} tokens long with its prompt, more than max_length={max_length} "
                "(raise max_length or set truncation: true)",
            )  # fmt: skip
        if len(p_ids) >= max_length:
            return None
        a_ids = a_ids[: max_length - len(p_ids)]
    return SequenceExample(tuple(p_ids + a_ids), len(p_ids), path, line)


def _first_turns(messages: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """The messages that hold a conversation's first `limit` characters of content, the last one cut."""
    kept, left = [], limit
    for message in messages:
        if left <= 0:
            break
        kept.append({**message, "content": message["content"][:left]})
        left -= len(message["content"])
    return kept


def _render(tokenizer: Any) -> Render:
    """The plain chat template as text, as `prompt_answer_ids` renders a conversation."""
    return lambda messages, gen: tokenizer.apply_chat_template(
        messages, add_generation_prompt=gen, tokenize=False
    )


def encode_conversation(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    max_length: int,
    truncation: bool,
    path: str,
    line: int,
    field: str,
) -> SequenceExample | None:
    """Encode a conversation once with every assistant turn labelled: each turn's text and end-of-turn token,
    never the other turns nor the generation prompt (`<|im_start|>assistant\\n`) that opens a turn. The
    context is everything before the first assistant turn that follows another turn; the sequence ends
    where the last assistant turn does (`data.episode_tokens.conversation_tokens`).

    Too long with truncation off: a DataError naming the record. With truncation on: the sequence is cut at
    `max_length`, so the turns (or the part of one) beyond it are not learned, and the turns before it still
    are; None when not one labelled token is left. Lengths are checked on characters first (`char_limit`)."""
    limit = char_limit(tokenizer, max_length)
    chars = text_chars(messages)
    if chars > limit:
        if not truncation:
            raise DataError(
                path, line, field,
                f"is {chars} characters long, far more than max_length={max_length} tokens hold "
                "(raise max_length or set truncation: true)",
            )  # fmt: skip
        messages = _first_turns(messages, limit)  # the cut lies beyond every token that can be kept
    first = next((i for i, m in enumerate(messages) if i and m["role"] == "assistant"), None)
    if first is None:
        return None  # the cut left no assistant turn
    try:
        tokens = conversation_tokens(tokenizer, messages[:first], messages[first:], _render(tokenizer))
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}: set assistant_turns: last to learn each conversation's last turn only"
        ) from exc
    ids = tokens.prompt_ids + tokens.completion_ids
    mask = (0,) * len(tokens.prompt_ids) + tokens.loss_mask
    if len(ids) > max_length:
        if not truncation:
            raise DataError(
                path, line, field,
                f"is {len(ids)} tokens long, more than max_length={max_length} "
                "(raise max_length or set truncation: true)",
            )  # fmt: skip
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask[1:]):  # the first token is never a label: nothing predicts it
        return None
    return SequenceExample(ids, len(tokens.prompt_ids), path, line, mask)


@dataclass(frozen=True)
class PreferenceExample:
    """One prompt with its K >= 2 answers (prompt + answer token ids each), their rank levels (0 = best)
    and margin: a preference pair is K = 2 with ranks (0, 1)."""

    answers: tuple[SequenceExample, ...]
    ranks: tuple[int, ...]
    margin: float = 0.0
    flags: tuple[tuple[int, int, int], ...] = ()
    """Flagged agent turns: (answer index, position read before the turn, position at its end), positions
    counted from the answer's start (-1: the prompt's last token); see `RMConfig.turn_flag_coef`."""

    @property
    def length(self) -> int:
        """The longest answer: the padded length this example brings into a batch."""
        return max(len(a) for a in self.answers)


def encode_answer(
    tokenizer: Any, rec: Any, answer: Any, field: str, max_length: int, truncation: bool
) -> SequenceExample | None:
    """`encode_pair` of a record's prompt with one of its answers; errors name the record's file and line
    and the answer's `field`."""
    return encode_pair(
        tokenizer, rec.prompt, answer, max_length=max_length, truncation=truncation,
        path=rec.source.path, line=rec.source.line, field=field,
    )  # fmt: skip


def encode_trajectory(
    tokenizer: Any, rec: TrajectoryRecord, max_length: int, truncation: bool
) -> PreferenceExample | None:
    """A trajectory ranking as a preference example: each episode's tokens (`data.episode_tokens`) scored
    where its last turn ends, with its flagged turns. An episode longer than `max_length` is an error naming
    it, or with truncation the record is dropped (None): cutting an episode would cut where it is scored."""
    answers, flags = [], []
    for i, episode in enumerate(rec.episodes):
        tokens = episode_tokens(tokenizer, rec, i)
        ids = tokens.prompt_ids + tokens.completion_ids
        if len(ids) > max_length:
            if truncation:
                return None
            message = f"is {len(ids)} tokens long with its prompt, more than max_length={max_length}"
            raise DataError(rec.source.path, rec.source.line, f"episodes[{i}]", message)
        answers.append(SequenceExample(ids, len(tokens.prompt_ids), rec.source.path, rec.source.line))
        flags += [(i, before, after) for before, after in flag_positions(tokens, episode.flags)]
    clash = _same_ids(list(answers), rec.ranks)
    if clash is not None:
        message = f"tokenises to the same ids as 'episodes[{clash[0]}]', so the pair cannot be learned"
        raise DataError(rec.source.path, rec.source.line, f"episodes[{clash[1]}]", message)
    return PreferenceExample(tuple(answers), rec.ranks, 0.0, tuple(flags))


def encode_preferences(
    records: list[PreferenceRecord | RankingRecord | TrajectoryRecord],
    tokenizer: Any,
    max_length: int,
    truncation: bool,
) -> tuple[list[PreferenceExample], int]:
    """Tokenise and length-check every preference pair, ranking and trajectory ranking before training
    starts (errors name file:line:field). Returns the examples and how many records truncation left with
    nothing to compare (dropped)."""
    examples, dropped = [], 0
    answers: tuple[Answer, ...]
    ranks: tuple[int, ...]
    for rec in records:
        if isinstance(rec, TrajectoryRecord):
            example = encode_trajectory(tokenizer, rec, max_length, truncation)
            if example is None:
                dropped += 1
            else:
                examples.append(example)
            continue
        if isinstance(rec, PreferenceRecord):
            answers, ranks, margin = (rec.chosen, rec.rejected), (0, 1), rec.margin
            fields: tuple[str, ...] = ("chosen", "rejected")
        else:
            answers, ranks, margin = rec.completions, rec.ranks, 0.0
            fields = tuple(f"completions[{i}]" for i in range(len(answers)))
        encoded = [
            encode_answer(tokenizer, rec, answer, name, max_length, truncation)
            for answer, name in zip(answers, fields, strict=True)
        ]
        clash = _same_ids(encoded, ranks)
        if clash is not None or any(e is None for e in encoded):
            if not truncation and clash is not None:
                i, j = clash
                message = f"tokenises to the same ids as '{fields[i]}', so the pair cannot be learned"
                raise DataError(rec.source.path, rec.source.line, fields[j], message)
            dropped += 1  # truncation left nothing to compare: no prompt fits, or the answers became equal
            continue
        present = cast("list[SequenceExample]", encoded)  # none is None: checked above
        examples.append(PreferenceExample(tuple(present), tuple(ranks), margin))
    return examples, dropped


def load_preference_examples(
    data: DataSettings, tokenizer: Any, seed: int, stage: str
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, eval) preference examples of a stage's `data` section (RM, DPO): read and split, tokenised
    and length-checked (errors name file:line:field); records truncation left with nothing to compare are
    dropped with a note; no training example left is an error."""
    from rlhfkit.console import console

    train_records, eval_records = data.split(load_preferences, seed, "preference")
    episodes = next((r for r in train_records + eval_records if isinstance(r, TrajectoryRecord)), None)
    if episodes is not None and stage != "rm":
        raise DataError(
            episodes.source.path, episodes.source.line, "episodes",
            f"{stage} trains on answers; rankings of agent episodes train the reward model (rlhfkit rm), "
            "whose scores multi-turn RL (grpo --env --reward) then optimises",
        )  # fmt: skip
    train, dropped = encode_preferences(train_records, tokenizer, data.max_length, data.truncation)
    evals, dropped_eval = encode_preferences(eval_records, tokenizer, data.max_length, data.truncation)
    if dropped + dropped_eval:
        console.print(
            f"[bold]{stage}[/]: {dropped + dropped_eval} record(s) dropped: "
            "nothing left to compare after truncation"
        )
    if not train:
        raise ConfigError(
            f"{data.path}: no training example is left (check data.max_length and data.truncation)"
        )
    return train, evals


def _same_ids(encoded: list[SequenceExample | None], ranks: tuple[int, ...]) -> tuple[int, int] | None:
    """The first (i, j) of differently ranked answers with identical token ids, if any."""
    for j, b in enumerate(encoded):
        for i, a in enumerate(encoded[:j]):
            if a is not None and b is not None and ranks[i] != ranks[j] and a.input_ids == b.input_ids:
                return i, j
    return None


def pad(
    sequences: list[list[int]] | list[tuple[int, ...]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (B, T). Position ids count real tokens only, so a
    sequence gets the same positions whatever its padding (HF computes them wrongly under left padding)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, T)
    for i, seq in enumerate(sequences):
        if side == "right":
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        else:
            ids[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, length - len(seq) :] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    return ids, mask, position_ids


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: ``cumsum(mask) - 1`` clamped at 0, so padding does not shift them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``ids`` and ``mask``, both (B, P) int64 (``encoding.pad``, left side)."""
    ids, mask, _ = pad(seqs, pad_token_id, side="left")  # (B, P) each
    return ids, mask


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all token sequences share."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def chat_prompt_text(prompt: Any) -> str:
    """A short display form of a prompt (the last user message of a conversation)."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else prompt[-1]["content"]
    return str(prompt)
