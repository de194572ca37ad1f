"""DPO on tiny models: the loss wiring is the hand-computed one, the one-pass log-probs equal separate passes,
the reference runs once per dataset (cached, reused on resume, invalidated by a data change), the policy
learns a held-out preference rule, resume is exact, and bad data is a one-line error with exit code 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests.conftest import read_metrics, write_jsonl
from tests.helpers import dpo_config, good_word_pairs, good_word_rankings, max_diff
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.models.prefix import SharedPromptBatch
from rlhfkit.trainers import dpo
from rlhfkit.trainers.dpo import CACHE_FILE, DPOTrainer, prepare_dpo, run_dpo

metrics = read_metrics


@pytest.fixture()
def count_reference(monkeypatch) -> dict[str, int]:
    """Counts reference passes and the answers they score."""
    counts = {"passes": 0, "answers": 0}
    original = dpo.reference_logprobs

    def counted(model, sequences, pad_id, batch_size):
        counts["passes"] += 1
        counts["answers"] += len(sequences)
        return original(model, sequences, pad_id, batch_size)

    monkeypatch.setattr(dpo, "reference_logprobs", counted)
    return counts


# ------------------------------------------------------------------------------------------ the loss
def test_pair_loss_is_the_hand_computed_value(tiny_model: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "d.jsonl", good_word_pairs(2, seed=0))
    cfg = dpo_config(tiny_model, data, tmp_path / "o", "data.eval_fraction=0")
    trainer = DPOTrainer(cfg, *prepare_dpo(cfg))
    # rows: chosen of pair 1, chosen of pair 2, rejected of pair 1, rejected of pair 2
    logprobs = torch.tensor([-2.0, -8.0, -3.0, -4.0])  # (S,) policy, summed over answer tokens
    batch = {"ref_logprobs": torch.tensor([-4.0, -8.0, -2.0, -4.0]),
             "answer_tokens": torch.tensor([2, 4, 1, 2]), "num_items": 2}  # fmt: skip

    # sigmoid, beta 0.1, sums: h1 = (-2 + 4) - (-3 + 2) = 3, h2 = (-8 + 8) - (-4 + 4) = 0
    #   log(1 + e^-0.3) + log 2 = 0.55435524 + 0.69314718 = 1.24750242
    loss_sum, sums = trainer.pair_loss(logprobs, batch)
    assert float(loss_sum) == pytest.approx(1.24750242, abs=1e-6)
    assert float(sums["accuracy"]) == 1.0  # pair 1 right; pair 2 is a tie, which does not count
    assert float(sums["margin"]) == pytest.approx(0.3, abs=1e-6)  # 0.1 * 3 + 0.1 * 0
    assert float(sums["reward_chosen"]) == pytest.approx(0.2, abs=1e-6)  # 0.1 * (-2 + 4) + 0.1 * 0
    assert float(sums["reward_rejected"]) == pytest.approx(-0.1, abs=1e-6)  # 0.1 * (-3 + 2) + 0

    # cDPO, eps = 0.1: 0.9 log(1 + e^-0.3) + 0.1 log(1 + e^0.3) + log 2 = 0.49891972 + 0.08543552 + 0.69314718
    trainer.stage.label_smoothing = 0.1
    assert float(trainer.pair_loss(logprobs, batch)[0]) == pytest.approx(1.27750242, abs=1e-6)

    # IPO on mean log-probs: policy [-1, -2, -3, -2], reference [-2, -2, -2, -2] -> h1 = 1 + 1 = 2, h2 = 0;
    # (2 - 1 / (2 * 0.1))^2 + (0 - 5)^2 = 9 + 25 = 34 (summed log-probs would give h1 = 3: 4 + 25 = 29)
    trainer.stage.label_smoothing, trainer.stage.loss_type = 0.0, "ipo"
    assert float(trainer.pair_loss(logprobs, batch)[0]) == pytest.approx(34.0, abs=1e-5)


# ------------------------------------------------------------------------------------------ log-probs
def test_one_pass_logprobs_equal_separate_passes(tiny_model: Path, tmp_path: Path):
    rows = good_word_pairs(3, seed=1)
    rows[1]["chosen"] += " and a much longer answer than the others"  # very different lengths in a batch
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = dpo_config(tiny_model, data, tmp_path / "o", "data.eval_fraction=0")
    train, _ = prepare_dpo(cfg)
    trainer = DPOTrainer(cfg, train, [])
    model, pad_id = trainer.model, trainer.tokenizer.pad_token_id
    sequences = [ex.chosen for ex in train] + [ex.rejected for ex in train]  # the layout of `collate`

    def plain(seq) -> float:  # transformers' own logits, one sequence at a time, no padding at all
        logits = model(input_ids=torch.tensor([seq.input_ids])).logits[0]  # (T, V)
        logprobs = (
            logits[:-1].log_softmax(-1).gather(-1, torch.tensor(seq.input_ids[1:])[:, None])
        )  # (T-1, 1)
        return float(logprobs[seq.answer_start - 1 :].sum())

    with torch.no_grad():
        batch = trainer.collate(train)
        one_pass = dpo.answer_logprobs(model, batch["batch"])  # (6,)
        separate = torch.tensor([plain(s) for s in sequences])  # (6,)
        reordered = dpo.answer_logprobs(
            model, SharedPromptBatch.from_examples(sequences[::-1], pad_id)
        )  # other companions
        pair = dpo.answer_logprobs(
            model, SharedPromptBatch.from_examples(sequences[:1] + sequences[3:4], pad_id)
        )  # (2,)
    shared = batch["batch"]  # each pair's prompt once, the answers padded to the longest answer
    assert (shared.rows, shared.prompt_ids.shape[0]) == (6, 3)
    assert shared.answer_ids.shape[1] == max(len(s) - s.answer_start for s in sequences)
    assert separate.std() > 1.0  # the values differ, so the comparisons below can fail
    # sums of up to ~90 tokens of ~-4.8 nats: float32 resolves |x| ~ 400 to 3e-5 only, hence rtol 1e-6 beside
    # the absolute 1e-5 (a padding or layout bug shifts a sum by whole nats)
    for other in (one_pass, reordered.flip(0)):
        torch.testing.assert_close(other, separate, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(pair, separate[[0, 3]], atol=1e-5, rtol=1e-6)


# ------------------------------------------------------------------------------------------ reference
def test_reference_runs_once_over_epochs_and_its_cache_follows_the_data(
    tiny_model: Path, tmp_path: Path, count_reference: dict[str, int]
):
    data = write_jsonl(tmp_path / "d.jsonl", good_word_pairs(12, seed=2))
    out = tmp_path / "o"
    cfg = dpo_config(tiny_model, data, out, "data.eval_fraction=0.25", "train.epochs=3", "train.batch_size=4")
    train, evals = prepare_dpo(cfg)
    trainer = DPOTrainer(cfg, train, evals)
    forwards = []  # every decoder forward of the run in any model (policy or reference), with grad or not

    def record(module, *_):
        if type(module).__name__ == "LlamaModel":
            forwards.append(torch.is_grad_enabled())

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        trainer.run()
    finally:
        hook.remove()
    steps = trainer.total_steps()
    assert steps == 3 * 9 // 4 + 1  # 3 epochs of 9 training pairs, batch 4: 7 steps
    assert count_reference == {"passes": 1, "answers": 2 * 12}  # every answer of both splits, once
    # a batched forward is 3 decoder calls (the ChatML prefix all prompts share, the distinct prompts, the
    # answers). No-grad: 3 reference batches (24 answers, 8 rows each) + 1 final eval batch (3 pairs);
    # each training step is ONE batched forward of its 4 pairs' 8 answers, with gradients; no reference
    assert forwards.count(True) == 3 * steps and forwards.count(False) == 3 * (3 + 1)
    assert metrics(out, "reference") == [{"step": 0, "split": "reference", "cached": False,
                                          "seconds": pytest.approx(1, abs=60), "pairs": 12}]  # fmt: skip

    def recount(path: Path) -> int:  # a new trainer over `path` on the same output dir: passes run
        before = count_reference["passes"]
        again = DPOTrainer(cfg, *prepare_dpo(dpo_config(tiny_model, path, out, "data.eval_fraction=0.25")))
        again.attach_reference()
        assert all(math.isfinite(ex.ref_chosen + ex.ref_rejected) for ex in again.train_examples)
        return count_reference["passes"] - before

    assert recount(data) == 0  # same data, same reference: read from the cache
    rows = good_word_pairs(12, seed=2)
    rows[5]["rejected"] += " blue"
    assert recount(write_jsonl(tmp_path / "d.jsonl", rows)) == 1  # one answer changed: recomputed
    assert recount(tmp_path / "d.jsonl") == 0  # ... and cached again


def test_lora_reference_is_the_base_model_and_the_saved_policy_is_merged(tiny_model: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "r.jsonl", good_word_rankings(4, seed=3))  # rankings: 5 pairs each
    out = tmp_path / "lora"
    cfg = dpo_config(tiny_model, data, out, "data.eval_fraction=0", "train.max_steps=3", "train.lr=1e-2",
                     "train.batch_size=4", "lora.enabled=true", "lora.r=4")  # fmt: skip
    train, _ = prepare_dpo(cfg)
    assert len(train) == 4 * 5  # ranks 2 > 1 = 1 > 0: 5 comparable pairs per prompt, the tie none
    trainer = DPOTrainer(cfg, train, [])
    trainer.run()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)  # no adapters, no rlhfkit
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the saved policy
    pad_id = trainer.tokenizer.pad_token_id
    sequences = [s for ex in trainer.train_examples[:4] for s in (ex.chosen, ex.rejected)]
    with torch.no_grad():
        ref = torch.tensor([x for ex in trainer.train_examples[:4] for x in (ex.ref_chosen, ex.ref_rejected)])
        batch = SharedPromptBatch.from_examples(sequences, pad_id)
        # float32 sums of ~100 nats, batched differently from the reference pass: 1e-6 relative
        torch.testing.assert_close(dpo.answer_logprobs(base, batch), ref, atol=1e-5, rtol=1e-6)
        trained = dpo.answer_logprobs(trainer.model, batch)  # adapters live
        torch.testing.assert_close(dpo.answer_logprobs(merged, batch), trained, atol=1e-4, rtol=0)
    assert (trained - ref).abs().max() > 1e-2  # the adapters did change the policy


# ------------------------------------------------------------------------------------------ learning
def test_learns_held_out_preference_rule(tiny_model: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "good.jsonl", good_word_pairs(128, seed=0))
    out = tmp_path / "dpo"
    run_dpo(dpo_config(tiny_model, data, out, "data.eval_fraction=0.25", "train.lr=3e-3",
                       "train.batch_size=16", "train.epochs=2", "train.warmup_steps=3",
                       "beta=0.5"))  # fmt: skip
    train, evals = metrics(out, "train"), metrics(out, "eval")
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # step 1: the policy IS the reference
    # 32 held-out pairs never trained on, whose two answers differ only in one 4-letter word ("good" or a
    # filler, three of which also start with "g"). An untrained policy equals the reference, so h = 0 for
    # every pair; a policy that moved without learning the rule would order a pair right half of the time.
    # >= 90% (at most 3 errors of 32) is 4.6 standard deviations above that 50% chance level: it means
    # the policy raised the likelihood of "good" relative to the fillers in contexts it never saw.
    assert evals[-1]["accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["margin"] > 0 and evals[-1]["loss"] < math.log(2)
    assert {"loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "grad_norm", "lr",
            "pairs_per_s", "tokens_per_s"} <= set(train[-1])  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).requires_grad_(False)  # plain HF
    before = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).requires_grad_(False)
    moved = max(
        float((a - b).abs().max()) for a, b in zip(model.parameters(), before.parameters(), strict=True)
    )
    assert moved > 1e-3


def test_resume_after_crash_equals_uninterrupted_and_reuses_the_reference(
    tiny_model: Path, tmp_path: Path, count_reference: dict[str, int]
):
    data = write_jsonl(tmp_path / "d.jsonl", good_word_pairs(16, seed=4))
    sets = ["data.eval_fraction=0.25", "train.max_steps=6", "train.lr=3e-3", "train.batch_size=4"]
    run_dpo(dpo_config(tiny_model, data, tmp_path / "reference", *sets))

    cfg = dpo_config(tiny_model, data, tmp_path / "resumed", *sets, "train.save_every=2")
    trainer = DPOTrainer(cfg, *prepare_dpo(cfg))

    class Stop(Exception):
        pass

    def crash(loop, _):
        if loop.step == 3:  # the checkpoint of step 2 exists; step 3 is lost with the process
            raise Stop

    trainer.callbacks.append(crash)
    with pytest.raises(Stop):
        trainer.run()
    assert count_reference["passes"] == 2  # the uninterrupted run and the crashed one
    assert (tmp_path / "resumed" / CACHE_FILE).is_file()
    run_dpo(cfg)  # the same command again: resumes from step 2
    assert count_reference["passes"] == 2  # the reference log-probs came from the cache
    assert max_diff(tmp_path / "reference", tmp_path / "resumed") <= 1e-6
    assert [m["step"] for m in metrics(tmp_path / "resumed", "train")] == list(range(1, 7))


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "Item 2:", "chosen": " good"}, "field 'rejected': is missing"),
        ({"prompt": "Item 2:", "chosen": " good", "rejected": " good"},
         "field 'rejected': is identical to 'chosen'"),
    ],
)  # fmt: skip
def test_cli_bad_data_exits_2_with_one_line_naming_the_field(tiny_model: Path, tmp_path: Path, bad, message):
    data = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "Item 1:", "chosen": " good", "rejected": " x"}, bad]
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["dpo", "--policy", str(tiny_model), "--data", str(data),
                                      "--output", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {data}:2: {message}"]
    assert not out.exists()  # nothing written
