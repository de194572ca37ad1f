"""Evaluation: win-rate and interval math by hand, KL against a plain per-row forward, and run_eval on tiny
models (policy == reference gives KL 0 and win rate 0.5; two different models match a recomputation)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from tests.helpers import eval_prompts, perturbed_model, reward_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.data.encoding import prompt_answer_ids, prompt_ids
from rlhfkit.errors import ConfigError
from rlhfkit.evaluation.evaluate import (
    ALPACAEVAL_HUMAN_AGREEMENT,
    EvalConfig,
    outcomes,
    ranking_accuracy,
    run_eval,
    sequence_kl,
    win_rate,
)
from rlhfkit.models.loading import eos_token_ids, load_causal_lm
from rlhfkit.rollout import RolloutEngine, SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 12


VOWEL_GOLD = "tests.applications.test_evaluate:vowel_gold"


def vowel_gold(prompt: str, answer: str) -> float:
    """A custom gold preference for the tests (loaded as `VOWEL_GOLD`): more vowels."""
    return float(sum(ch in "aeiouAEIOU" for ch in answer))


# ------------------------------------------------------------------------------------------ math by hand
def test_all_ties_give_one_half_with_a_zero_width_interval():
    wr = win_rate([0.5] * 7)
    assert (wr.rate, wr.stderr, wr.low, wr.high) == (0.5, 0.0, 0.5, 0.5)
    assert (wr.wins, wr.ties, wr.losses) == (0, 7, 0)


def test_win_rate_interval_on_known_outcomes():
    # o = [1, 1, 0, 0.5]: mean 0.625; squared deviations 0.140625 + 0.140625 + 0.390625 + 0.015625 = 0.6875;
    # s^2 = 0.6875 / 3 = 0.229167, s = 0.478714, se = s / 2 = 0.239357; z = 1.959964
    # low = 0.625 - 0.469131 = 0.155869; high = 1.094131, clipped to 1
    wr = win_rate([1.0, 1.0, 0.0, 0.5])
    assert wr.rate == 0.625
    assert wr.stderr == pytest.approx(0.239357, abs=1e-6)
    assert wr.low == pytest.approx(0.155869, abs=1e-6)
    assert wr.high == 1.0
    assert (wr.wins, wr.ties, wr.losses) == (2, 1, 1)
    # 50 wins, 50 losses: s = sqrt(100 * 0.25 / 99) = 0.502519, se = 0.0502519, half width 0.0984919
    wr = win_rate([1.0, 0.0] * 50)
    assert wr.rate == 0.5
    assert (wr.low, wr.high) == (pytest.approx(0.401508, abs=1e-6), pytest.approx(0.598492, abs=1e-6))
    # a 90% interval is narrower: z = 1.644854
    assert win_rate([1.0, 0.0] * 50, confidence=0.90).low == pytest.approx(0.5 - 0.0826570, abs=1e-6)


def test_one_prompt_uses_the_worst_case_spread():
    wr = win_rate([1.0])  # s = 0.5 (the largest for outcomes in [0, 1]): 1 - 1.96 * 0.5 = 0.020018
    assert wr.stderr == 0.5
    assert wr.low == pytest.approx(0.020018, abs=1e-6)
    assert wr.high == 1.0


def test_outcomes_tie_within_tolerance():
    assert outcomes([1.0, 0.0, 2.0 + 1e-12, -3.0], [0.0, 1.0, 2.0, -3.5]) == [1.0, 0.0, 0.5, 1.0]


def test_ranking_accuracy_by_hand():
    # pairs (0,1): gold 1 > 0, scores 0.5 > 0.1 agree; (0,2): gold 1 < 2 but 0.5 > 0.2; (1,2): agree -> 2/3
    assert ranking_accuracy([[1.0, 0.0, 2.0]], [[0.5, 0.1, 0.2]]) == (pytest.approx(2 / 3), 3)
    # gold tie (0,1) skipped; (0,2) agrees; (1,2) is a score tie, worth 1/2 -> 1.5 / 2; prompt 2 adds 1 of 1
    assert ranking_accuracy([[1.0, 1.0, 0.0], [0.0, 5.0]], [[3.0, 2.0, 2.0], [0.0, 1.0]]) == (2.5 / 3, 3)
    assert ranking_accuracy([[1.0, 1.0]], [[0.0, 1.0]]) == (None, 0)


# ------------------------------------------------------------------------------------------ tiny models


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    return {
        "reference": perturbed_model(tiny_model, root / "reference", seed=1),
        "policy": perturbed_model(tiny_model, root / "policy", seed=2),
        "reward": reward_model(tiny_model, root / "rm"),
    }


def test_sequence_kl_matches_a_plain_forward_per_row(models: dict[str, Path]):
    policy, tokenizer = load_causal_lm(str(models["policy"]))
    reference, _ = load_causal_lm(str(models["reference"]))
    engine = RolloutEngine(policy, tokenizer, eos_token_ids(tokenizer, policy))
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": "Hi" + "!" * i}]) for i in range(4)]
    rollout = engine.generate(
        prompts, SamplingConfig(MAX_NEW, temperature=1.0), torch.Generator().manual_seed(0)
    )
    kl = sequence_kl(policy, reference, rollout, tokenizer.pad_token_id)  # (B,)
    for b, prompt in enumerate(prompts):  # unpadded, one row at a time, no masks involved
        answer = rollout.completion_ids[b][rollout.completion_mask[b].bool()].tolist()
        ids = torch.tensor([prompt + answer])  # (1, L)
        targets = ids[0, len(prompt) :]  # (T_b,)
        per_model = []
        for model in (policy, reference):
            lp = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)  # (T_b, V)
            per_model.append(lp.gather(1, targets[:, None]).sum().detach())
        assert float(kl[b]) == pytest.approx(float(per_model[0] - per_model[1]), abs=1e-4)
    assert float(kl.mean()) > 0.05  # two different models: clearly positive on average
    # the evaluation's shortcut: the sampler's own log-probs at temperature 1 stand in for the policy pass
    torch.testing.assert_close(
        sequence_kl(policy, reference, rollout, tokenizer.pad_token_id, sampled_at_t1=True),
        kl,
        atol=1e-4,
        rtol=0,
    )


def test_policy_equal_to_reference_gives_zero_kl_and_one_half(models: dict[str, Path], tmp_path: Path):
    copy = tmp_path / "same"
    shutil.copytree(models["reference"], copy)  # loaded twice, as two separate models
    cfg = EvalConfig(
        policy=str(copy), reference=str(models["reference"]), prompts=str(eval_prompts(tmp_path / "p.jsonl")),
        output=str(tmp_path / "eval"), max_new_tokens=MAX_NEW, batch_size=4, kl_samples=2,
    )  # fmt: skip
    res = run_eval(cfg)
    assert abs(res["kl"]["mean"]) <= 1e-4
    assert res["win_rate"]["rate"] == 0.5 and res["win_rate"]["low"] == res["win_rate"]["high"] == 0.5
    assert res["win_rate"]["ties"] == 6
    assert res["gold"]["policy"] == res["gold"]["reference"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["policy_answer"] == r["reference_answer"] for r in rows)
    assert all(abs(s["kl"]) <= 1e-4 for r in rows for s in r["samples"]) and len(rows[0]["samples"]) == 2
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == res
    assert not list((tmp_path / "eval").glob(".*tmp*"))  # no temporary file left behind


def test_two_models_match_a_recomputation(models: dict[str, Path], tmp_path: Path):
    cfg = EvalConfig(
        policy=str(models["policy"]), reference=str(models["reference"]), reward=str(models["reward"]),
        prompts=str(eval_prompts(tmp_path / "p.jsonl", n=8)), gold=VOWEL_GOLD,
        output=str(tmp_path / "eval"), max_new_tokens=MAX_NEW, batch_size=3, kl_samples=2, limit=7, seed=3,
    )  # fmt: skip
    res = run_eval(cfg)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert res["n_prompts"] == len(rows) == 7

    # greedy answers: plain transformers generate, one unpadded prompt at a time
    for who in ("reference", "policy"):
        model = AutoModelForCausalLM.from_pretrained(models[who])
        _, tokenizer = load_causal_lm(str(models[who]))
        for row in rows[:3]:
            ids = torch.tensor([prompt_ids(tokenizer, row["prompt"])])
            out = model.generate(
                ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :]  # fmt: skip
            assert row[f"{who}_answer"] == tokenizer.decode(out, skip_special_tokens=True)
            assert row[f"{who}_tokens"] == len(out)

    # gold, outcomes, win rate and means from the stored answers
    for row in rows:
        for who in ("reference", "policy"):
            assert row[f"{who}_gold"] == vowel_gold("", row[f"{who}_answer"])
    wins = sum(r["policy_gold"] > r["reference_gold"] for r in rows)
    ties = sum(r["policy_gold"] == r["reference_gold"] for r in rows)
    assert wins > 0 and wins + ties < len(rows)  # the two models answer differently: wins and losses
    assert res["win_rate"]["rate"] == pytest.approx((wins + 0.5 * ties) / len(rows))
    assert (res["win_rate"]["wins"], res["win_rate"]["ties"]) == (wins, ties)
    for who in ("reference", "policy"):
        assert res["gold"][who] == pytest.approx(statistics.fmean(r[f"{who}_gold"] for r in rows))
        assert res["length_words"][who] == pytest.approx(
            statistics.fmean(len(r[f"{who}_answer"].split()) for r in rows)
        )
        assert res["length_tokens"][who] == pytest.approx(statistics.fmean(r[f"{who}_tokens"] for r in rows))
        assert res["eos_rate"][who] == pytest.approx(statistics.fmean(r[f"{who}_ended"] for r in rows))

    # KL: mean and standard error of the per-sample values
    kls = [s["kl"] for r in rows for s in r["samples"]]
    assert len(kls) == res["kl"]["samples"] == 14
    assert res["kl"]["mean"] == pytest.approx(statistics.fmean(kls))
    assert res["kl"]["stderr"] == pytest.approx(statistics.stdev(kls) / math.sqrt(14))
    assert res["kl"]["mean"] > 0.05

    # reward-model scores: plain transformers on each unpadded prompt + answer
    rm = AutoModelForSequenceClassification.from_pretrained(models["reward"]).eval()
    _, rm_tokenizer = load_causal_lm(str(models["reward"]))
    for row in rows[:3]:
        for who in ("reference", "policy"):
            p_ids, a_ids = prompt_answer_ids(rm_tokenizer, row["prompt"], row[f"{who}_answer"])
            with torch.no_grad():
                raw = rm(input_ids=torch.tensor([p_ids + a_ids])).logits[0, 0]
            assert row[f"{who}_rm"] == pytest.approx(float(raw), abs=1e-4)
    for who in ("reference", "policy"):
        assert res["reward_model"][who] == pytest.approx(statistics.fmean(r[f"{who}_rm"] for r in rows))

    # RM accuracy against gold: every different-gold pair of a prompt's answers, by a plain loop
    agree = pairs = 0.0
    for row in rows:
        answers = [(row["reference_gold"], row["reference_rm"]), (row["policy_gold"], row["policy_rm"])]
        answers += [(s["gold"], s["rm"]) for s in row["samples"]]
        for i, (gi, ri) in enumerate(answers):
            for gj, rj in answers[i + 1 :]:
                if gi != gj:
                    pairs += 1
                    agree += 0.5 if ri == rj else float((gi > gj) == (ri > rj))
    assert pairs > 0
    assert res["rm_accuracy"]["pairs"] == pairs
    assert res["rm_accuracy"]["accuracy"] == pytest.approx(agree / pairs)
    assert res["rm_accuracy"]["human_agreement"] == ALPACAEVAL_HUMAN_AGREEMENT == 0.657
    assert res["config"]["gold"] == "tests.applications.test_evaluate:vowel_gold"


def test_best_of_n_picks_the_reward_models_favourite(models: dict[str, Path], tmp_path: Path):
    cfg = EvalConfig(
        policy=str(models["policy"]), reference=str(models["reference"]), reward=str(models["reward"]),
        prompts=str(eval_prompts(tmp_path / "p.jsonl", n=5)), gold=VOWEL_GOLD,
        output=str(tmp_path / "eval"), max_new_tokens=MAX_NEW, batch_size=4, best_of=3, seed=1,
    )  # fmt: skip
    res = run_eval(cfg)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    picked = []
    for row in rows:
        candidates = row["best_of_n"]
        assert len(candidates) == 3 and len({c["answer"] for c in candidates}) > 1  # sampled at T=1
        best = max(range(3), key=lambda j: candidates[j]["rm"])
        assert row["best_of_n_pick"] == best
        picked.append(vowel_gold("", candidates[best]["answer"]))
    outcome = [
        1.0 if g > r["reference_gold"] else 0.0 if g < r["reference_gold"] else 0.5
        for g, r in zip(picked, rows, strict=True)
    ]
    assert res["best_of_n"]["n"] == 3
    assert res["best_of_n"]["win_rate"]["rate"] == pytest.approx(statistics.fmean(outcome))
    assert res["best_of_n"]["gold"] == pytest.approx(statistics.fmean(picked))
    assert "rm_accuracy" in res and res["kl"]["samples"] == 5  # the rest of the evaluation is unchanged
    assert "best_of_n" not in run_eval(dataclasses.replace(cfg, reward=None, output=str(tmp_path / "e2")))


def test_bad_settings_are_user_errors(models: dict[str, Path], tmp_path: Path):
    prompts = str(eval_prompts(tmp_path / "p.jsonl"))
    with pytest.raises(ConfigError, match="kl_samples"):
        run_eval(EvalConfig(policy="x", reference="y", prompts=prompts, kl_samples=0))
    with pytest.raises(ConfigError, match="expected module:function"):
        run_eval(EvalConfig(policy="x", reference="y", prompts=prompts, gold="no_colon"))
    assert not (tmp_path / "runs").exists()
