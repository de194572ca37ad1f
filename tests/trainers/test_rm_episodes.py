"""The reward model over agent episodes: it learns a planted preference from trajectory rankings, its loss
with flagged turns is the hand-computed one, `score` reads episodes as plain transformers does, and DPO
refuses episodes with a line that says where they go."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import read_metrics, write_jsonl
from tests.helpers import dpo_config, rm_config

from rlhfkit.data.encoding import pad
from rlhfkit.errors import DataError
from rlhfkit.rewards.mix import sequence_rewards
from rlhfkit.trainers.dpo import run_dpo
from rlhfkit.trainers.rm import RMTrainer, prepare_rm, run_rm

pytestmark = pytest.mark.usefixtures("one_thread")


def tool_episode(a: int, b: int) -> list[dict]:
    call = {"id": "call_1_0", "type": "function", "function": {"name": "add", "arguments": f'{{"a": {a}}}'}}
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1_0", "content": str(a + b)},
        {"role": "assistant", "content": f"It is {a + b}."},
    ]


def guess_episode(a: int, b: int, rng: random.Random) -> list[dict]:
    guess = a + b + rng.choice([-1, 1])
    return [
        {"role": "assistant", "content": "Hmm, let me see."},
        {"role": "user", "content": "Well?"},
        {"role": "assistant", "content": f"It is {guess}."},
    ]


def tool_rankings(n: int, seed: int) -> list[dict]:
    """Episodes that call the tool are preferred to episodes of as many turns that guess."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10, 99), rng.randrange(10, 99)
        episodes = [{"messages": tool_episode(a, b)}, {"messages": guess_episode(a, b, rng)}]
        best = rng.randrange(2)
        if best:
            episodes.reverse()
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}?"}], "episodes": episodes,
                     "ranking": [best, 1 - best]})  # fmt: skip
    return rows


@pytest.mark.slow
def test_a_reward_model_learns_a_planted_preference_over_episodes(tiny_model: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "episodes.jsonl", tool_rankings(96, seed=0))
    out = tmp_path / "rm"
    run_rm(rm_config(tiny_model, data, out, "data.eval_fraction=0.25", "train.lr=3e-3", "train.batch_size=8",
                     "train.epochs=3", "train.warmup_steps=3"))  # fmt: skip
    assert read_metrics(out, "eval")[-1]["accuracy"] > 0.9  # 24 held-out tasks; chance is 50%

    # `rlhfkit score` on the episodes: one reward per episode; the tool-calling one scores higher
    scored = tmp_path / "scored.jsonl"
    held = write_jsonl(tmp_path / "held.jsonl", tool_rankings(16, seed=7))
    cmd = [sys.executable, "-m", "rlhfkit.cli", "score", "--reward", str(out), "--data", str(held)]
    proc = subprocess.run([*cmd, "--output", str(scored)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    right = sum(r["rewards"][r["ranking"][0]] > r["rewards"][r["ranking"][1]] for r in rows)
    assert right >= 14, [r["rewards"] for r in rows]


def test_the_loss_with_a_flagged_turn_is_the_hand_computed_value(tiny_model: Path, tmp_path: Path):
    """Pair loss softplus(-(r_0 - r_1)) plus coef x softplus(-(r(before) - r(after))), where the scores
    before and after the flagged turn are those of the sequence cut there (read from the same pass)."""
    row = tool_rankings(1, seed=3)[0]
    row["episodes"][row["ranking"][1]]["flags"] = [1]  # the worse episode's final turn went wrong
    cfg = rm_config(tiny_model, write_jsonl(tmp_path / "d.jsonl", [row]), tmp_path / "o",
                    "data.eval_fraction=0", "turn_flag_coef=0.5")  # fmt: skip
    train, _, _ = prepare_rm(cfg)
    trainer = RMTrainer(cfg, train, [], [])
    batch = trainer.collate(train)
    ((answer, before, after),) = train[0].flags
    assert answer == row["ranking"][1]
    seq = list(train[0].answers[answer].input_ids)
    start = train[0].answers[answer].answer_start
    seqs = [list(a.input_ids) for a in train[0].answers]
    seqs += [seq[: start + before + 1], seq[: start + after + 1]]  # the episode cut before and after
    with torch.no_grad():
        r = sequence_rewards(trainer.model, *pad(seqs, trainer.tokenizer.pad_token_id))  # (4,)
        loss, sums = trainer.loss(trainer.model, batch)
    softplus = torch.nn.functional.softplus
    best, worst = row["ranking"]
    expected = softplus(-(r[best] - r[worst])) + 0.5 * softplus(-(r[2] - r[3]))
    torch.testing.assert_close(loss, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(sums["turn_flag_drop"], r[2] - r[3], atol=2e-6, rtol=0)
    assert seq[start + after] == trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")  # the turn's end


def test_dpo_refuses_episode_rankings_naming_the_record(tiny_model: Path, tmp_path: Path):
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, *tool_rankings(1, 0)]
    )
    with pytest.raises(
        DataError, match=r"d\.jsonl:2: field 'episodes': dpo trains on answers; rankings of agent"
    ):
        run_dpo(dpo_config(tiny_model, data, tmp_path / "o", "data.eval_fraction=0"))
