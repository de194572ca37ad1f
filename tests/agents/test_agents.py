"""The multi-turn episode rollout on the tiny model: token in / token out (the trainer's log-probs equal the
sampler's, the loss mask is exactly the model's turns), the end reasons, tool calls and failing tools.

The environments are small ones written here, on the `agents.env` protocol only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.agents.env import Environment, StepResult, Task
from rlhfkit.agents.episode import AgentLimits, EpisodeRunner, EpisodeState, episode_batch, run_episodes
from rlhfkit.agents.registry import load_environment
from rlhfkit.data.toolcalls import ToolCall
from rlhfkit.errors import ConfigError
from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs
from rlhfkit.rollout import RolloutEngine, SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


class AddEnv(Environment):
    """One tool (add); a turn without a call is the answer: reward 1 if it holds the sum."""

    name = "add"

    def __init__(self, n: int = 4) -> None:
        self.n = n
        self.seen: list[dict] = []

    def tools(self):
        return [add]

    def tasks(self, split):
        return [
            Task(f"{split}-{i}", f"What is {i} + {i + 1}?", {"answer": str(2 * i + 1)}) for i in range(self.n)
        ]

    def reset(self, task):
        self.task = task
        return [{"role": "user", "content": task.prompt}]

    def step(self, message):
        self.seen.append(message)
        if message["tool_calls"]:
            results = []
            for call in message["tool_calls"]:
                args = json.loads(call.arguments)
                results.append({"role": "tool", "name": call.name, "content": str(add(**args))})
            return StepResult(results)
        ok = self.task.data["answer"] in message["content"]
        return StepResult([], reward=float(ok), done=True, info={"reason": "answer", "success": ok})


class MoreEnv(AddEnv):
    """Every turn gets a tool result asking for more: only the limits end an episode. No tool schemas in the
    prompt (the tiny model's character tokens make them ~550 tokens)."""

    def tools(self):
        return []

    def step(self, message):
        self.seen.append(message)
        return StepResult([{"role": "tool", "name": "add", "content": "more <b>please</b>"}], reward=0.5)


class BrokenEnv(AddEnv):
    def step(self, message):
        raise RuntimeError("the tool crashed")


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> RolloutEngine:
    from rlhfkit.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_model))
    return RolloutEngine(model, tokenizer)


def tasks(n: int = 3) -> list[Task]:
    return AddEnv(n).tasks("train")


def play(engine, env, n, limits, seed=0, temperature=1.0):
    sampling = SamplingConfig(temperature=temperature)
    return run_episodes(engine, env, tasks(n), sampling, limits, torch.Generator().manual_seed(seed))


def model_runs(episode) -> list[list[int]]:
    """The maximal runs of loss-mask-1 tokens of an episode (its assistant turns)."""
    runs, current = [], []
    for tok, m in zip(episode.completion_ids, episode.loss_mask, strict=True):
        if m:
            current.append(tok)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_equal_the_samplers_on_the_model_tokens(engine: RolloutEngine, temperature: float):
    limits = AgentLimits(max_turns=3, max_tokens=400, max_new_tokens=12)
    eps = play(engine, MoreEnv, 3, limits, 1, temperature)
    assert all(e.turns == 3 and e.reason == "max_turns" for e in eps)
    rollout, loss_mask = episode_batch(eps, engine.pad_token_id)
    with torch.no_grad():
        lp, _ = completion_logprobs(
            engine.model,
            SharedPromptBatch.from_rollout(rollout, engine.pad_token_id),
            temperature,
            entropy=False,
        )
    on = loss_mask.bool()
    assert int(on.sum()) == sum(sum(e.loss_mask) for e in eps) > 3 * 3
    torch.testing.assert_close(lp[on], rollout.logprobs[on], atol=1e-5, rtol=0)
    assert (rollout.logprobs[~on] == 0).all()
    # observations are attended to (they are real tokens of the rollout) but carry no loss
    assert bool((rollout.completion_mask.bool() & ~on).any())


def test_loss_mask_is_exactly_the_assistant_turns_of_the_template(engine: RolloutEngine):
    tok = engine.tokenizer
    limits = AgentLimits(max_turns=3, max_tokens=500, max_new_tokens=10)
    [episode] = play(engine, MoreEnv, 1, limits, 2)
    runs = model_runs(episode)
    assert len(runs) == episode.turns == 3
    texts = [tok.decode(r) for r in runs]  # special tokens kept: the end-of-turn token is the model's
    for text, run in zip(texts, runs, strict=True):
        assert (run[-1] == tok.eos_token_id) == text.endswith("<|im_end|>")
    # the whole token sequence is the template's rendering of the conversation, with the model's turns as
    # sampled; a turn cut at max_new_tokens is closed by an end-of-turn token outside the mask
    from rlhfkit.data.chat_tools import fallback_messages

    rendered = [dict(m) for m in fallback_messages(episode.messages[:1], None)]
    conversation = list(rendered)
    observations = [m for m in episode.messages[1:] if m["role"] != "assistant"]
    for i, text in enumerate(texts):
        conversation.append({"role": "assistant", "content": text.removesuffix("<|im_end|>")})
        if i < len(texts) - 1:
            conversation += fallback_messages([observations[i]], None)
    full = tok.apply_chat_template(conversation, tokenize=False)
    got = tok.decode(episode.prompt_ids + episode.completion_ids)
    closed = runs[-1][-1] == tok.eos_token_id
    # what the template has after the last turn: its end-of-turn token unless the model wrote it, and "\n"
    assert full.startswith(got) and full[len(got) :] == ("\n" if closed else "<|im_end|>\n")
    assert not all(
        r[-1] == tok.eos_token_id for r in runs
    )  # a cut turn was seen (and closed outside the mask)
    assert "<tool_response>\nmore <b>please</b>\n</tool_response>" in got  # rendered as `rlhfkit serve` does
    # the assistant messages hold the decoded text of exactly those tokens
    assert [m["content"] for m in episode.messages if m["role"] == "assistant"] == [
        engine.decode_ids(r) for r in runs
    ]


def test_no_tool_call_ends_with_answer_after_one_turn(engine: RolloutEngine):
    limits = AgentLimits(max_turns=4, max_tokens=1000, max_new_tokens=8)
    episodes = play(engine, AddEnv, 4, limits, 0)
    assert [(e.reason, e.turns) for e in episodes] == [("answer", 1)] * 4
    assert all(e.info["success"] is False and e.reward == 0.0 for e in episodes)
    assert [e.task_id for e in episodes] == ["train-0", "train-1", "train-2", "train-3"]


def test_a_tool_asking_for_more_ends_at_max_turns(engine: RolloutEngine):
    limits = AgentLimits(max_turns=2, max_tokens=600, max_new_tokens=6)
    episodes = play(engine, MoreEnv, 2, limits, 0)
    assert [(e.reason, e.turns, e.reward) for e in episodes] == [("max_turns", 2, 1.0)] * 2
    # the last observation is in the messages (for the report) but not in the tokens: no turn follows it
    assert episodes[0].messages[-1]["role"] == "tool" and episodes[0].loss_mask[-1] == 1


def test_an_episode_over_max_tokens_ends_with_max_tokens(engine: RolloutEngine):
    limits = AgentLimits(max_turns=50, max_tokens=600, max_new_tokens=20)
    episodes = play(engine, MoreEnv, 2, limits, 0)
    for e in episodes:
        assert e.reason == "max_tokens" and 1 < e.turns < 50
        assert e.tokens <= limits.max_tokens
        assert all(len(r) <= limits.max_new_tokens for r in model_runs(e))
    # a first prompt longer than the context never samples
    [e] = play(engine, MoreEnv, 1, AgentLimits(max_tokens=10))
    assert (e.reason, e.turns, e.completion_ids) == ("max_tokens", 0, [])


def test_a_malformed_call_reaches_the_env_as_content_and_a_good_one_as_a_call(engine: RolloutEngine):
    tok = engine.tokenizer
    runner = EpisodeRunner(engine, AgentLimits(max_turns=3, max_tokens=2000))
    env = AddEnv()

    run = EpisodeState(env, env.tasks("test")[0])
    runner.start(run)
    bad = '<tool_call>{"name": "add", "arguments": {"a": 7,</tool_call>'
    ids = tok(bad, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    runner.turn(run, ids, [-0.5] * len(ids), ended=True)
    assert env.seen[-1] == {"role": "assistant", "content": bad, "tool_calls": []}
    assert (run.reason, run.reward) == ("answer", 0.0)  # no call: the env took it as the answer

    env, good = AddEnv(), '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    run = EpisodeState(env, env.tasks("test")[0])
    runner.start(run)
    ids = tok(good, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    runner.turn(run, ids, [-0.5] * len(ids), ended=True)
    assert env.seen[-1]["tool_calls"] == [ToolCall("add", '{"a": 2, "b": 3}')]
    assert run.reason is None and run.messages[-1] == {
        "role": "tool", "name": "add", "content": "5", "tool_call_id": "call_1_0"
    }  # fmt: skip
    assert run.messages[-2]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    text = tok.decode(run.ids)
    assert text.endswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")  # fmt: skip


def test_an_env_that_raises_ends_its_episode_with_env_error(engine: RolloutEngine):
    limits = AgentLimits(max_turns=3, max_tokens=1000, max_new_tokens=6)
    episodes = play(engine, BrokenEnv, 2, limits, 0)
    assert [e.reason for e in episodes] == ["env_error", "env_error"]
    assert episodes[0].error == "step: RuntimeError: the tool crashed" and episodes[0].turns == 1


def test_episode_batch_pads_prompts_left_and_episodes_right(engine: RolloutEngine):
    limits = AgentLimits(max_turns=2, max_tokens=400, max_new_tokens=8)
    episodes = play(engine, MoreEnv, 3, limits, 5)
    rollout, loss_mask = episode_batch(episodes, engine.pad_token_id)
    for i, e in enumerate(episodes):
        p, n = len(e.prompt_ids), len(e.completion_ids)
        assert rollout.prompt_ids[i, -p:].tolist() == e.prompt_ids and rollout.prompt_mask[i].sum() == p
        assert rollout.completion_ids[i, :n].tolist() == e.completion_ids
        assert rollout.completion_mask[i].sum() == n and loss_mask[i, :n].tolist() == e.loss_mask
        assert not bool(rollout.ended[i])  # max_turns: truncated


def test_registry_loads_module_class_and_refuses_the_rest():
    env = load_environment("tests.agents.test_agents:AddEnv", n=2)
    assert type(env).__name__ == "AddEnv" and len(env.tasks("test")) == 2
    with pytest.raises(ConfigError, match="not a bundled environment"):
        load_environment("nosuchenv")
    with pytest.raises(ConfigError, match="is not a subclass of rlhfkit"):
        load_environment("tests.agents.test_agents:add")
    with pytest.raises(ConfigError, match="bad env_settings"):
        load_environment("tests.agents.test_agents:AddEnv", colour="red")


NATIVE = (
    "{% if tools %}<|im_start|>system\nTOOLS{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ToolMoreEnv(MoreEnv):
    def tools(self):
        return [add]


def test_a_tool_aware_template_renders_tools_and_results_natively(tiny_model: Path):
    from rlhfkit.models.loading import load_causal_lm

    model, tok = load_causal_lm(str(tiny_model))
    tok.chat_template = NATIVE
    engine = RolloutEngine(model, tok)
    limits = AgentLimits(max_turns=3, max_tokens=400, max_new_tokens=10)
    [episode] = play(engine, ToolMoreEnv, 1, limits, 3)
    got = tok.decode(episode.prompt_ids + episode.completion_ids)
    assert got.startswith("<|im_start|>system\nTOOLS add<|im_end|>\n<|im_start|>user\nWhat is 0 + 1?")
    assert got.count("<|im_start|>tool\nmore <b>please</b><|im_end|>\n<|im_start|>assistant\n") == 2
    runs = model_runs(episode)
    conversation = [episode.messages[0]]
    for i, run in enumerate(runs):
        conversation.append({"role": "assistant", "content": tok.decode(run).removesuffix("<|im_end|>")})
        if i < len(runs) - 1:
            conversation.append({"role": "tool", "content": "more <b>please</b>"})
    full = tok.apply_chat_template(conversation, tools=[{"type": "function", "function": {"name": "add"}}],
                                   tokenize=False)  # fmt: skip
    assert full.startswith(got) and full[len(got) :] in ("\n", "<|im_end|>\n")
    rollout, loss_mask = episode_batch([episode], engine.pad_token_id)
    with torch.no_grad():
        batch = SharedPromptBatch.from_rollout(rollout, engine.pad_token_id)
        lp, _ = completion_logprobs(model, batch, 1.0, entropy=False)
    on = loss_mask.bool()
    torch.testing.assert_close(lp[on], rollout.logprobs[on], atol=1e-5, rtol=0)
