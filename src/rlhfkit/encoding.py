"""Tokenisation shared by every trainer: prompts and answers to token ids, and padded batches.

Conventions (the field's, as in TRL):
- A prompt or answer given as a list of messages is rendered with the tokenizer's chat template; the
  prompt ends with the generation prompt (`<|im_start|>assistant\\n` for SmolLM2) and the answer is the
  rest of the rendered conversation, cut right after its final EOS (the template's trailing newline after
  EOS is not trained on, so the model learns to stop at EOS).
- Plain strings are used as they are: ids(prompt) + ids(answer) + [EOS].
- A mixed record (string prompt, message answer or the reverse) is treated as a conversation.

Shapes: B batch, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.errors import DataError


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _ids(encoded: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template; older versions a list."""
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a prompt, ready for the model to continue with an answer."""
    if is_conversational(prompt):
        rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
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
    from the right (it then has no EOS); None when not even one answer token fits."""
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


def chat_prompt_text(prompt: Any) -> str:
    """A short display form of a prompt (the last user message of a conversation)."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else prompt[-1]["content"]
    return str(prompt)
