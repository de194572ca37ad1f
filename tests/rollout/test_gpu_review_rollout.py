"""The GPU rollout path, checked on the CPU where the CPU can show it: what the prefill hands SDPA, how many
host-device transfers a decode step makes, how much of the cache a compaction copies, when the cache is
freed for the update, the cache's dtype under autocast, and that rows ending compact into a smaller bucket.
The same backend runs on the CPU with graphs off (`rlhfkit.rollout.cuda`); the model is tests/
test_rollout_cuda.py's tiny Qwen2 (4 query heads, 2 key-value heads: GQA)."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from tests.helpers import PAD, PROMPTS, VOCAB, eos_ending_rows, family_model, hf_logprobs, rollout_engine
from torch.overrides import TorchFunctionMode

from rlhfkit.rollout import SamplingConfig, left_pad
from rlhfkit.rollout import cuda as cuda_module
from rlhfkit.rollout.cuda import StaticCacheBackend

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefill_gives_sdpa_as_many_key_heads_as_query_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a mask, SDPA's flash kernel refuses the mask and its memory-efficient kernel refuses GQA, so a
    GQA prefill would run the math kernel, (B, H, P, P) scores in memory. The CPU runs every kernel; what the
    backend hands SDPA is what decides on a GPU (test_rollout_cuda.py checks the kernels there)."""
    calls = []
    plain = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append((q.shape, k.shape, kwargs.get("enable_gqa", False), kwargs.get("attn_mask") is not None))
        return plain(q, k, v, **kwargs)

    monkeypatch.setattr(cuda_module.F, "scaled_dot_product_attention", spy)
    model = family_model("qwen2")
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        StaticCacheBackend(model).start(PROMPTS, ids, mask, 4)
    assert len(calls) == 2  # one per layer
    for q, k, gqa, masked in calls:
        assert masked and not gqa and q[1] == k[1] == 4, (q, k, gqa)


class Transfers(TorchFunctionMode):
    """Counts the calls of the rollout modules (engine.py, cuda.py) that copy between host and device on a GPU
    (`.cpu()`, `.to(...)`) or draw random numbers on the host (`torch.rand`: a copy to the device follows).
    Each is a wait for the GPU or a copy on its stream there; on the CPU they are no-ops, so they are counted
    by where they are called from."""

    WATCH = frozenset({torch.Tensor.cpu, torch.Tensor.to, torch.rand})

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        moves = (
            func is not torch.Tensor.to
            or "device" in kwargs
            or any(isinstance(a, torch.device | str) for a in args[1:])
        )  # `.to(dtype)` casts in place of residence
        if func in self.WATCH and moves:
            caller = sys._getframe(1).f_code
            if "rlhfkit/rollout/" in caller.co_filename:
                self.calls[f"{caller.co_name}:{func.__name__}"] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_a_decode_step_makes_at_most_one_transfer(stop_at_eos: bool) -> None:
    """The calls of a rollout of 16 steps minus those of a rollout of 8: the cost of 8 decode steps. Each
    step may read back which rows ended (when EOS stops a row), nothing else: the uniforms are drawn once a
    rollout, and the tokens stay on the device until the rollout ends."""
    # an EOS no row samples: T steps a rollout
    e = rollout_engine(family_model("qwen2"), "cuda_static", eos=VOCAB + 1)

    def count(t: int) -> int:
        cfg = SamplingConfig(max_new_tokens=t, stop_at_eos=stop_at_eos)
        with Transfers() as mode:
            r = e.generate(PROMPTS, cfg, torch.Generator().manual_seed(0))
        assert r.completion_ids.shape == (len(PROMPTS), t)
        return sum(mode.calls.values())

    per_8_steps = count(16) - count(8)
    assert per_8_steps == (8 if stop_at_eos else 0), per_8_steps


def test_uniforms_drawn_at_once_give_the_rollout_of_per_step_draws() -> None:
    """One draw of (T, B) uniforms is the stream of T draws of B (row-major): the same rollout as one row
    after another sampled alone with the same generator (`rollout.continuous` draws per step)."""
    from rlhfkit.rollout.engine import sample_tokens

    model = family_model("qwen2")
    e = rollout_engine(model, "cuda_static", eos=VOCAB + 1)
    cfg = SamplingConfig(max_new_tokens=6)
    r = e.generate(PROMPTS[:1], cfg, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    ids = list(PROMPTS[0])
    with torch.no_grad():
        for step in range(6):
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1].float()  # (1, V)
            token, _ = sample_tokens(logits, cfg, gen)
            assert int(token) == int(r.completion_ids[0, step]), step
            ids.append(int(token))


def test_compaction_copies_only_the_written_slots() -> None:
    model = family_model("llama")
    backend = StaticCacheBackend(model)
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        backend.start(PROMPTS, ids, mask, 8)
        for _ in range(2):
            backend.step(torch.full((5,), 7))
    written = ids.shape[1] + 2
    assert backend.s_cap == 256
    for kc in [*backend.k, *backend.v]:  # mark every row's unwritten slots with its own row number
        kc[:, :, written:] = torch.arange(5.0)[:, None, None, None]
    before = [kc[:, :, :written].clone() for kc in backend.k]
    keep = torch.tensor([1, 3, 4])
    backend.select(keep)
    for kc, old in zip(backend.k, before, strict=True):
        assert torch.equal(kc[:3, :, :written], old[keep])  # the written slots moved with their rows
        rest = kc[:3, :, written:]  # (3, Hk, S_cap - written, hd): each row's own marks, not copied over
        assert torch.equal(rest, torch.arange(3.0)[:, None, None, None].expand_as(rest))


def test_release_frees_a_cache_that_holds_too_much_of_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept between rollouts (a training run's shapes repeat) unless it holds more than KEEP_FRACTION of the
    device's memory: then the update that follows gets it back, and the next rollout rebuilds it."""
    model = family_model("qwen2")
    e = rollout_engine(model, "cuda_static")
    cfg = SamplingConfig(max_new_tokens=6)
    e.generate(PROMPTS, cfg, torch.Generator())
    held = e._kept.held_bytes()
    assert held > 0 and e._kept.b_cap == 5  # the CPU keeps it
    limit = int(held / cuda_module.KEEP_FRACTION)  # the device memory at which the cache just fits
    monkeypatch.setattr(cuda_module, "_device_memory", lambda device: limit + 1)
    e.generate(PROMPTS, cfg, torch.Generator())
    assert e._kept.b_cap == 5  # fits: kept
    monkeypatch.setattr(cuda_module, "_device_memory", lambda device: limit - 1)
    r = e.generate(PROMPTS, cfg, torch.Generator())
    assert e._kept.b_cap == 0 and e._kept.held_bytes() == 0  # too big: freed after the rollout
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5
    r = e.generate(PROMPTS, cfg, torch.Generator().manual_seed(1))  # rebuilt
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5


def test_cache_follows_the_rollouts_precision() -> None:
    """Float32 weights: a float32 cache, or bf16 under bf16 autocast (half the bytes a decode step reads); a
    rollout in the other precision reallocates it."""
    model = family_model("qwen2")
    e = rollout_engine(model, "cuda_static")
    cfg = SamplingConfig(max_new_tokens=4)
    e.generate(PROMPTS, cfg, torch.Generator())
    assert e._kept.k[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e.generate(PROMPTS, cfg, torch.Generator())
    assert e._kept.k[0].dtype == torch.bfloat16 and e._kept.cos.dtype == torch.float32
    r = e.generate(PROMPTS, cfg, torch.Generator())
    assert e._kept.k[0].dtype == torch.float32
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5


def test_no_compile_variant() -> None:
    with pytest.raises(ValueError, match="graphs must be 'cuda' or 'off', not 'compile'"):
        StaticCacheBackend(family_model("llama"), graphs="compile")


def test_rows_ending_run_a_smaller_bucket() -> None:
    """Eager, on the buckets graphs would use: with two of five rows ended the batch is compacted and the
    bucket of 4 runs (with one row ended it would not: 1 x 4 < 5), with the tokens of the plain path."""
    model = family_model("qwen2")
    full = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    eos = eos_ending_rows(
        rollout_engine(model, "generic", eos=VOCAB - 1).generate(PROMPTS, full).completion_ids
    )
    e = rollout_engine(model, "cuda_static", eos=eos)
    e._kept = StaticCacheBackend(model, graphs="off", pad_to_bucket=True)
    r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0))
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    want = rollout_engine(model, "generic", eos=eos).generate(PROMPTS, greedy)
    assert int(r.ended.sum()) >= 2 and torch.equal(r.completion_ids, want.completion_ids)
    assert min(e._kept.runs) < e._kept.b_cap, e._kept.runs
