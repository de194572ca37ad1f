"""Step B on tiny models: the score is padding-invariant, the model learns a held-out rule, the loss is the
hand-computed one, accumulation is exact, and the saved directory is a plain transformers reward model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import read_metrics, write_jsonl
from tests.helpers import good_word_pairs, good_word_rankings, max_diff, rm_config

from rlhfkit.data.encoding import pad, prompt_answer_ids
from rlhfkit.errors import RlhfkitError
from rlhfkit.losses import ranking_loss
from rlhfkit.models.loading import build_reward_model, init_head, reward_parts
from rlhfkit.models.tiny import make_tiny_model
from rlhfkit.rewards.mix import RewardModelScorer, score_file, sequence_rewards
from rlhfkit.trainers import rm
from rlhfkit.trainers.rm import RMTrainer, prepare_rm, run_rm


def ids_of(tokenizer, prompt, answer) -> list[int]:
    p_ids, a_ids = prompt_answer_ids(tokenizer, prompt, answer)
    return p_ids + a_ids


metrics = read_metrics


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A reward model trained on the "good" rule, 25% of the pairs held out; (output dir, data file)."""
    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root / "good.jsonl", good_word_pairs(128, seed=0))
    out = root / "rm"
    run_rm(rm_config(tiny_model, data, out, "data.eval_fraction=0.25", "normalize=shift_scale",
                     "train.lr=3e-3", "train.batch_size=16", "train.epochs=5",
                     "train.warmup_steps=3"))  # fmt: skip
    return out, data


# ------------------------------------------------------------------------------------------ the score
def test_reward_ignores_padding_side_batch_size_and_companions(tiny_model: Path):
    torch.manual_seed(0)
    model, tokenizer = build_reward_model(str(tiny_model))
    texts = [("Item 1:", " good cold"), ("Item 22:", " a much longer answer with many more characters"),
             ("Q:", " x"), ("Item 3:", " blue warm slow")]  # fmt: skip
    seqs = [ids_of(tokenizer, p, a) for p, a in texts]
    seqs.append(seqs[0][:-3])  # a truncated generation: no EOS, scored at its last token
    with torch.no_grad():
        alone = torch.stack([sequence_rewards(model, *pad([s], tokenizer.pad_token_id)) for s in seqs])[:, 0]
        right = sequence_rewards(model, *pad(seqs, tokenizer.pad_token_id, side="right"))  # (5,)
        left = sequence_rewards(model, *pad(seqs, tokenizer.pad_token_id, side="left"))  # (5,)
        pairs = sequence_rewards(model, *pad([seqs[0], seqs[1]], tokenizer.pad_token_id))  # (2,)
        plain = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])  # transformers
        ids, mask, _ = pad(seqs, tokenizer.pad_token_id)
        plain_batch = model(input_ids=ids, attention_mask=mask).logits[:, 0]  # right padding: HF is correct
    assert alone.std() > 1e-2  # the rewards differ, so the comparisons below can fail
    for other in (right, left, plain, plain_batch):
        torch.testing.assert_close(other, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(pairs, alone[:2], atol=1e-5, rtol=0)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id == seqs[0][-1]


def test_head_initialisation_std(tmp_path: Path):
    # A 2048-wide head has 2048 N(0, s^2) weights: the sample std has relative standard error
    # 1/sqrt(2 * 2048) = 1.6%, so 8% is 5 standard errors (a false failure has probability < 1e-6), while a
    # wrong rule is far outside: transformers' default std 0.02 is 10% below 1/sqrt(2049) = 0.0221, and
    # 1/sqrt(2048) is only 0.02% away (the +1 matters for tiny heads only).
    wide = make_tiny_model(tmp_path / "wide", hidden_size=2048, num_layers=1, intermediate_size=64)
    torch.manual_seed(1)
    model, _ = build_reward_model(str(wide))
    weight = model.score.weight.detach().flatten()  # (2048,)
    expected = 1 / math.sqrt(2048 + 1)
    assert abs(float(weight.std()) / expected - 1) < 0.08
    assert abs(float(weight.mean())) < 5 * expected / math.sqrt(2048)
    assert model.score.bias is None  # Llama's head has no bias ...
    head = torch.nn.Linear(2048, 1, bias=True)
    torch.nn.init.constant_(head.bias, 3.0)
    init_head(head)
    assert float(head.bias.detach()) == 0.0  # ... a head that has one starts at 0
    for module in model.modules():
        assert not isinstance(module, torch.nn.Dropout) or module.p == 0.0


# ------------------------------------------------------------------------------------------ learning
def test_learns_held_out_rule(trained: tuple[Path, Path]):
    out, _ = trained
    train, evals = metrics(out, "train"), metrics(out, "eval")
    assert train[0]["loss"] > 0.5  # starts near chance: ln 2 = 0.69
    # 32 held-out pairs never trained on; chance is 50% (the two answers differ only in one word and have
    # the same length), so >= 90% (at most 3 errors) means the model learned to spot "good" in new answers
    assert evals[-1]["accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["margin"] > 0
    calibration = metrics(out, "calibration")
    assert len(calibration) == 10 and sum(r["count"] for r in calibration) == 2 * 32
    for low, high in zip(calibration, reversed(calibration), strict=True):  # both orderings: symmetric
        assert low["count"] == high["count"]


def test_ranking_data_learns_with_ties(tiny_model: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "rank.jsonl", good_word_rankings(64, seed=1))
    out = tmp_path / "rm"
    run_rm(rm_config(tiny_model, data, out, "data.eval_fraction=0.25", "train.lr=3e-3", "train.batch_size=8",
                     "train.epochs=4", "train.warmup_steps=3"))  # fmt: skip
    # 16 held-out prompts x 5 comparable pairs each (the tie makes no pair); chance is 50%
    assert metrics(out, "eval")[-1]["accuracy"] >= 0.9


def test_ranking_loss_is_the_hand_computed_value(tiny_model: Path, tmp_path: Path, monkeypatch):
    rows = [{"prompt": "Item 1:", "completions": [" a", " b", " c", " d"], "ranking": [0, [1, 2], 3]},
            {"prompt": "Item 2:", "chosen": " yes", "rejected": " no", "margin": 0.5}]  # fmt: skip
    cfg = rm_config(
        tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "o", "data.eval_fraction=0"
    )
    train, _, _ = prepare_rm(cfg)
    trainer = RMTrainer(cfg, train, [], [])
    batch = trainer.collate(train)
    assert batch["batch"].rows == 6 and batch["num_items"] == 2  # one pass, items = prompts
    assert batch["batch"].prompt_ids.shape[0] == 2  # each prompt runs once for all its answers

    # with the model's own rewards (a plain padded forward): the shared-prompt batched path equals the
    # per-prompt InstructGPT loss
    seqs = [list(a.input_ids) for ex in train for a in ex.answers]
    with torch.no_grad():
        rewards = sequence_rewards(trainer.model, *pad(seqs, trainer.tokenizer.pad_token_id))  # (6,)
    loss_sum, _ = trainer.loss(trainer.model, batch)
    per_prompt = ranking_loss(rewards[:4], [0, 1, 1, 2])[0] + torch.nn.functional.softplus(
        -(rewards[4] - rewards[5] - 0.5)
    )
    torch.testing.assert_close(loss_sum.detach(), per_prompt, atol=2e-6, rtol=0)

    # with known rewards: ranks [0, 1, 1, 2] -> pairs (0,1) (0,2) (0,3) (1,3) (2,3), differences 1 1 2 1 1:
    # (4 ln(1 + e^-1) + ln(1 + e^-2)) / 5 = (4 * 0.31326169 + 0.12692801) / 5 = 0.27599495;
    # the pair: 0.3 - (-0.2) - margin 0.5 = 0 -> ln 2 = 0.69314718. Sum over the 2 prompts: 0.96914213.
    known = torch.tensor([2.0, 1.0, 1.0, 0.0, 0.3, -0.2])
    monkeypatch.setattr(rm, "shared_sequence_rewards", lambda *args: known)
    loss_sum, sums = trainer.loss(trainer.model, batch)
    assert abs(float(loss_sum) - 0.96914213) < 1e-6
    assert float(sums["accuracy"]) == 2.0  # every comparable pair is ordered right, in both prompts
    assert abs(float(sums["margin"]) - (1.2 + 0.5)) < 1e-6  # mean difference per prompt, summed


def test_gradient_accumulation_equivalence(tiny_model: Path, tmp_path: Path):
    # pairs with margins and rankings of K = 4 with ties, mixed: batch 8 x 1 == 4 micro-batches of 2
    rows = good_word_pairs(8, seed=3) + good_word_rankings(8, seed=4)
    for i, row in enumerate(rows[:8]):
        row["margin"] = 0.25 * i
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    sets = [
        "data.eval_fraction=0",
        "train.max_steps=4",
        "train.lr=3e-3",
        "train.batch_size=8",
        "centering_coef=0.01",
    ]
    run_rm(rm_config(tiny_model, data, tmp_path / "a", *sets, "train.grad_accum=1"))
    run_rm(rm_config(tiny_model, data, tmp_path / "b", *sets, "train.grad_accum=4"))
    assert max_diff(tmp_path / "a", tmp_path / "b") <= 1e-5
    loss_a = [m["loss"] for m in metrics(tmp_path / "a", "train")]
    loss_b = [m["loss"] for m in metrics(tmp_path / "b", "train")]
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    from safetensors.torch import load_file

    first, last = (
        load_file(str(tiny_model / "model.safetensors")),
        load_file(str(tmp_path / "a" / "model.safetensors")),
    )
    assert max(float((first[k] - last[k]).abs().max()) for k in first) > 1e-3  # the weights did move


# ------------------------------------------------------------------------------------------ the saved model
@pytest.mark.slow
def test_saved_dir_is_plain_transformers_and_matches_cli_score(trained: tuple[Path, Path], tmp_path: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, data = trained
    scored = tmp_path / "scored.jsonl"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "score", "--reward", str(out), "--data", str(data)]
    proc = subprocess.run([*cmd, "--output", str(scored)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(x) for x in scored.read_text().splitlines()]

    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)  # no rlhfkit
    tokenizer = AutoTokenizer.from_pretrained(out)
    shift, scale = model.config.rlhfkit_reward_shift, model.config.rlhfkit_reward_scale
    assert scale != 1.0  # normalize=shift_scale
    with torch.no_grad():
        for row in results[:12]:
            for field in ("chosen", "rejected"):
                ids = ids_of(tokenizer, row["prompt"], row[field])
                raw = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
                assert abs((raw - shift) / scale - row[f"reward_{field}"]) <= 1e-5

    # calibration set = every answer of the preference data: normalised mean 0, std 1 (shift_scale)
    rewards = torch.tensor([r[k] for r in results for k in ("reward_chosen", "reward_rejected")])
    assert abs(float(rewards.mean())) <= 1e-4
    assert abs(float(rewards.std(unbiased=False)) - 1.0) <= 1e-4


def test_lora_reward_model_trains_head_and_saves_merged(tiny_model: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "good.jsonl", good_word_pairs(16, seed=5))
    out = tmp_path / "lora"
    cfg = rm_config(tiny_model, data, out, "data.eval_fraction=0", "train.max_steps=3", "train.lr=1e-2",
                    "lora.enabled=true", "lora.r=4")  # fmt: skip
    trainer = RMTrainer(cfg, *prepare_rm(cfg))
    head_before = reward_parts(trainer.model)[1].weight.detach().clone()
    trainer.run()
    assert not torch.equal(reward_parts(trainer.model)[1].weight, head_before)  # the head is trained too
    sequences = [ex.input_ids for ex in trainer.calibration[:6]]
    raw = rm.score_sequences(trainer.model, sequences, trainer.tokenizer.pad_token_id)  # adapters live
    scorer = RewardModelScorer(out)  # merged weights, no peft
    torch.testing.assert_close(scorer.score_token_ids(sequences), scorer.normalize(raw), atol=1e-5, rtol=0)


def test_score_sft_records_to_stdout_and_refuse_a_causal_lm(
    trained: tuple[Path, Path], tiny_model: Path, tmp_path: Path, capsys
):
    out, _ = trained
    rows = [
        {"prompt": "Item 5:", "completion": " good blue cold warm"},
        {"messages": [{"role": "user", "content": "Item 5:"}, {"role": "assistant", "content": " x"}]},
    ]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)  # fmt: skip
    assert score_file(str(out), str(data)) == 2
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    scorer = RewardModelScorer(out)
    expected = scorer.score(
        ["Item 5:", [rows[1]["messages"][0]]], [" good blue cold warm", [rows[1]["messages"][1]]]
    )
    assert [x["reward"] for x in lines] == pytest.approx(expected.tolist(), abs=1e-6)
    assert lines[0]["prompt"] == "Item 5:"  # the record is passed on, with the reward added
    with pytest.raises(RlhfkitError, match="not a reward model"):
        RewardModelScorer(tiny_model)


GOOD = {"prompt": "Item 1:", "chosen": " good", "rejected": " blue"}
BAD_RECORDS = {
    "missing_rejected": ({"prompt": "Item 2:", "chosen": " good"}, "field 'rejected': is missing"),
    "identical": ({"prompt": "Item 2:", "chosen": " good", "rejected": " good"},
                  "field 'rejected': is identical to 'chosen'"),
    "empty_answer": ({"prompt": "Item 2:", "chosen": "  ", "rejected": " blue"}, "field 'chosen': is empty"),
    "not_a_permutation": ({"prompt": "Item 2:", "completions": [" a", " b", " c"], "ranking": [0, 0, 1]},
                          "field 'ranking': index 0 appears twice"),
}  # fmt: skip


@pytest.mark.slow
def test_cli_bad_preference_data_exits_2_names_the_field_and_writes_nothing(tiny_model: Path, tmp_path: Path):
    procs = {}
    for name, (bad, _) in BAD_RECORDS.items():  # the four commands run side by side
        data = write_jsonl(tmp_path / f"{name}.jsonl", [GOOD, bad])
        cmd = [sys.executable, "-m", "rlhfkit.cli", "rm", "--model", str(tiny_model), "--data", str(data),
               "--output", str(tmp_path / f"out-{name}")]  # fmt: skip
        procs[name] = (data, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for name, (data, proc) in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr)
        assert stderr.strip().splitlines() == [f"error: {data}:2: {BAD_RECORDS[name][1]}"], name
        assert not (tmp_path / f"out-{name}").exists()
