"""GPU rollout backends, their math on the CPU: the static-cache backend (graphs off) and the HF StaticCache
fallback against a plain HF forward for tiny Llama / Qwen2 / Qwen3 models, in float32 and bf16; backend
selection; and, marked `cuda`, CUDA-graph capture on a real GPU."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlhfkit.rollout import RolloutEngine, SamplingConfig, left_pad, position_ids_from_mask
from rlhfkit.rollout import engine as engine_module
from rlhfkit.rollout.cuda import StaticCacheBackend, static_backend_supported
from rlhfkit.rollout.engine import choose_backend

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, EOS, VOCAB = 0, 1, 128
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 20, 21], [5, 6, 7, 8, 30], [5, 6, 7, 8, 20, 21], [40, 41]]
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    eos_token_id=EOS,
)


def make(kind: str, dtype: torch.dtype = torch.float32, **overrides: object) -> torch.nn.Module:
    """A tiny random model of one family; Qwen2 gets random q/k/v biases, Qwen3 head_dim != D / H and
    random q/k norm weights, Llama untied embeddings, so each family's own parts matter."""
    torch.manual_seed(0)
    kw: dict = {**SHAPE, **overrides}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **kw))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **kw))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, tie_word_embeddings=True, **kw))
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # sharper logits than the 0.02 init
        for name, p in model.named_parameters():
            if name.endswith("proj.bias") or "q_norm" in name or "k_norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model.to(dtype).eval()


def hf_logprobs(model: torch.nn.Module, r: object, temperature: float = 1.0) -> torch.Tensor:
    """The trainer's view: log-probs (B, T) of the completion from one plain forward over prompt + answer."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(
            input_ids=r.input_ids.to(device),
            attention_mask=r.attention_mask.to(device),
            position_ids=r.position_ids.to(device),
        ).logits.cpu()  # (B, L, V)
    logits = logits[:, r.completion_start - 1 : -1].float() / temperature  # (B, T, V)
    lp = torch.log_softmax(logits, -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    return lp * r.completion_mask


def engine(model: torch.nn.Module, backend: str, eos: int = EOS) -> RolloutEngine:
    return RolloutEngine(model, eos_token_ids=[eos], pad_token_id=PAD, backend=backend)


def eos_ending_rows(completion_ids: torch.Tensor, rows: int = 2) -> int:
    """A token that at least `rows` rows of a greedy rollout produce, but not every row, the earliest there
    is: as the EOS, it ends those rows while others run on, so the batch compacts into a smaller bucket."""
    for k in range(1, completion_ids.shape[1] + 1):
        counts = Counter(tok for row in completion_ids[:, :k].tolist() for tok in set(row))
        for token, n in counts.most_common():
            if rows <= n < completion_ids.shape[0] and token not in (PAD, EOS):
                return token
    raise AssertionError(f"no token ends {rows} rows of {completion_ids.tolist()}")


FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("backend", ["cuda_static", "hf_static"])
def test_logprobs_match_hf_forward_fp32(kind: str, backend: str) -> None:
    model = make(kind)
    e = engine(model, backend)
    assert e.backend_name == backend
    for temperature in (1.0, 0.7):
        r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=10, temperature=temperature), torch.Generator())
        assert r.completion_ids.shape == (5, 10)
        assert (r.logprobs - hf_logprobs(model, r, temperature)).abs().max() < 1e-5
        assert (r.logprobs[r.completion_mask == 0] == 0).all()


@pytest.mark.parametrize("kind", FAMILIES)
def test_logprobs_match_hf_forward_bf16(kind: str) -> None:
    model = make(kind, torch.bfloat16)
    r = engine(model, "cuda_static").generate(
        PROMPTS, SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(0)
    )
    diff = (r.logprobs - hf_logprobs(model, r)).abs()
    # bf16 keeps 8 bits of mantissa: logits ~10 apart by 0.05; the cache path and a full forward round
    # differently (other matmul shapes), so agreement is to bf16 rounding, not to float32's
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_fp32_weights_under_bf16_autocast() -> None:
    """A policy kept in float32 and run under bf16 autocast (mixed precision): the projections and the cache
    are bf16, and the log-probs match the trainer's forward under the same autocast."""
    model = make("qwen2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = engine(model, "cuda_static")
        r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator())
        diff = (r.logprobs - hf_logprobs(model, r)).abs()
    assert e._kept.k[0].dtype == torch.bfloat16
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_equals_generic_backend(kind: str) -> None:
    model = make(kind)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ref = engine(model, "generic").generate(PROMPTS, cfg)
    for backend in ("cuda_static", "hf_static"):
        r = engine(model, backend).generate(PROMPTS, cfg)
        assert torch.equal(r.completion_ids, ref.completion_ids), backend
        assert (r.logprobs - ref.logprobs).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["cuda_static", "hf_static"])
def test_finished_rows_and_compaction(backend: str) -> None:
    """Rows that end early: cut after EOS, log-probs still those of the forward after the engine dropped
    rows (cuda_static compacts its cache; hf_static keeps the rows, fed the pad token)."""
    model = make("qwen2")
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ref = engine(model, "generic", eos=VOCAB - 1).generate(PROMPTS, cfg)
    eos = int(ref.completion_ids[0, 2])  # row 0 ends at its 3rd token; others maybe later or never
    e = engine(model, backend, eos=eos)
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
    model = make("llama")
    e = engine(model, "cuda_static")
    e._kept = StaticCacheBackend(model, graphs="off", pad_to_bucket=True)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ref = engine(model, "generic").generate(PROMPTS, cfg)
    e.generate(PROMPTS * 3, SamplingConfig(max_new_tokens=40))  # 15 rows: buckets 1, 2, 4, 8, 15
    r = e.generate(PROMPTS, cfg)  # 5 rows run as bucket 8, rows 5..7 left from the first rollout
    assert torch.equal(r.completion_ids, ref.completion_ids)
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5
    eos = int(ref.completion_ids[0, 2])
    r = engine(model, "generic", eos=eos).generate(PROMPTS, SamplingConfig(12, 0.0))
    e.eos_token_ids = [eos]
    got = e.generate(PROMPTS, SamplingConfig(12, 0.0))  # rows end: compacted into a smaller bucket
    assert torch.equal(got.completion_ids, r.completion_ids) and torch.isfinite(got.logprobs).all()


def test_cache_reused_then_grown() -> None:
    model = make("llama")
    backend = StaticCacheBackend(model)
    e = engine(model, "cuda_static")
    e._kept = backend
    e.generate(PROMPTS, SamplingConfig(max_new_tokens=4, temperature=0.0))
    caps = (backend.b_cap, backend.s_cap)
    e.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert (backend.b_cap, backend.s_cap) == caps == (5, 256)
    r = e.generate(PROMPTS * 2, SamplingConfig(max_new_tokens=300, temperature=0.0, stop_at_eos=False))
    assert (backend.b_cap, backend.s_cap) == (10, 512)
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 5e-5


def test_follows_in_place_weight_updates() -> None:
    model = make("qwen3")
    e = engine(model, "cuda_static")
    e.generate(PROMPTS, SamplingConfig(max_new_tokens=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=5), torch.Generator().manual_seed(1))
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5


def test_peft_lora_unmerged() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        make("qwen2"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.eval()
    r = engine(model, "cuda_static").generate(PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator())
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5
    dora = peft.get_peft_model(make("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert static_backend_supported(dora) is not None


def test_continuous_batching_keeps_a_backend_that_joins_rows() -> None:
    """The server's running batch takes rows in while others decode: static caches cannot, so `backend()`
    stays generic (or the CPU fast path) whatever `generate` uses."""
    e = engine(make("qwen2"), "cuda_static")
    assert type(e.backend()).__name__ == "_GenericBackend"


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    llama, qwen = make("llama"), make("qwen2")
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
    sliding = make("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert "sliding" in (static_backend_supported(sliding) or "")
    dynamic = make("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "rope type 'dynamic'" in (static_backend_supported(dynamic) or "")
    assert (
        static_backend_supported(make("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})) is None
    )
    # on a GPU: cuda_static for a supported family, the HF StaticCache path for anything else
    monkeypatch.setattr(engine_module, "model_device", lambda model: torch.device("cuda"))
    assert choose_backend(qwen) == "cuda_static" and choose_backend(gpt2) == "hf_static"


def test_linear_rope_scaling_matches() -> None:
    model = make("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    r = engine(model, "cuda_static").generate(PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator())
    assert (r.logprobs - hf_logprobs(model, r)).abs().max() < 1e-5


def test_prefill_logits_match_hf() -> None:
    model = make("qwen3")
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
    model = make(kind, torch.bfloat16).cuda()
    e = engine(model, None)
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
    model = make("qwen2", torch.bfloat16).cuda()

    def eager(eos: int) -> RolloutEngine:
        e = engine(model, "cuda_static", eos=eos)
        e._kept = StaticCacheBackend(model, graphs="off", pad_to_bucket=True)
        return e

    full = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ref = eager(VOCAB - 1).generate(PROMPTS, full)
    eos = eos_ending_rows(ref.completion_ids)  # two rows or more end: 2 x 4 >= 5 rows, the batch compacts
    e = engine(model, None, eos=eos)
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

    model = make(kind, torch.bfloat16).cuda()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        r = engine(model, None).generate(PROMPTS, SamplingConfig(max_new_tokens=8), torch.Generator())
    assert (r.logprobs - hf_logprobs(model, r)).abs().mean() < 0.05


@pytest.mark.cuda
@cuda
def test_cuda_graphs_under_bf16_autocast_with_fp32_weights() -> None:
    """The mixed-precision policy of a bf16 run (float32 master weights) sampled under the run's autocast:
    graphs captured over a bf16 cache, log-probs near the trainer's forward under the same autocast."""
    model = make("qwen2").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        e = engine(model, None)
        r = e.generate(PROMPTS, SamplingConfig(max_new_tokens=8), torch.Generator())
        diff = (r.logprobs - hf_logprobs(model, r)).abs()
    assert e._kept.graphs == "cuda" and e._kept.k[0].dtype == torch.bfloat16
    assert diff.mean() < 0.05, diff.mean()


@pytest.mark.cuda
@cuda
def test_cuda_decode_waits_for_the_gpu_once_a_step() -> None:
    """torch's sync debug mode warns at every call that waits for the GPU. Eight more steps may add eight
    waits (which rows ended) when EOS stops rows, none when it does not."""
    e = engine(make("qwen2", torch.bfloat16).cuda(), None, eos=VOCAB + 1)  # no row ends
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
