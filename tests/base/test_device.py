"""Device and precision (rlhfkit.device): chosen once, applied to every model; bf16 mixed precision on the CPU
(the same code path a GPU run takes, minus the GPU); checkpoints from GPU runs; activation checkpointing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests.conftest import read_metrics, write_jsonl
from tests.helpers import sft_config

from rlhfkit import device as dev
from rlhfkit.device import Runtime, resolve_device, resolve_precision
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import load_causal_lm, load_reward_model
from rlhfkit.training.settings import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = Runtime(torch.device("cpu"), "bf16")


# ------------------------------------------------------------------------------------------ resolution
@pytest.fixture()
def machine(monkeypatch: pytest.MonkeyPatch):
    """A pretend machine: `machine(gpus=2, bf16=True, mps=False)`; launcher variables cleared."""
    for var in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def make(gpus: int = 0, bf16: bool = True, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return make


@pytest.mark.parametrize(
    ("gpus", "mps", "local_rank", "name", "expected"),
    [
        (0, False, None, "auto", "cpu"),
        (0, True, None, "auto", "mps"),
        (1, True, None, "auto", "cuda:0"),  # CUDA first
        (2, False, "1", "auto", "cuda:1"),  # rank r of a launch uses cuda:r
        (2, False, "1", "cuda", "cuda:1"),
        (2, False, None, "cuda:1", "cuda:1"),
        (2, False, None, "CPU", "cpu"),
        (0, True, None, "mps", "mps"),
    ],
)
def test_resolve_device(machine, monkeypatch, gpus, mps, local_rank, name, expected):
    machine(gpus=gpus, mps=mps)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_device(TrainConfig(device=name)) == torch.device(expected)


@pytest.mark.parametrize(
    ("gpus", "name", "world", "message"),
    [
        (
            0,
            "cuda",
            "1",
            r"^train.device=cuda but no CUDA GPU is available \(torch .*\); use train.device=auto",
        ),
        (0, "cuda:0", "1", r"^train.device=cuda:0 but no CUDA GPU is available"),
        (2, "cuda:2", "1", r"^train.device=cuda:2: GPU 2 does not exist \(2 visible\)$"),
        (2, "cuda:1", "2", r"pins one GPU, but this is one of several launched processes"),
        (2, "cuda:x", "1", r"^train.device=cuda:x: not a device; use auto, cpu, cuda, cuda:N or mps$"),
        (0, "mps", "1", r"^train.device=mps but this torch has no usable Apple GPU"),
        (0, "tpu", "1", r"^train.device=tpu: not a device"),
    ],
)
def test_resolve_device_errors_are_one_line(machine, monkeypatch, gpus, name, world, message):
    machine(gpus=gpus)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=message) as info:
        resolve_device(TrainConfig(device=name))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("where", "bf16_gpu", "name", "expected"),
    [
        ("cpu", True, "auto", "fp32"),  # bf16 is slower than fp32 on a CPU: only by name
        ("cpu", True, "bf16", "bf16"),
        ("cpu", True, "fp32", "fp32"),
        ("cuda:0", True, "auto", "bf16"),
        ("cuda:0", False, "auto", "fp32"),  # a V100: no bf16, so auto falls back
        ("cuda:0", True, "fp32", "fp32"),
        ("mps", True, "auto", "fp32"),
    ],
)
def test_resolve_precision(machine, where, bf16_gpu, name, expected):
    machine(gpus=1, bf16=bf16_gpu)
    assert resolve_precision(TrainConfig(precision=name), torch.device(where)) == expected


def test_bf16_on_a_gpu_without_bf16_is_a_config_error(machine):
    machine(gpus=1, bf16=False)
    with pytest.raises(
        ConfigError, match=r"^train.precision=bf16 but Tesla V100 \(cuda:0\) does not support"
    ):
        resolve_precision(TrainConfig(precision="bf16"), torch.device("cuda:0"))
    with pytest.raises(ConfigError, match=r"^train.precision=fp16: use auto, fp32 or bf16$"):
        resolve_precision(TrainConfig(precision="fp16"), torch.device("cpu"))  # type: ignore[arg-type]


def test_runtime_on_the_cpu_leaves_matmul_precision_alone():
    before = torch.get_float32_matmul_precision()
    runtime = dev.resolve_runtime(TrainConfig(device="cpu", precision="bf16"))
    assert runtime == BF16 and runtime.mixed_precision == "bf16"
    assert runtime.inference_dtype == torch.bfloat16
    assert torch.get_float32_matmul_precision() == before  # TF32 ("high") is for CUDA runs only


def test_tf32_on_cuda_through_the_new_settings_only(machine, monkeypatch: pytest.MonkeyPatch):
    """torch 2.9+ refuses to read a TF32 state set through a mix of `fp32_precision` (which transformers and
    TRL use) and the legacy flags: a CUDA run sets the new ones alone, where torch has them."""
    if not hasattr(torch.backends, "fp32_precision"):
        reason = f"torch {torch.__version__} has only the legacy TF32 flags"
        pytest.skip(reason)  # by design: older torch has only the legacy flags, which the code then sets
    machine(gpus=1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)

    def legacy(*args: object) -> None:
        raise AssertionError("a legacy TF32 flag was set")

    monkeypatch.setattr(torch._C, "_set_cublas_allow_tf32", legacy)  # torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(type(torch.backends.cudnn), "allow_tf32", property(lambda m: True, legacy))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", legacy)
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        assert dev.resolve_runtime(TrainConfig(device="cuda")).device == torch.device("cuda", 0)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_8bit_adamw_without_bitsandbytes_names_the_package(monkeypatch: pytest.MonkeyPatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(
        ConfigError, match=r"adamw_8bit needs the bitsandbytes package \(pip install bitsandbytes"
    ):
        dev.make_optimizer(TrainConfig(optimizer="adamw_8bit"), params, torch.device("cpu"))


def test_to_device_moves_tensors_inside_containers_and_dataclasses():
    from rlhfkit.models.prefix import SharedPromptBatch

    batch = SharedPromptBatch.build([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]], [[8], [9, 9]], pad_id=0)
    moved = dev.to_device({"batch": batch, "n": 3, "x": [torch.ones(2)]}, "meta")
    assert moved["n"] == 3 and moved["x"][0].device.type == "meta"
    assert isinstance(moved["batch"], SharedPromptBatch) and moved["batch"].answer_ids.device.type == "meta"
    assert batch.answer_ids.device.type == "cpu"  # the original is left as it was


# ------------------------------------------------------------------------------------------ models
def test_frozen_models_run_in_the_inference_dtype(tiny_model: Path, tmp_path: Path):
    from rlhfkit.models.loading import build_reward_model, save_model

    ref, _ = load_causal_lm(str(tiny_model), runtime=BF16, frozen=True)
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    policy, _ = load_causal_lm(str(tiny_model), runtime=BF16)  # trainable: float32 master weights
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in policy.parameters())
    fp32_ref, _ = load_causal_lm(str(tiny_model), frozen=True)  # no runtime: the CPU in float32
    assert {p.dtype for p in fp32_ref.parameters()} == {torch.float32}
    rm, tokenizer = build_reward_model(str(tiny_model), runtime=BF16)
    assert {p.dtype for p in rm.parameters()} == {torch.float32}
    save_model(rm, tokenizer, tmp_path / "rm")
    frozen_rm, _ = load_reward_model(str(tmp_path / "rm"), runtime=BF16)
    assert {p.dtype for p in frozen_rm.parameters()} == {torch.bfloat16} and not frozen_rm.training


def test_logprobs_under_bf16_autocast_agree_with_fp32(tiny_model: Path):
    from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs

    model, _ = load_causal_lm(str(tiny_model))
    batch = SharedPromptBatch.build(
        [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 12]], [[13, 14, 15, 16], [17, 18]], pad_id=0
    )
    with torch.no_grad():
        fp32, _ = completion_logprobs(model, batch)  # (B, T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _ = completion_logprobs(model, batch)
    assert bf16.dtype == torch.float32  # the log-softmax runs in float32 on bf16 logits
    mask = batch.answer_mask.bool()
    diff = (bf16 - fp32)[mask].abs()
    # bf16 keeps 8 mantissa bits: logits of a few units carry ~1e-2 of rounding; ln(101) = 4.6 per token
    assert float(diff.max()) < 0.1, diff
    assert float(diff.max()) > 0  # autocast did run the matmuls in bf16


# ------------------------------------------------------------------------------------------ training
def test_sft_in_bf16_on_the_cpu_learns_keeps_fp32_weights_and_saves_a_plain_model(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    from transformers import AutoModelForCausalLM

    from rlhfkit.trainers.sft import SFTTrainer, prepare_sft

    out = tmp_path / "bf16"
    cfg = sft_config(tiny_model, memory_data, out, "train.precision=bf16", "train.lr=5e-3",
                     "train.max_steps=30", "train.batch_size=4", "train.device=cpu")  # fmt: skip
    trainer = SFTTrainer(cfg, *prepare_sft(cfg))
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.run()
    train = read_metrics(out, "train")
    # ln(101) = 4.6 for a uniform guess; fp32 reaches ~2.4 after these 30 steps, bf16 must too
    assert train[0]["loss"] > 4.0 and train[-1]["loss"] < 3.0, (train[0], train[-1])
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # master weights
    state = trainer.optimizer.state_dict()["state"]
    assert {v.dtype for s in state.values() for k, v in s.items() if k != "step"} == {torch.float32}

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, its own default dtype
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model(ids).logits, atol=1e-5, rtol=1e-5)


def test_precision_changes_between_runs_in_one_process(tiny_model: Path, memory_data: Path, tmp_path: Path):
    """accelerate keeps one global state per process; a bf16 run after an fp32 one (tests, the pipeline)
    must not trip over it."""
    from rlhfkit.trainers.sft import SFTTrainer, prepare_sft

    for precision in ("fp32", "bf16", "fp32"):
        cfg = sft_config(tiny_model, memory_data, tmp_path / precision, f"train.precision={precision}")
        trainer = SFTTrainer(cfg, *prepare_sft(cfg))
        assert trainer.accelerator.mixed_precision == ("bf16" if precision == "bf16" else "no")


def test_reward_model_in_bf16_learns(tiny_model: Path, tmp_path: Path):
    from tests.helpers import good_word_pairs, rm_config

    from rlhfkit.trainers.rm import run_rm

    data = write_jsonl(tmp_path / "good.jsonl", good_word_pairs(64, seed=0))
    out = tmp_path / "rm"
    run_rm(rm_config(tiny_model, data, out, "data.eval_fraction=0", "train.precision=bf16", "train.lr=3e-3",
                     "train.batch_size=16", "train.epochs=4", "train.warmup_steps=2"))  # fmt: skip
    losses = [r["loss"] for r in read_metrics(out, "train")]
    assert losses[0] > 0.5 and min(losses[-3:]) < 0.35, losses


def test_dpo_in_bf16_learns(tiny_model: Path, tmp_path: Path):
    from tests.helpers import dpo_config, good_word_pairs

    from rlhfkit.trainers.dpo import run_dpo

    data = write_jsonl(tmp_path / "good.jsonl", good_word_pairs(64, seed=0))
    out = tmp_path / "dpo"
    run_dpo(dpo_config(tiny_model, data, out, "data.eval_fraction=0", "train.precision=bf16", "train.lr=3e-3",
                       "train.batch_size=16", "train.epochs=3", "beta=0.5"))  # fmt: skip
    losses = [r["loss"] for r in read_metrics(out, "train")]
    # step 1: the policy equals the reference up to bf16 rounding of the two passes
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)
    assert min(losses[-3:]) < 0.5, losses


@pytest.mark.slow
def test_grpo_in_bf16_learns_with_a_bf16_reference(tiny_model: Path, tmp_path: Path):
    from tests.helpers import count_target, grpo_config, grpo_prompts_file

    from rlhfkit.data.records import load_prompts
    from rlhfkit.rewards.mix import function_scorer
    from rlhfkit.trainers.grpo import GRPOConfig, GRPOTrainer

    out = tmp_path / "grpo"
    cfg = grpo_config(GRPOConfig, tiny_model, grpo_prompts_file(tmp_path), out, "train.max_steps=16",
                      "train.lr=1e-2", "train.precision=bf16")  # fmt: skip
    trainer = GRPOTrainer(cfg, load_prompts(cfg.prompts), function_scorer(count_target))
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    trainer.run()
    rows = read_metrics(out, "train")
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    assert last > first + 0.8, (first, last)  # see tests/trainers/test_grpo.py: ~0.2 per answer by chance


@pytest.mark.slow
def test_ppo_in_bf16_learns(tiny_model: Path, tmp_path: Path):
    from tests.helpers import ppo_config, ppo_count_target, ppo_prompts_file

    from rlhfkit.data.records import load_prompts
    from rlhfkit.rewards.mix import function_scorer
    from rlhfkit.trainers.ppo import PPOTrainer

    out = tmp_path / "ppo"
    cfg = ppo_config(tiny_model, ppo_prompts_file(tmp_path), out, "train.max_steps=16", "train.lr=1e-3",
                     "kl_coef=0.1", "train.precision=bf16")  # fmt: skip
    trainer = PPOTrainer(cfg, load_prompts(cfg.prompts), function_scorer(ppo_count_target))
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.value.parameters()} == {torch.float32}
    trainer.run()
    rows = read_metrics(out, "train")
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    # ~0.2 per answer by chance (tests/trainers/test_ppo.py); 16 iterations get to ~0.7, a mean over 3 x 32
    # answers
    assert last > 0.5 and last > 3 * first, (first, last)


# ------------------------------------------------------------------------------------------ checkpoints
def test_rng_state_on_the_cpu_and_a_checkpoint_from_a_gpu_run(tmp_path: Path):
    from rlhfkit.training.checkpoint import read_checkpoint, write_checkpoint
    from rlhfkit.training.settings import rng_state, set_rng_state

    state = rng_state()
    assert state["cuda"] == []  # no GPU here: nothing more than before
    gpu_states = [torch.randint(0, 255, (16,), dtype=torch.uint8) for _ in range(2)]  # 2 GPUs' states
    torch.manual_seed(7)
    gpu_run = {**rng_state(), "cuda": gpu_states}
    write_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {"rng": gpu_run}, keep=2)
    _, loaded = read_checkpoint(tmp_path / "step-00000003")
    expected = torch.rand(3)
    torch.manual_seed(0)
    set_rng_state(loaded["rng"])  # loads on a CPU-only machine; the CPU generators come back exactly
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    old = {k: v for k, v in gpu_run.items() if k != "cuda"}  # written before GPU support
    set_rng_state(old)


def test_gradient_checkpointing_gives_the_same_training(tiny_model: Path, memory_data: Path, tmp_path: Path):
    from tests.helpers import max_diff

    from rlhfkit.trainers.sft import run_sft

    sets = ["train.max_steps=3", "train.lr=3e-3", "train.batch_size=4"]
    run_sft(sft_config(tiny_model, memory_data, tmp_path / "plain", *sets))
    run_sft(
        sft_config(tiny_model, memory_data, tmp_path / "ckpt", *sets, "train.gradient_checkpointing=true")
    )
    plain, ckpt = read_metrics(tmp_path / "plain", "train"), read_metrics(tmp_path / "ckpt", "train")
    for a, b in zip(plain, ckpt, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert max_diff(tmp_path / "plain", tmp_path / "ckpt") <= 1e-5


def test_shared_prompt_forward_under_gradient_checkpointing(tiny_model: Path):
    """The KV-cache forward cannot be recomputed layer by layer: under checkpointing the rows run unshared,
    with the same log-probs and gradients."""
    from rlhfkit.device import enable_gradient_checkpointing
    from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs

    batch = SharedPromptBatch.build([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 11, 12]], [[3, 4, 5], [6, 7]], 0)
    grads = []
    for checkpointing in (False, True):
        model, _ = load_causal_lm(str(tiny_model))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        logprobs, _ = completion_logprobs(model, batch)
        logprobs.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ the cuda marker
@pytest.mark.slow
def test_a_skipped_cuda_test_fails_where_cuda_is_available(tmp_path: Path):
    """conftest's hook, run in a pytest of its own on a pretend CUDA machine: a cuda-marked test that skips
    is reported as a failure; one that passes passes; an unmarked skip stays a skip."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "conftest.py").write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True  # pretend\n"
        "from tests.conftest import pytest_collection_modifyitems, pytest_runtest_makereport  # noqa: F401\n"
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'cuda: needs a GPU')\n"
    )
    (tmp_path / "test_gpu.py").write_text(
        "import pytest\n"
        "@pytest.mark.cuda\n"
        "def test_skips_itself():\n"
        "    pytest.skip('no kernel')\n"
        "@pytest.mark.cuda\n"
        "def test_passes():\n"
        "    pass\n"
        "def test_plain_skip():\n"
        "    pytest.skip('fine')\n"
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout, proc.stdout
    assert "cuda test skipped on a machine with CUDA" in proc.stdout


# ------------------------------------------------------------------------------------------ sharded launches
def fake_accelerator(kind: str, processes: int = 2):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"})
    return SimpleNamespace(distributed_type=DistributedType(kind), num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin))  # fmt: skip


def test_fsdp_on_cpu_processes_is_refused(monkeypatch: pytest.MonkeyPatch):
    """accelerate turns FSDP on only for GPU processes (AcceleratorState: MULTI_GPU/NPU/XPU/..., never
    MULTI_CPU), so an FSDP launch of CPU processes would silently train as DDP. This is why there is no
    2-process FSDP2 test on the CPU with gloo: accelerate cannot run one."""
    from rlhfkit.trainers.sft import SFTConfig

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"asks for FSDP, but these processes run as MULTI_CPU"):
        dev.check_sharded(fake_accelerator("MULTI_CPU"), TrainConfig(), SFTConfig(), True)


def test_sharded_launches_refuse_what_they_cannot_do_and_configure_deepspeed(monkeypatch):
    from rlhfkit.trainers.grpo import GRPOConfig
    from rlhfkit.trainers.sft import SFTConfig

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert dev.check_sharded(fake_accelerator("MULTI_GPU"), TrainConfig(), SFTConfig(), True) is False
    with pytest.raises(ConfigError, match=r"^GRPOConfig cannot run under accelerate's FSDP2 .*ddp.yaml$"):
        dev.check_sharded(fake_accelerator("FSDP"), TrainConfig(save_every=0), GRPOConfig(), False)
    with pytest.raises(ConfigError, match=r"set train.save_every=0"):
        dev.check_sharded(fake_accelerator("FSDP"), TrainConfig(save_every=50), SFTConfig(), True)
    lora = SFTConfig()
    lora.lora.enabled = True
    with pytest.raises(ConfigError, match=r"^LoRA under DeepSpeed is not supported"):
        dev.check_sharded(fake_accelerator("DEEPSPEED"), TrainConfig(save_every=0), lora, True)
    for kind, engine in (("FSDP", "FSDP2"), ("DEEPSPEED", "DeepSpeed")):  # bitsandbytes takes whole tensors
        with pytest.raises(ConfigError, match=rf"^train.optimizer=adamw_8bit does not run under {engine} "):
            dev.check_sharded(fake_accelerator(kind), TrainConfig(save_every=0, optimizer="adamw_8bit"),
                              SFTConfig(), True)  # fmt: skip
    accelerator = fake_accelerator("DEEPSPEED", processes=2)
    cfg = TrainConfig(save_every=0, batch_size=16, grad_accum=2, max_grad_norm=0.5)
    assert dev.check_sharded(accelerator, cfg, SFTConfig(), True) is True
    assert accelerator.state.deepspeed_plugin.deepspeed_config == {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16,
        "gradient_clipping": 0.5,
    }  # fmt: skip


def test_launch_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
    kinds = {name: load_config_from_file(str(root / f"{name}.yaml")).distributed_type.value
             for name in ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")}  # fmt: skip
    assert kinds == {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                     "deepspeed_zero3": "DEEPSPEED"}  # fmt: skip
    fsdp = load_config_from_file(str(root / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert "LlamaDecoderLayer" in fsdp["fsdp_transformer_layer_cls_to_wrap"]
