"""The tokens of a recorded agent episode, and where its assistant turns lie in them.

An episode of a trajectory ranking (`data.trajectories`) is read by the reward model as token ids: the
sampler's own when the record carries them (token in, token out: exactly what the policy produced, never
re-tokenised text), otherwise the chat template's rendering of the prompt, the tools and the episode's
messages (`data.chat_tools`, the rule the episode runner and the server share). Either way an episode is
scored where the agent's last turn ends: observations after it (a tool result, the customer's last word)
are shown to people but are not the agent's doing, and the sampler's tokens stop there too.

Rendering: the text of the whole conversation is cut right after the last assistant turn's end-of-turn
token and tokenised once; a token belongs to an assistant turn when its first character lies between the
turn's generation prompt and its end-of-turn token (character offsets of a fast tokenizer), so the turns'
boundaries are the template's, and the episode's tokens are those of one tokenisation of the whole text.
The same rule encodes an SFT conversation whose every assistant turn is learned (`sft.assistant_turns:
all`, `data.encoding.encode_conversation`), rendered there with the plain chat template as SFT's last-turn
path renders it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhfkit.data.chat_tools import render_messages
from rlhfkit.data.trajectories import EpisodeTokens, TrajectoryRecord
from rlhfkit.errors import ConfigError, DataError

Render = Callable[[list[dict[str, Any]], bool], str]
"""Renders a conversation as text: render(messages, add_generation_prompt)."""


def turn_spans(loss_mask: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of model tokens in an episode's completion: its assistant turns, in order."""
    spans, start = [], None
    for i, m in enumerate([*loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _turn_end(text: str, end_texts: list[str]) -> int:
    """The character position right after the last end-of-turn token in `text` (its length if none)."""
    ends = [text.rfind(t) + len(t) for t in end_texts if t and t in text]
    return max(ends) if ends else len(text)


def rendered_tokens(
    tokenizer: Any, prompt: list[dict[str, Any]], tools: list[dict[str, Any]] | None, messages: list[Any]
) -> EpisodeTokens:
    """The episode's tokens as the chat template renders it with its tools (see the module docstring)."""
    return conversation_tokens(
        tokenizer, prompt, messages, lambda m, gen: render_messages(tokenizer, m, tools, gen)
    )


def conversation_tokens(
    tokenizer: Any, prompt: list[dict[str, Any]], messages: list[Any], render: Render
) -> EpisodeTokens:
    """`prompt` + `messages` as `render` writes them, tokenised once and cut right after the last assistant
    turn: (the prompt's ids up to the first turn's generation prompt, the rest, 1 on each assistant turn of
    `messages`: its text and end-of-turn token). Needs a fast tokenizer and a template that only appends."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "the assistant turns of a rendered conversation need a fast tokenizer (character offsets)"
        )
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    end_texts = [tokenizer.eos_token or ""]
    if "<|im_end|>" in tokenizer.get_vocab():
        end_texts.append("<|im_end|>")
    spans: list[tuple[int, int, str]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(prompt + messages[:i], True)
        text = render(prompt + messages[: i + 1], False)
        if not text.startswith(start) or (spans and not start.startswith(spans[-1][2])):
            raise ConfigError(
                "the model's chat template renders earlier turns differently once more turns follow; "
                "episodes and conversations learned turn by turn need a template that only appends"
            )
        end = _turn_end(text, end_texts)
        spans.append((len(start), end, text[:end]))
    prompt_chars = len(render(prompt, True))
    full = spans[-1][2]
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    n_prompt = sum(1 for lo, hi in offsets if hi <= prompt_chars)
    mask = [int(any(a <= lo < b for a, b, _ in spans)) for lo, _ in offsets[n_prompt:]]
    return EpisodeTokens(tuple(ids[:n_prompt]), tuple(ids[n_prompt:]), tuple(mask))


def episode_tokens(tokenizer: Any, record: TrajectoryRecord, index: int) -> EpisodeTokens:
    """Episode `index` of a record as tokens: the sampler's, or the template's rendering."""
    episode = record.episodes[index]
    if episode.tokens is not None:
        tokens = episode.tokens
    else:
        tokens = rendered_tokens(tokenizer, record.prompt, record.tools, list(episode.messages))
    if episode.flags and len(turn_spans(tokens.loss_mask)) != episode.assistant_turns:
        message = (
            f"has {episode.assistant_turns} assistant turns but its loss_mask marks "
            f"{len(turn_spans(tokens.loss_mask))} runs of model tokens, so flagged turns cannot be placed"
        )
        raise DataError(record.source.path, record.source.line, f"episodes[{index}].loss_mask", message)
    return tokens


def flag_positions(tokens: EpisodeTokens, flags: tuple[int, ...]) -> list[tuple[int, int]]:
    """For each flagged assistant turn, (the position whose score is read before the turn, the position at
    its end), in the completion's coordinates: -1 is the prompt's last token."""
    spans = turn_spans(tokens.loss_mask)
    return [(spans[k][0] - 1, spans[k][1] - 1) for k in flags]
