"""Step A end to end on a tiny model: it learns, the saved directory is a plain transformers model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import MEMORY_ROWS, write_jsonl
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


# ------------------------------------------------------------------------ assistant_turns: all
# One conversation of three assistant turns; with the ChatML template and the character tokenizer every
# character is a token and each special token one more: "<|im_start|>user\nHi<|im_end|>\n" is 10 tokens.
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "tool", "content": "ok"},
    {"role": "assistant", "content": "Done."},
]


def labelled_runs(tokenizer, ids: tuple[int, ...], mask: tuple[int, ...]) -> list[str]:
    """The decoded text of each run of labelled tokens."""
    from rlhfkit.data.episode_tokens import turn_spans

    return [tokenizer.decode(ids[a:b]) for a, b in turn_spans(mask)]


def test_all_assistant_turns_label_each_turn_and_its_end_token_once(tiny_model: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from rlhfkit.trainers.sft import SFTTrainer, prepare_sft

    pair = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Yo"}],
    }
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": TURNS}, pair])
    cfg = sft_config(tiny_model, data, tmp_path / "o", "assistant_turns=all")
    (conversation, plain), _ = prepare_sft(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert conversation.label_mask is not None
    assert labelled_runs(tokenizer, conversation.input_ids, conversation.label_mask) == [
        "Hello.<|im_end|>",
        "4<|im_end|>",
        "Done.<|im_end|>",
    ]  # no system, user or tool text, no "<|im_start|>assistant\n", no newline after an end token
    whole = tokenizer.apply_chat_template(TURNS, tokenize=False).removesuffix("\n")
    assert tokenizer.decode(conversation.input_ids) == whole  # it ends where the last turn does
    assert tokenizer.decode(conversation.input_ids[: conversation.answer_start]).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    _, last_plain = prepare_sft(sft_config(tiny_model, data, tmp_path / "p"))[0]
    assert plain == last_plain and plain.label_mask is None  # a prompt/completion record is unaffected

    batch = SFTTrainer(cfg, [], []).collate([plain, conversation])
    assert batch["num_items"] == 3 + (7 + 2 + 6)  # "Yo<|im_end|>"; "Hello.", "4", "Done." with their ends
    row = batch["label_mask"][1, : len(conversation)].tolist()
    assert row == [bool(m) for m in conversation.label_mask]


def test_all_turns_in_one_sequence_sum_the_losses_of_one_record_per_turn(tiny_model: Path, tmp_path: Path):
    """A causal model reads each turn after the same prefix in both encodings, so the summed token losses of
    the one sequence equal the sum of the last-turn losses of each turn's record (conversation up to it)."""
    from rlhfkit.agents.demos import turn_records
    from rlhfkit.trainers.sft import SFTTrainer, prepare_sft

    whole = write_jsonl(tmp_path / "whole.jsonl", [{"messages": TURNS}])
    turns = write_jsonl(tmp_path / "turns.jsonl", turn_records({"messages": TURNS}))
    cfg = sft_config(tiny_model, whole, tmp_path / "a", "assistant_turns=all")
    (conversation,), _ = prepare_sft(cfg)
    per_turn, _ = prepare_sft(sft_config(tiny_model, turns, tmp_path / "b"))
    assert len(per_turn) == 3
    trainer = SFTTrainer(cfg, [conversation], [])
    with torch.no_grad():
        batch = trainer.collate([conversation])
        loss, _ = trainer.loss(trainer.model, batch)
        parts = [trainer.collate([ex]) for ex in per_turn]
        losses = [trainer.loss(trainer.model, part)[0] for part in parts]
    assert batch["num_items"] == sum(p["num_items"] for p in parts) == 15
    torch.testing.assert_close(loss, torch.stack(losses).sum(), rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - float(losses[-1])) > 1.0  # the earlier turns do count


def test_a_too_long_conversation_is_an_error_or_is_cut_where_max_length_falls(
    tiny_model: Path, tmp_path: Path
):
    from transformers import AutoTokenizer

    from rlhfkit.errors import DataError
    from rlhfkit.trainers.sft import prepare_sft

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": short}])

    def encode(*sets: str):
        return prepare_sft(sft_config(tiny_model, data, tmp_path / "o", "assistant_turns=all", *sets))[0]

    # user 10 tokens, assistant 1 + 10 + 6 + 2 = 19, user 1 + 5 + 4 + 2 = 12, last assistant 1 + 10 + 1 + 1
    with pytest.raises(DataError) as info:
        encode("data.max_length=40")
    assert str(info.value) == (
        f"{data}:1: field 'messages': is 54 tokens long, more than max_length=40 "
        "(raise max_length or set truncation: true)"
    )
    (cut,) = encode("data.max_length=40", "data.truncation=true")  # cut in the second user turn
    assert len(cut) == 40 and labelled_runs(tokenizer, cut.input_ids, cut.label_mask) == ["Hello.<|im_end|>"]
    (cut,) = encode("data.max_length=25", "data.truncation=true")  # 21 tokens, then 4 of the first answer
    assert labelled_runs(tokenizer, cut.input_ids, cut.label_mask) == ["Hell"]
    assert encode("data.max_length=21", "data.truncation=true") == []  # nothing left to learn: dropped

    # far too long: refused on characters before tokenising (the longest token, <|endoftext|>, is 13
    # characters, so 40 tokens hold at most (40 + 8) * 13 = 624), or cut there first
    huge = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x" * 700},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "y"}]  # fmt: skip
    write_jsonl(data, [{"messages": huge}])
    with pytest.raises(DataError) as info:
        encode("data.max_length=40")
    assert str(info.value) == (
        f"{data}:1: field 'messages': is 707 characters long, far more than max_length=40 tokens hold "
        "(raise max_length or set truncation: true)"
    )
    (cut,) = encode("data.max_length=40", "data.truncation=true")
    assert labelled_runs(tokenizer, cut.input_ids, cut.label_mask) == ["x" * 19]  # 40 - 21 tokens of it
