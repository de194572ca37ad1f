"""On a CUDA GPU (bench/gpu/check.sh runs these on an H200; skipped elsewhere, and a skip where CUDA is
available is a failure, see conftest): the default run lands on the GPU in bf16 mixed precision with float32
master weights, frozen models are bf16, and resume is exact with the GPU's RNG state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import read_metrics
from tests.helpers import Stop, max_diff, sft_config

from rlhfkit.device import resolve_runtime
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.trainers.sft import SFTTrainer, prepare_sft, run_sft
from rlhfkit.training.checkpoint import list_checkpoints, read_checkpoint
from rlhfkit.training.settings import TrainConfig, rng_state, set_rng_state

pytestmark = pytest.mark.cuda

STEPS = ["train.max_steps=8", "train.lr=3e-3", "train.warmup_steps=2", "train.batch_size=4"]


def test_sft_defaults_to_the_gpu_in_bf16_with_fp32_master_weights(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    out = tmp_path / "gpu"
    cfg = sft_config(
        tiny_model, memory_data, out, "train.max_steps=3", "train.lr=3e-3"
    )  # device/precision auto
    trainer = SFTTrainer(cfg, *prepare_sft(cfg))
    assert trainer.device.type == "cuda" and trainer.runtime.precision == "bf16"
    assert trainer.accelerator.mixed_precision == "bf16"
    if hasattr(torch.backends, "fp32_precision"):  # torch 2.9+: the new settings alone (device.enable_tf32)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    else:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    assert {(p.device.type, p.dtype) for p in trainer.model.parameters()} == {("cuda", torch.float32)}

    seen = []

    def spy(model, batch):  # the loss runs on the GPU, under bf16 autocast
        seen.append((batch["input_ids"].device.type, torch.is_autocast_enabled("cuda"),
                     torch.get_autocast_dtype("cuda")))  # fmt: skip
        return plain(model, batch)

    plain, trainer.loss = trainer.loss, spy
    trainer.run()
    assert seen and set(seen) == {("cuda", True, torch.bfloat16)}
    state = trainer.optimizer.state_dict()["state"]
    moments = [v for s in state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {(v.device.type, v.dtype) for v in moments} == {("cuda", torch.float32)}
    losses = [r["loss"] for r in read_metrics(out, "train")]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # a plain float32 model on the CPU
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        trained = trainer.model(ids.cuda()).logits.float().cpu()  # float32 weights, no autocast here
        torch.testing.assert_close(reloaded(ids).logits, trained, atol=1e-3, rtol=1e-3)  # TF32 on the GPU


def test_frozen_reference_is_bf16_on_the_gpu(tiny_model: Path):
    runtime = resolve_runtime(TrainConfig())
    ref, _ = load_causal_lm(str(tiny_model), runtime=runtime, frozen=True)
    assert {(p.device.type, p.dtype) for p in ref.parameters()} == {("cuda", torch.bfloat16)}
    policy, _ = load_causal_lm(str(tiny_model), runtime=runtime)
    assert {(p.device.type, p.dtype) for p in policy.parameters()} == {("cuda", torch.float32)}


def test_cuda_rng_state_round_trips():
    torch.cuda.manual_seed_all(3)
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(99)
    set_rng_state(state)
    torch.testing.assert_close(torch.rand(4, device="cuda"), expected, rtol=0, atol=0)


def test_resume_on_the_gpu_equals_uninterrupted(tiny_model: Path, memory_data: Path, tmp_path: Path):
    reference = tmp_path / "reference"
    run_sft(sft_config(tiny_model, memory_data, reference, *STEPS))
    out = tmp_path / "resumed"
    cfg = sft_config(tiny_model, memory_data, out, *STEPS, "train.save_every=3")
    trainer = SFTTrainer(cfg, *prepare_sft(cfg))

    def crash(loop, metrics):
        if loop.step == 5:
            raise Stop

    trainer.callbacks.append(crash)
    with pytest.raises(Stop):
        trainer.run()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    _, state = read_checkpoint(out / "checkpoints" / "step-00000003")
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()  # the GPUs' generators are saved
    run_sft(cfg)
    # the same kernels on the same shapes; the embedding backward's atomic adds may sum in another order
    assert max_diff(reference, out) <= 1e-4


def test_grpo_steps_on_the_gpu(tiny_model: Path, tmp_path: Path):
    """RL on the GPU: rollouts (the CUDA backend or the generic one), a bf16 reference, the update."""
    from tests.helpers import count_target, grpo_config, grpo_prompts_file

    from rlhfkit.data.records import load_prompts
    from rlhfkit.rewards.mix import function_scorer
    from rlhfkit.trainers.grpo import GRPOConfig, GRPOTrainer

    out = tmp_path / "grpo"
    prompts = grpo_prompts_file(tmp_path)
    cfg = grpo_config(GRPOConfig, tiny_model, prompts, out, "train.max_steps=3", "train.lr=1e-2")
    trainer = GRPOTrainer(cfg, load_prompts(cfg.prompts), function_scorer(count_target))
    assert {(p.device.type, p.dtype) for p in trainer.reference.parameters()} == {("cuda", torch.bfloat16)}
    trainer.run()
    rows = read_metrics(out, "train")
    assert len(rows) == 3 and all(abs(r["ratio_first_minibatch"] - 1.0) < 5e-2 for r in rows)
