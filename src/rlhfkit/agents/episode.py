"""Multi-turn episodes: a model acting in environments over several turns, sampled token in, token out.

    episodes = run_episodes(engine, lambda: MyEnv(), tasks, SamplingConfig(temperature=1.0), AgentLimits())
    rollout, loss_mask = episode_batch(episodes, engine.pad_token_id)  # what the RL trainers train on

Every episode that still runs takes its next turn in one `RolloutEngine.generate` call (one batch a turn).
An episode's tokens are its first prompt (`env.reset`'s messages and the env's tools, rendered by
`chat_tools` exactly as the server renders a request), then for each turn:

* the model's tokens, as sampled (ids, never decoded and re-tokenised), end-of-turn token included:
  loss mask 1, with the sampler's log-probs (of logits / temperature, as everywhere);
* the observation tokens: loss mask 0, log-prob 0.

The observation rule. With H the conversation up to the assistant turn just taken and O the environment's
observation messages, R1 = render(H) and R2 = render(H + O, with the generation prompt); R2 must start with
R1 (checked: a template that rewrites earlier turns is refused). The observation text is the text of R1
after its last end-of-turn token (ChatML's "\\n") followed by R2[len(R1):], tokenised on its own; it starts
right after a special token, so it tokenises as it would inside the whole text. So an episode's tokens are
the template's tokens of the whole conversation everywhere but inside the assistant turns, which hold what
the model sampled (re-tokenising its text may give other ids; the trainer must score what was sampled).
A turn cut at `max_new_tokens` still goes to the environment; if the episode goes on, the end-of-turn token
the model did not write is added as an observation token (mask 0), as the template closes the turn.

An episode ends (`Episode.reason`) when the environment says done (its `info["reason"]`, else "answer"),
after `max_turns` turns ("max_turns"), when the next turn would not fit in `max_tokens` ("max_tokens"), or
when `env.reset` / `env.step` raises ("env_error", the error text in `Episode.error`). Tool calls are read
with `toolcalls.parse_tool_calls` (a malformed call stays in the content) and given to `env.step` as
{"role": "assistant", "content": ..., "tool_calls": [ToolCall, ...]}.

Each episode keeps its KV cache across turns (`rollout.turns.TurnCaches`): a turn prefills only the tokens
its cache does not hold (the last sampled token and the observation), the turn's newcomers of every episode
together in one batched forward, and decodes on, so a turn costs what its new tokens cost, not its whole
history. The tokens are those of prefilling the whole history each turn (the same uniforms drawn the same
way) and the log-probs equal up to float rounding; the trainer's forward recomputes them over the whole
episode anyway. Engines whose backend cannot keep a cache (the static-cache GPU backends), or
``keep_cache=False``, prefill the whole history every turn (`RolloutEngine.generate`).

Shapes: B episodes, P prompt tokens (left-padded), T episode tokens after the first prompt (right-padded).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rlhfkit.agents.env import Environment, Message, Task
from rlhfkit.config import setting
from rlhfkit.data.chat_tools import chat_prompt_ids, openai_tool_calls, render_messages, tool_schemas
from rlhfkit.data.encoding import left_pad
from rlhfkit.data.toolcalls import ToolCall, parse_tool_calls
from rlhfkit.errors import ConfigError
from rlhfkit.rollout.engine import Rollout, RolloutEngine, SamplingConfig
from rlhfkit.rollout.turns import TurnCaches

TRUNCATED = ("max_turns", "max_tokens")
"""End reasons of an episode the limits cut short (it did not end on its own)."""


@dataclass
class AgentLimits:
    """How long an episode may run (the `agent` section of multi-turn RL and `agent-eval`)."""

    max_turns: int = setting(4, ge=1)
    """Assistant turns per episode at most."""
    max_tokens: int = setting(1024, ge=2)
    """Tokens per episode at most, prompt, observations and the model's turns together (its context)."""
    max_new_tokens: int = setting(128, ge=1)
    """Tokens per assistant turn at most (replaces `sampling.max_new_tokens` for episodes)."""


@dataclass
class Episode:
    """One finished episode: the conversation as text (for reports) and as tokens (for training)."""

    task_id: str
    messages: list[Message]  # the conversation, OpenAI format (assistant tool_calls as dicts)
    prompt_ids: list[int]  # the first prompt
    completion_ids: list[int]  # everything after it: the model's turns and the observations
    loss_mask: list[int]  # 1 on the model's own tokens, 0 on observations
    logprobs: list[float]  # the sampler's log-probs of the model's tokens, 0 on observations
    reward: float = 0.0  # the return: sum of the step rewards
    turns: int = 0
    reason: str = ""
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # the last step's info
    tokens: int = 0  # tokens used: prompt, observations and the model's turns (an endpoint: its usage)

    @property
    def truncated(self) -> bool:
        return self.reason in TRUNCATED

    def to_json(self) -> dict[str, Any]:
        """The record written to reports (no token ids)."""
        return {
            "task_id": self.task_id, "reward": self.reward, "turns": self.turns, "reason": self.reason,
            "error": self.error, "tokens": self.tokens, "model_tokens": sum(self.loss_mask),
            "messages": self.messages,
        }  # fmt: skip


def transcript(messages: Sequence[Message]) -> str:
    """A plain-text transcript of a conversation (for samples.jsonl)."""
    lines = []
    for m in messages:
        calls = "".join(
            f"\n[call {c['function']['name']}({c['function']['arguments']})]"
            for c in m.get("tool_calls") or []
        )
        lines.append(f"[{m['role']}] {m.get('content') or ''}{calls}")
    return "\n".join(lines)


def link_results(observations: list[Message], tool_calls: list[Message]) -> list[Message]:
    """The observations with the i-th tool message given the i-th call's id when it has none (OpenAI
    servers and native templates pair results with calls by id)."""
    out, ids = [], iter(c["id"] for c in tool_calls)
    for m in observations:
        m = dict(m)
        if m.get("role") == "tool" and not m.get("tool_call_id"):
            call_id = next(ids, None)
            if call_id is not None:
                m["tool_call_id"] = call_id
        out.append(m)
    return out


def assistant_message(content: str, calls: Sequence[ToolCall], turn: int) -> Message:
    """An assistant turn in OpenAI form (calls get ids `call_{turn}_{i}`)."""
    message: Message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = openai_tool_calls(calls, f"call_{turn}")
    return message


class EpisodeState:
    """An episode while it runs: its conversation, its tokens so far (token runner only) and its outcome.
    `act` is the one place an assistant turn meets the environment (the token runner here and the chat
    runner of `agents.evaluate` both use it)."""

    def __init__(self, env: Environment, task: Task) -> None:
        self.env, self.task = env, task
        self.messages: list[Message] = []
        self.tools: list[Message] | None = None
        self.prompt: list[int] = []
        self.ids: list[int] = []  # after the prompt
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.reward, self.turns, self.tokens = 0.0, 0, 0
        self.info: dict[str, Any] = {}
        self.reason: str | None = None
        self.error: str | None = None

    def end(self, reason: str, error: str | None = None) -> None:
        self.reason, self.error = reason, error

    def open(self) -> bool:
        """`env.reset` and the env's tool schemas; False (reason "env_error") if the env fails."""
        try:
            self.messages = [dict(m) for m in self.env.reset(self.task)]
            self.tools = tool_schemas(self.env.tools()) or None
        except Exception as exc:
            self.end("env_error", f"reset: {type(exc).__name__}: {exc}")
            return False
        return True

    def act(self, content: str, calls: Sequence[ToolCall], max_turns: int) -> list[Message] | None:
        """Record the assistant turn and let the environment answer it; the observation messages when the
        episode goes on, None when it ended (done, max_turns, env_error)."""
        self.turns += 1
        message = assistant_message(content, calls, self.turns)
        self.messages.append(message)
        try:
            result = self.env.step({"role": "assistant", "content": content, "tool_calls": list(calls)})
        except Exception as exc:
            self.end("env_error", f"step: {type(exc).__name__}: {exc}")
            return None
        self.reward += float(result.reward)
        self.info = dict(result.info)
        observations = link_results(list(result.observations), message.get("tool_calls") or [])
        self.messages += observations
        if result.done:
            self.end(str(result.info.get("reason") or "answer"))
        elif self.turns >= max_turns:
            self.end("max_turns")
        return observations if self.reason is None else None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.ids)

    def episode(self) -> Episode:
        return Episode(
            self.task.id, self.messages, self.prompt, self.ids, self.mask, self.logprobs, self.reward,
            self.turns, self.reason or "", self.error, self.info, self.tokens or self.length,
        )  # fmt: skip


class EpisodeRunner:
    """Runs batches of episodes with one rollout engine (see the module docstring)."""

    def __init__(self, engine: RolloutEngine, limits: AgentLimits, keep_cache: bool = True) -> None:
        if engine.tokenizer is None:
            raise ValueError("episodes need a rollout engine with a tokenizer")
        self.engine, self.tokenizer, self.limits = engine, engine.tokenizer, limits
        self.keep_cache = keep_cache  # False: prefill each episode's whole history every turn
        self.end_texts = {
            t: i for i in engine.eos_token_ids if (t := self.tokenizer.convert_ids_to_tokens(i))
        }

    def run(
        self,
        make_env: Callable[[], Environment],
        tasks: Sequence[Task],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
    ) -> list[Episode]:
        """One episode per task (a task may repeat: a GRPO group), each in its own environment object."""
        runs: list[EpisodeState] = []
        caches = TurnCaches(self.engine, keep=self.keep_cache)  # each episode's KV cache, by its index
        try:
            for task in tasks:
                runs.append(EpisodeState(make_env(), task))
                self.start(runs[-1])
            for _ in range(self.limits.max_turns):
                keys = [i for i, r in enumerate(runs) if r.reason is None]
                if not keys:
                    break
                active = [runs[i] for i in keys]
                budgets = [min(self.limits.max_new_tokens, self.limits.max_tokens - r.length) for r in active]
                config = replace(sampling, max_new_tokens=max(budgets), stop_at_eos=True)
                rollout = caches.generate(keys, [r.prompt + r.ids for r in active], config, generator)
                for k, (run, budget) in enumerate(zip(active, budgets, strict=True)):
                    n = min(int(rollout.lengths[k]), budget)
                    ended = bool(rollout.ended[k]) and int(rollout.lengths[k]) <= budget
                    ids, logprobs = rollout.completion_ids[k, :n].tolist(), rollout.logprobs[k, :n].tolist()
                    self.turn(run, ids, logprobs, ended)
                caches.drop([i for i in keys if runs[i].reason is not None])
        finally:
            for run in runs:
                try:
                    run.env.close()
                except Exception as exc:  # a failing cleanup is reported, never fatal
                    run.error = run.error or f"close: {type(exc).__name__}: {exc}"
        return [r.episode() for r in runs]

    def start(self, run: EpisodeState) -> None:
        if not run.open():
            return
        run.prompt = chat_prompt_ids(self.tokenizer, run.messages, run.tools)
        if run.length >= self.limits.max_tokens:
            run.end("max_tokens")

    def turn(self, run: EpisodeState, ids: list[int], logprobs: list[float], ended: bool) -> None:
        """Take the model's sampled turn, let the environment answer, append the observation tokens."""
        run.ids += ids
        run.mask += [1] * len(ids)
        run.logprobs += logprobs
        content, calls = parse_tool_calls(self.engine.decode_ids(ids))
        if not ended and run.length >= self.limits.max_tokens:  # cut by the context, not the turn limit
            run.turns += 1
            run.messages.append(assistant_message(content, calls, run.turns))
            return run.end("max_tokens")
        observations = run.act(content, calls, self.limits.max_turns)
        if observations is None:
            return None
        history = run.messages[: len(run.messages) - len(observations)]
        observation = self.observation_ids(history, observations, run.tools, ended)
        if run.length + len(observation) >= self.limits.max_tokens:  # no room left for a model token
            return run.end("max_tokens")
        run.ids += observation
        run.mask += [0] * len(observation)
        run.logprobs += [0.0] * len(observation)
        return None

    def observation_ids(
        self, history: list[Message], observations: list[Message], tools: list[Message] | None, closed: bool
    ) -> list[int]:
        """Tokens between the model's last turn and its next one (the rule of the module docstring)."""
        before = render_messages(self.tokenizer, history, tools, add_generation_prompt=False)
        after = render_messages(self.tokenizer, history + observations, tools, add_generation_prompt=True)
        if not after.startswith(before):
            raise ConfigError(
                "the model's chat template renders earlier turns differently once more turns follow; "
                "multi-turn episodes need a template that only appends"
            )
        ends = [(before.rfind(t) + len(t), i) for t, i in self.end_texts.items() if t in before]
        if not ends:
            raise ConfigError(f"the chat template does not end an assistant turn with {list(self.end_texts)}")
        cut, end_id = max(ends)
        text = before[cut:] + after[len(before) :]
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids if closed else [end_id, *ids]


def run_episodes(
    engine: RolloutEngine,
    make_env: Callable[[], Environment],
    tasks: Sequence[Task],
    sampling: SamplingConfig,
    limits: AgentLimits,
    generator: torch.Generator | None = None,
    keep_cache: bool = True,
) -> list[Episode]:
    """Run one episode per task, batched per turn; see the module docstring (`keep_cache=False`: prefill each
    episode's whole history every turn)."""
    return EpisodeRunner(engine, limits, keep_cache).run(make_env, tasks, sampling, generator)


def episode_batch(episodes: Sequence[Episode], pad_id: int) -> tuple[Rollout, torch.Tensor]:
    """The episodes as a `Rollout` the trainers take, and the loss mask (B, T) float.

    The first prompts are left-padded (P), everything after them right-padded (T): the whole episode after
    its first prompt is the rollout's "completion", and `completion_mask` marks its real tokens (what the
    forward pass attends to: `SharedPromptBatch.from_rollout`), while the loss mask marks the model's own
    tokens only. `ended` is False for an episode a limit cut short."""
    if not episodes:
        raise ValueError("episode_batch needs at least one episode")
    for e in episodes:
        if not e.prompt_ids:
            raise ConfigError(f"task {e.task_id}: the episode never started ({e.error})")
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad_id)  # (B, P)
    b, t = len(episodes), max(len(e.completion_ids) for e in episodes)
    ids = torch.full((b, t), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((b, t), dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((b, t), dtype=torch.float32)  # (B, T)
    logprobs = torch.zeros((b, t), dtype=torch.float32)  # (B, T)
    for i, e in enumerate(episodes):
        n = len(e.completion_ids)
        ids[i, :n] = torch.tensor(e.completion_ids, dtype=torch.long)
        mask[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(e.loss_mask, dtype=torch.float32)
        logprobs[i, :n] = torch.tensor(e.logprobs, dtype=torch.float32)
    ended = torch.tensor([not e.truncated for e in episodes])  # (B,)
    return Rollout(prompt_ids, prompt_mask, ids, mask, logprobs, ended), loss_mask


def episodes_jsonl(episodes: Sequence[Episode]) -> str:
    return "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in episodes)
