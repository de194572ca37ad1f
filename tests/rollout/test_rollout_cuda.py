"""GPU rollout backends, their math on the CPU: the static-cache backend (graphs off) and the HF StaticCache
fallback against a plain HF forward for tiny Llama / Qwen2 / Qwen3 models, in float32 and bf16; backend
selection; and, marked `cuda`, CUDA-graph capture on a real GPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.helpers import EOS, PAD, PROMPTS, VOCAB, eos_ending_rows, family_model, hf_logprobs, rollout_engine
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
)

from rlhfkit.rollout import RolloutEngine, SamplingConfig, left_pad, position_ids_from_mask
from rlhfkit.rollout import engine as engine_module
from rlhfkit.rollout.cuda import StaticCacheBackend, static_backend_supported
from rlhfkit.rollout.engine import choose_backend

pytestmark = pytest.mark.usefixtures("one_thread")


FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("backend", ["cuda_static", "hf_static"])
def test_logprobs_match_hf_forward_fp32(kind: str, backend: str) -> None:
    model = family_model(kind)
    e = rollout_engine(model, backend)
    assert e.backend_name == backend
    for temperature in (1.0, 0.7):
        r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=10, temperature=temperature), torch.Generator())
        assert r.completion_ids.shape == (5, 10)
        assert (r.logprobs - hf_logprobs(model, r, temperature)).abs().max() < 1e-5
        assert (r.logprobs[r.completion_mask == 0] == 0).all()


@pytest.mark.parametrize("kind", FAMILIES)
def test_logprobs_match_hf_forward_bf16(kind: str) -> None:
    model = family_model(kind, torch.bfloat16)
    r = rollout_engine(model, "cuda_static").generate(
        PROMPTS, SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(0)
    )
    diff = (r.logprobs - hf_logprobs(model, r)).abs()
    # bf16 keeps 8 bits of mantissa: logits ~10 apart by 0.05; the cache path and a full forward round
    # differently (other matmul shapes), so agreement is to bf16 rounding, not to float32's
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_fp32_weights_under_bf16_autocast() -> None:
    """A policy kept in float32 and run under bf16 autocast (mixed precision): the projections and the cache
    are bf16, and the log-probs match the trainer's forward under the same autocast."""
    model = family_model("qwen2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = rollout_engine(model, "cuda_static")
        r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator())
        diff = (r.logprobs - hf_logprobs(model, r)).abs()
    assert e._kept.k[0].dtype == torch.bfloat16
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_equals_generic_backend(kind: str) -> None:
    model = family_model(kind)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ref = rollout_engine(model, "generic").generate(PROMPTS, cfg)
    for backend in ("cuda_static", "hf_static"):
        r = rollout_engine(model, backend).generate(PROMPTS, cfg)
        assert torch.equal(r.completion_ids, ref.completion_ids), backend
        assert (r.logprobs - ref.logprobs).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["cuda_static", "hf_static"])
def test_finished_rows_and_compaction(backend: str) -> None:
    """Rows that end early: cut after EOS, log-probs still those of the forward after the engine dropped
    rows (cuda_static compacts its cache; hf_static keeps the rows, fed the pad token)."""
    model = family_model("qwen2")
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ref = rollout_engine(model, "generic", eos=VOCAB - 1).generate(PROMPTS, cfg)
    eos = int(ref.completion_ids[0, 2])  # row 0 ends at its 3rd token; others maybe later or never
    e = rollout_engine(model, backend, eos=eos)
    for _ in range(2):  # twice: the second rollout reuses the cache (and, on a GPU, its graphs)
        r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0))
        assert r.ended[0] and int(r.lengths[0]) <= 3
        for i in range(len(PROMPTS)):
            n = int(r.lengths[i])
            assert torch.equal(r.completion_ids[i, :n], ref.completion_ids[i, :n])
            assert (r.completion_ids[i, n:] == PAD).all()
        assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5


def test_bucket_padding_rows_stay_harmless() -> None:
    """Graphs run whole buckets: rows past the live ones (stale, or left from a bigger earlier batch) must
    stay finite and in range. Eager with the same padding, so the CPU checks it."""
    model = family_model("llama")
    e = rollout_engine(model, "cuda_static")
    e._kept = StaticCacheBackend(model, graphs="off", pad_to_bucket=True)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ref = rollout_engine(model, "generic").generate(PROMPTS, cfg)
    e.generate(PROMPTS * 3, SamplingConfig(max_new_tokens=40))  # 15 rows: buckets 1, 2, 4, 8, 15
    r = e.generate(PROMPTS, cfg)  # 5 rows run as bucket 8, rows 5..7 left from the first rollout
    assert torch.equal(r.completion_ids, ref.completion_ids)
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5
    eos = int(ref.completion_ids[0, 2])
    r = rollout_engine(model, "generic", eos=eos).generate(PROMPTS, SamplingConfig(12, 0.0))
    e.eos_token_ids = [eos]
    got = e.generate(PROMPTS, SamplingConfig(12, 0.0))  # rows end: compacted into a smaller bucket
    assert torch.equal(got.completion_ids, r.completion_ids) and torch.isfinite(got.logprobs).all()


def test_cache_reused_then_grown() -> None:
    model = family_model("llama")
    backend = StaticCacheBackend(model)
    e = rollout_engine(model, "cuda_static")
    e._kept = backend
    e.generate(PROMPTS, SamplingConfig(max_new_tokens=4, temperature=0.0))
    caps = (backend.b_cap, backend.s_cap)
    e.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert (backend.b_cap, backend.s_cap) == caps == (5, 256)
    r = e.generate(PROMPTS * 2, SamplingConfig(max_new_tokens=300, temperature=0.0, stop_at_eos=False))
    assert (backend.b_cap, backend.s_cap) == (10, 512)
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 5e-5


def test_follows_in_place_weight_updates() -> None:
    model = family_model("qwen3")
    e = rollout_engine(model, "cuda_static")
    e.generate(PROMPTS, SamplingConfig(max_new_tokens=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=5), torch.Generator().manual_seed(1))
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5


def test_peft_lora_unmerged() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        family_model("qwen2"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.eval()
    r = rollout_engine(model, "cuda_static").generate(
        PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator()
    )
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5
    dora = peft.get_peft_model(
        family_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    assert static_backend_supported(dora) is not None


def test_continuous_batching_keeps_a_backend_that_joins_rows() -> None:
    """The server's running batch takes rows in while others decode: static caches cannot, so `backend()`
    stays generic (or the CPU fast path) whatever `generate` uses."""
    e = rollout_engine(family_model("qwen2"), "cuda_static")
    assert type(e.backend()).__name__ == "GenericBackend"


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    llama, qwen = family_model("llama"), family_model("qwen2")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert choose_backend(llama) == "llama_cpu" and choose_backend(qwen) == "generic"
    assert choose_backend(llama, fast_path=False) == "generic"
    assert choose_backend(qwen, "cuda_static") == "cuda_static"
    monkeypatch.setenv("RLHFKIT_ROLLOUT_BACKEND", "hf_static")
    assert choose_backend(qwen) == "hf_static" and choose_backend(qwen, "generic") == "generic"
    monkeypatch.delenv("RLHFKIT_ROLLOUT_BACKEND")
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        choose_backend(gpt2, "cuda_static")
    with pytest.raises(ValueError, match="unknown rollout backend"):
        choose_backend(qwen, "vllm")
    sliding = family_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert "sliding" in (static_backend_supported(sliding) or "")
    dynamic = family_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "rope type 'dynamic'" in (static_backend_supported(dynamic) or "")
    assert (
        static_backend_supported(family_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}))
        is None
    )
    # on a GPU: cuda_static for a supported family, the HF StaticCache path for anything else
    monkeypatch.setattr(engine_module, "model_device", lambda model: torch.device("cuda"))
    assert choose_backend(qwen) == "cuda_static" and choose_backend(gpt2) == "hf_static"


def test_linear_rope_scaling_matches() -> None:
    model = family_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    r = rollout_engine(model, "cuda_static").generate(
        PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator()
    )
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5


def test_prefill_logits_match_hf() -> None:
    model = family_model("qwen3")
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        got = StaticCacheBackend(model).start(PROMPTS, ids, mask, 4)
    assert (got - ref[:, -1]).abs().max() < 1e-4


# ------------------------------------------------------------------ on a real GPU (pytest -m cuda)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", FAMILIES)
def test_cuda_graphs_match_eager_and_hf(kind: str) -> None:
    model = family_model(kind, torch.bfloat16).cuda()
    e = rollout_engine(model, None)
    assert e.backend_name == "cuda_static" and e._kept.graphs == "cuda"
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eos=False)
    graphed = e.generate(PROMPTS, cfg)
    assert e._kept.captures == 4
    eager = RolloutEngine(model, eos_token_ids=[EOS], pad_token_id=PAD, backend="cuda_static")
    eager._kept = StaticCacheBackend(model, graphs="off")
    ref = eager.generate(PROMPTS, cfg)
    assert torch.equal(graphed.completion_ids, ref.completion_ids)
    assert (graphed.logprobs - ref.logprobs).abs().max() < 1e-3
    diff = (graphed.logprobs - hf_logprobs(model, graphed)).abs()
    assert diff.mean() < 0.05, diff.mean()


@pytest.mark.cuda
@cuda
def test_cuda_graph_buckets_after_rows_end() -> None:
    """Rows end, the live ones are compacted and a smaller bucket's graph runs: the same tokens as the same
    math run eagerly on the same buckets (bf16 rounding could flip a near-tie against another backend)."""
    model = family_model("qwen2", torch.bfloat16).cuda()

    def eager(eos: int) -> RolloutEngine:
        e = rollout_engine(model, "cuda_static", eos=eos)
        e._kept = StaticCacheBackend(model, graphs="off", pad_to_bucket=True)
        return e

    full = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ref = eager(VOCAB - 1).generate(PROMPTS, full)
    eos = eos_ending_rows(ref.completion_ids)  # two rows or more end: 2 x 4 >= 5 rows, the batch compacts
    e = rollout_engine(model, None, eos=eos)
    r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0))
    want = eager(eos).generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert torch.equal(r.completion_ids, want.completion_ids) and int(r.ended.sum()) >= 2
    assert min(e._kept.runs) < e._kept.b_cap, e._kept.runs  # a smaller bucket's graph ran
    assert (r.logprobs - want.logprobs).abs().max() < 1e-3
    for i in range(len(PROMPTS)):
        n = int(r.lengths[i])
        assert torch.equal(r.completion_ids[i, :n], ref.completion_ids[i, :n])
    captures = e._kept.captures
    e.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert e._kept.captures == captures  # graphs reused by the next rollout
    with torch.no_grad():  # an optimizer-like in-place update: same addresses, graphs still valid
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(0))
    assert e._kept.captures == captures
    assert (r.logprobs - hf_logprobs(model, r)).abs().mean() < 0.05


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", FAMILIES)
def test_cuda_rollout_needs_no_math_kernel(kind: str) -> None:
    """Prefill and decode attend with a mask: only the memory-efficient kernel takes one, and only without
    GQA. Allowed flash and memory-efficient alone, a rollout that needed the math kernel would fail here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = family_model(kind, torch.bfloat16).cuda()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        r = rollout_engine(model, None).generate(PROMPTS, SamplingConfig(max_new_tokens=8), torch.Generator())
    assert (r.logprobs - hf_logprobs(model, r)).abs().mean() < 0.05


@pytest.mark.cuda
@cuda
def test_cuda_graphs_under_bf16_autocast_with_fp32_weights() -> None:
    """The mixed-precision policy of a bf16 run (float32 master weights) sampled under the run's autocast:
    graphs captured over a bf16 cache, log-probs near the trainer's forward under the same autocast."""
    model = family_model("qwen2").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        e = rollout_engine(model, None)
        r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=8), torch.Generator())
        diff = (r.logprobs - hf_logprobs(model, r)).abs()
    assert e._kept.graphs == "cuda" and e._kept.k[0].dtype == torch.bfloat16
    assert diff.mean() < 0.05, diff.mean()


@pytest.mark.cuda
@cuda
def test_cuda_decode_waits_for_the_gpu_once_a_step() -> None:
    """torch's sync debug mode warns at every call that waits for the GPU. Eight more steps may add eight
    waits (which rows ended) when EOS stops rows, none when it does not."""
    e = rollout_engine(family_model("qwen2", torch.bfloat16).cuda(), None, eos=VOCAB + 1)  # no row ends
    e.generate(PROMPTS, SamplingConfig(max_new_tokens=16), torch.Generator())  # capture out of the count

    def waits(t: int, stop: bool) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                e.generate(PROMPTS, SamplingConfig(max_new_tokens=t, stop_at_eos=stop), torch.Generator())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert waits(16, True) - waits(8, True) <= 8
    assert waits(16, False) - waits(8, False) == 0
