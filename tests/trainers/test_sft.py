"""Step A end to end on a tiny model: it learns, the saved directory is a plain transformers model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import MEMORY_ROWS
from tests.helpers import sft_config

from rlhfkit.data.encoding import prompt_answer_ids
from rlhfkit.trainers.sft import run_sft


@pytest.mark.slow
def test_sft_memorises_and_saved_model_reproduces_answers(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    cfg = sft_config(
        tiny_model, memory_data, out, "train.lr=5e-3", "train.max_steps=200", "train.warmup_steps=10"
    )
    run_sft(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    # A character model guessing uniformly pays ln(101) = 4.6 nats per answer token. Below 0.05 nats the
    # right character has probability > 0.95 at every position on average: enough for greedy decoding to
    # reproduce each answer exactly, which is asserted below on the reloaded model.
    assert train[0]["loss"] > 3.0
    assert train[-1]["loss"] < 0.05, train[-1]

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers, no rlhfkit
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for row in MEMORY_ROWS:
        prompt, answer = row["messages"][:1], row["messages"][1:]
        p_ids, a_ids = prompt_answer_ids(tokenizer, prompt, answer)
        generated = model.generate(
            torch.tensor([p_ids]), max_new_tokens=len(a_ids) + 3, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[0, len(p_ids):].tolist()  # fmt: skip
        assert generated == a_ids, (tokenizer.decode(generated), row)  # ends with EOS: it learned to stop


def test_completion_only_loss_ignores_prompt_tokens(tiny_model: Path, memory_data: Path, tmp_path: Path):
    from rlhfkit.trainers.sft import SFTTrainer, prepare_sft

    cfg = sft_config(tiny_model, memory_data, tmp_path / "a")
    train, _ = prepare_sft(cfg)
    trainer = SFTTrainer(cfg, train, [])
    batch = trainer.collate(train[:2])
    # labels: answer tokens only, EOS included; "Item 0?" prompt and padding excluded
    expected = sum(len(ex) - ex.answer_start for ex in train[:2])
    assert batch["num_items"] == expected
    full = sft_config(tiny_model, memory_data, tmp_path / "b", "completion_only_loss=false")
    trainer.stage = full
    assert trainer.collate(train[:2])["num_items"] == sum(len(ex) - 1 for ex in train[:2])


@pytest.mark.slow
def test_cli_bad_record_exits_2_and_writes_nothing(tiny_model: Path, tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(MEMORY_ROWS[0]) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "sft", "--model", str(tiny_model), "--data", str(bad)]
    proc = subprocess.run([*cmd, "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{bad}:2: field 'messages': must end with an assistant turn" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_too_long_sample_is_an_error_unless_truncation(tiny_model: Path, memory_data: Path, tmp_path: Path):
    import pytest

    from rlhfkit.errors import DataError
    from rlhfkit.trainers.sft import prepare_sft

    cfg = sft_config(tiny_model, memory_data, tmp_path / "o", "data.max_length=30")
    with pytest.raises(DataError) as info:
        prepare_sft(cfg)
    # "<|im_start|>user\nItem 0?<|im_end|>\n<|im_start|>assistant\n" is 26 characters, "red fox.<|im_end|>" 9
    assert str(info.value) == (
        f"{memory_data}:1: field 'messages': is 35 tokens long with its prompt, more than max_length=30 "
        "(raise max_length or set truncation: true)"
    )
    train, _ = prepare_sft(
        sft_config(tiny_model, memory_data, tmp_path / "o", "data.max_length=30", "data.truncation=true")
    )
    assert max(len(ex) for ex in train) == 30


def test_loss_and_gradients_equal_plain_cross_entropy(tiny_model: Path, memory_data: Path, tmp_path: Path):
    """The fused log-prob loss gives F.cross_entropy's sum over the labelled tokens, and its gradients."""
    import torch.nn.functional as F

    from rlhfkit.trainers.sft import SFTTrainer, prepare_sft

    cfg = sft_config(tiny_model, memory_data, tmp_path / "a")
    train, _ = prepare_sft(cfg)
    trainer = SFTTrainer(cfg, train, [])
    model, batch = trainer.model, trainer.collate(train[:3])
    loss, _ = trainer.loss(model, batch)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["input_ids"][:, 1:].masked_fill(~batch["label_mask"][:, 1:], -100)  # (B, T-1)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    assert batch["num_items"] > 10
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
