"""Trajectory rankings: validation names file:line:field, episodes become the sampler's tokens (token in,
token out) or the template's, and flagged turns land on the turn's own positions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tests.conftest import write_jsonl

from rlhfkit.agents.env import Environment, StepResult, Task
from rlhfkit.agents.episode import AgentLimits, run_episodes
from rlhfkit.data.encoding import encode_preferences, encode_trajectory
from rlhfkit.data.episode_tokens import rendered_tokens, turn_spans
from rlhfkit.data.records import load_preferences
from rlhfkit.data.trajectories import TrajectoryRecord
from rlhfkit.errors import DataError
from rlhfkit.rollout import RolloutEngine, SamplingConfig

CALL = {"id": "call_1_0", "type": "function", "function": {"name": "refund", "arguments": '{"order": 7}'}}
ROW = {
    "prompt": [{"role": "system", "content": "You are support."}, {"role": "user", "content": "Refund 7"}],
    "tools": [{"type": "function", "function": {"name": "refund", "parameters": {"type": "object"}}}],
    "episodes": [
        {"messages": [
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1_0", "content": "refused: shipped"},
            {"role": "assistant", "content": "It was refused: the order has shipped."},
        ]},
        {"messages": [
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1_0", "content": "refused: shipped"},
            {"role": "assistant", "content": "Your refund is on its way!"},
        ], "flags": [1]},
        {"messages": [{"role": "assistant", "content": "Sorry, I cannot help."}]},
    ],
    "ranking": [0, [2, 1]],
    "task_id": "refund-7",
    "env": "support",
}  # fmt: skip


def test_a_trajectory_ranking_loads_with_its_episodes_ranks_and_flags(tmp_path: Path):
    path = write_jsonl(tmp_path / "t.jsonl", [ROW, {"prompt": "p", "chosen": "a", "rejected": "b"}])
    rec, pair = load_preferences(path)
    assert isinstance(rec, TrajectoryRecord) and not isinstance(pair, TrajectoryRecord)
    assert rec.ranks == (0, 1, 1) and rec.pairs() == [(0, 1), (0, 2)]
    assert [e.flags for e in rec.episodes] == [(), (1,), ()]
    assert [e.assistant_turns for e in rec.episodes] == [2, 2, 1]
    assert (rec.task_id, rec.env, rec.tools[0]["function"]["name"]) == ("refund-7", "support", "refund")
    assert rec.conversation(2)[-1] == {"role": "assistant", "content": "Sorry, I cannot help."}
    assert rec.episodes[0].messages[0]["tool_calls"] == [CALL]


def _bad(edit) -> dict:
    row = copy.deepcopy(ROW)
    edit(row)
    return row


TOKENS = {"prompt_ids": [1, 2], "completion_ids": [3, 4, 5], "loss_mask": [1, 0, 1]}
BAD = [
    (lambda r: r.update(prompt="Refund 7"), "prompt", "must be a list of messages"),
    (lambda r: r["prompt"].append({"role": "assistant", "content": "x"}), "prompt",
     "must end with a user turn"),
    (lambda r: r.update(tools=[{"type": "function"}]), "tools[0]", 'must be {"type": "function"'),
    (lambda r: r.update(episodes=r["episodes"][:1]), "episodes", "needs at least 2 episodes, got 1"),
    (lambda r: r["episodes"][1].pop("messages"), "episodes[1].messages", "is missing"),
    (lambda r: r["episodes"][0]["messages"].insert(0, {"role": "tool", "content": "x"}),
     "episodes[0].messages[0].role", "an episode starts with the agent's turn, got 'tool'"),
    (lambda r: r["episodes"][0]["messages"].append({"role": "system", "content": "x"}),
     "episodes[0].messages[3].role", "role 'system' is not one of assistant, tool, user in an episode"),
    (lambda r: r["episodes"][0]["messages"][0]["tool_calls"][0]["function"].update(name=""),
     "episodes[0].messages[0].tool_calls[0].function.name", "is empty"),
    (lambda r: r["episodes"][0]["messages"][0]["tool_calls"][0]["function"].update(arguments=3),
     "episodes[0].messages[0].tool_calls[0].function.arguments", "must be JSON text or an object, got int"),
    (lambda r: r["episodes"][1].update(flags=[2]), "episodes[1].flags[0]", "turn 2 out of range for 2"),
    (lambda r: r["episodes"][1].update(flags=[0, 0]), "episodes[1].flags[1]", "turn 0 appears twice"),
    (lambda r: r["episodes"][0].update(prompt_ids=[1]), "episodes[0].completion_ids",
     "is missing (the token fields prompt_ids, completion_ids, loss_mask go together)"),
    (lambda r: r["episodes"][0].update({**TOKENS, "loss_mask": [1, 0]}), "episodes[0].loss_mask",
     "has 2 entries for 3 completion_ids"),
    (lambda r: r["episodes"][0].update({**TOKENS, "loss_mask": [1, 2, 0]}), "episodes[0].loss_mask[1]",
     "must be 0 or 1, got 2"),
    (lambda r: r["episodes"][0].update({**TOKENS, "completion_ids": [3, -4, 5]}),
     "episodes[0].completion_ids[1]", "must be a non-negative integer, got -4"),
    (lambda r: r["episodes"][2].update(messages=r["episodes"][0]["messages"]), "episodes[2]",
     "is identical to 'episodes[0]'"),
    (lambda r: r.update(ranking=[0, 1]), "ranking", "index 2 missing"),
    (lambda r: r.update(ranking=[0, 1, 3]), "ranking", "index 3 out of range for 3 episodes"),
    (lambda r: r.update(completions=["a", "b"]), "completions", "cannot be combined with 'episodes'"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "field", "message"), BAD)
def test_a_bad_trajectory_row_names_its_file_line_and_field(tmp_path: Path, edit, field, message):
    path = write_jsonl(tmp_path / "t.jsonl", [ROW, _bad(edit)])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert str(info.value).startswith(f"{path}:2: field '{field}': {message}"), str(info.value)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_a_rendered_episode_marks_exactly_the_agents_turns(tmp_path: Path, tokenizer):
    """Without token ids the episode is the template's text: the model's tokens are each assistant turn's
    text and its end-of-turn token, nothing of the tool results, and the trailing newline is not read."""
    (rec,) = load_preferences(write_jsonl(tmp_path / "t.jsonl", [ROW]))
    tokens = rendered_tokens(tokenizer, rec.prompt, rec.tools, list(rec.episodes[1].messages))
    turns = [tokenizer.decode(tokens.completion_ids[a:b]) for a, b in turn_spans(tokens.loss_mask)]
    assert len(turns) == 2 and turns[1] == "Your refund is on its way!<|im_end|>"
    assert '"name": "refund"' in turns[0] and "refused" not in "".join(turns)
    whole = tokenizer.decode(tokens.prompt_ids + tokens.completion_ids)
    assert whole.endswith("Your refund is on its way!<|im_end|>")  # scored where the last turn ends
    assert tokenizer.decode(tokens.prompt_ids).endswith("<|im_start|>assistant\n")
    assert "refund 7" in tokenizer.decode(tokens.prompt_ids).lower()


def test_a_flagged_turn_is_read_before_it_starts_and_where_it_ends(tmp_path: Path, tokenizer):
    (rec,) = load_preferences(write_jsonl(tmp_path / "t.jsonl", [ROW]))
    example = encode_trajectory(tokenizer, rec, max_length=4096, truncation=False)
    assert example is not None and example.ranks == (0, 1, 1)
    ((answer, before, after),) = example.flags
    ids = example.answers[answer].input_ids
    start = example.answers[answer].answer_start
    assert answer == 1
    assert (
        tokenizer.decode(ids[start + before + 1 : start + after + 1])
        == "Your refund is on its way!<|im_end|>"
    )
    assert tokenizer.decode(ids[: start + before + 1]).endswith("<|im_start|>assistant\n")


def test_an_episode_too_long_is_named_or_its_record_dropped(tmp_path: Path, tokenizer):
    (rec,) = load_preferences(write_jsonl(tmp_path / "t.jsonl", [ROW]))
    with pytest.raises(
        DataError, match=r"t\.jsonl:1: field 'episodes\[0\]': is \d+ tokens long with its prompt"
    ):
        encode_trajectory(tokenizer, rec, max_length=60, truncation=False)
    assert encode_preferences([rec], tokenizer, 60, truncation=True) == ([], 1)


class Echo(Environment):
    """Two turns: the first gets a tool result back, the second ends the episode."""

    name = "echo"

    def tasks(self, split):
        return [Task(f"t{i}", f"Say {i}.") for i in range(2)]

    def reset(self, task):
        self.turn = 0
        return [{"role": "user", "content": task.prompt}]

    def step(self, message):
        self.turn += 1
        if self.turn == 1:
            return StepResult([{"role": "tool", "name": "echo", "content": message["content"][:5]}])
        return StepResult([], done=True)


def test_recorded_tokens_are_read_as_sampled(tiny_model: Path, tmp_path: Path):
    """Token in, token out: a record carrying the sampler's ids is encoded to exactly those ids."""
    from rlhfkit.models.loading import load_causal_lm

    model, tok = load_causal_lm(str(tiny_model))
    engine = RolloutEngine(model, tok)
    limits = AgentLimits(max_turns=2, max_tokens=200, max_new_tokens=12)
    tasks = Echo().tasks("train")[:1] * 2
    episodes = run_episodes(
        engine, Echo, tasks, SamplingConfig(temperature=1.0), limits, torch.Generator().manual_seed(0)
    )
    first = next(i for i, m in enumerate(episodes[0].messages) if m["role"] == "assistant")
    row = {
        "prompt": episodes[0].messages[:first],
        "episodes": [
            {"messages": e.messages[first:], "prompt_ids": e.prompt_ids, "completion_ids": e.completion_ids,
             "loss_mask": e.loss_mask, "flags": [1]}
            for e in episodes
        ],
        "ranking": [1, 0],
    }  # fmt: skip
    (rec,) = load_preferences(write_jsonl(tmp_path / "t.jsonl", [json.loads(json.dumps(row))]))
    example = encode_trajectory(tok, rec, max_length=400, truncation=False)
    assert example is not None
    for answer, e in zip(example.answers, episodes, strict=True):
        assert answer.input_ids == tuple(e.prompt_ids + e.completion_ids)
        assert answer.answer_start == len(e.prompt_ids)
    spans = turn_spans(episodes[0].loss_mask)
    assert example.flags[0] == (0, spans[1][0] - 1, spans[1][1] - 1)
