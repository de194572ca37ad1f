"""Rollout engine: log-probs vs a fresh forward, padding independence, EOS handling, RNG, fast path vs HF."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tests.helpers import sequence_logprobs
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhfkit.rollout import (
    RolloutEngine,
    SamplingConfig,
    left_pad,
    llama_fast_path_supported,
    position_ids_from_mask,
)
from rlhfkit.rollout.llama_cpu import LlamaCPUBackend

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, EOS, VOCAB = 0, 1, 128
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 20, 21], [5, 6, 7, 8, 30], [5, 6, 7, 8, 20, 21], [40, 41]]


def _llama(**overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    kw: dict = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
    )
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so sampling is not near-uniform
        model.lm_head.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return _llama()


def _generic_models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, eos_token_id=EOS)
    )
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            eos_token_id=EOS,
        )
    )
    return [gpt2.eval(), qwen.eval()]


def _engines(llama: LlamaForCausalLM) -> list[RolloutEngine]:
    fast = RolloutEngine(llama, eos_token_ids=[EOS], pad_token_id=PAD)
    assert fast.fast_path
    generic = RolloutEngine(llama, eos_token_ids=[EOS], pad_token_id=PAD, fast_path=False)
    others = [RolloutEngine(m, eos_token_ids=[EOS], pad_token_id=PAD) for m in _generic_models()]
    assert not any(e.fast_path for e in others)
    return [fast, generic, *others]


def _greedy(n: int = 12, stop: bool = True) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=stop)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"rope_theta": 500.0}, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 1e4}],
)
def test_fast_path_logits_match_hf(overrides: dict) -> None:
    model = _llama(**overrides)
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        got = LlamaCPUBackend(model).forward_logits(ids, mask)
    assert (got - ref)[mask.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_fresh_forward(llama: LlamaForCausalLM, temperature: float) -> None:
    config = SamplingConfig(max_new_tokens=10, temperature=temperature)
    for engine in _engines(llama):
        r = engine.generate(PROMPTS, config, torch.Generator().manual_seed(1))
        assert r.prompt_ids.shape == (5, 7) and r.completion_ids.shape[0] == 5
        with torch.no_grad():
            ref = sequence_logprobs(
                engine.model,
                r.input_ids,
                r.attention_mask,
                r.completion_start,
                temperature,
                r.completion_mask,
            )
        assert (r.logprobs - ref).abs().max() < 1e-5, type(engine.model).__name__
        assert (r.logprobs[r.completion_mask == 0] == 0).all()


def test_row_independent_of_batch_companions(llama: LlamaForCausalLM) -> None:
    for engine in _engines(llama):
        alone = engine.generate([[40, 41, 42]], _greedy(stop=False))
        batch = engine.generate([[3] * 9, [40, 41, 42], [7, 7]], _greedy(stop=False))
        assert torch.equal(alone.completion_ids[0], batch.completion_ids[1])
        assert (alone.logprobs[0] - batch.logprobs[1]).abs().max() < 1e-5


def test_greedy_matches_hf_generate(llama: LlamaForCausalLM) -> None:
    for engine in _engines(llama):
        r = engine.generate(PROMPTS, _greedy(10))
        ids, mask = left_pad(PROMPTS, PAD)
        hf = engine.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )[:, ids.shape[1] :]
        n = hf.shape[1]
        assert torch.equal(r.completion_ids[:, :n], hf), type(engine.model).__name__
        assert (r.completion_ids[:, n:] == PAD).all()


def test_eos_padding_ended_and_early_stop(llama: LlamaForCausalLM) -> None:
    ref = RolloutEngine(llama, eos_token_ids=[VOCAB - 1], pad_token_id=PAD).generate(
        PROMPTS, _greedy(12, False)
    )
    eos = int(ref.completion_ids[0, 3])  # row 0 ends at its first occurrence of this token
    for fast in (True, False):
        engine = RolloutEngine(llama, eos_token_ids=[eos], pad_token_id=PAD, fast_path=fast)
        r = engine.generate(PROMPTS, _greedy(12))
        for i in range(len(PROMPTS)):
            hits = (ref.completion_ids[i] == eos).nonzero()
            n = int(hits[0]) + 1 if len(hits) else 12
            assert bool(r.ended[i]) == bool(len(hits))
            assert torch.equal(r.completion_ids[i, :n], ref.completion_ids[i, :n])
            assert (r.completion_ids[i, n:] == PAD).all() and (r.completion_mask[i, n:] == 0).all()
            assert (r.completion_mask[i, :n] == 1).all() and (r.logprobs[i, n:] == 0).all()
            assert int(r.lengths[i]) == n
        assert r.ended[0]
        with torch.no_grad():
            lp = sequence_logprobs(
                llama, r.input_ids, r.attention_mask, r.completion_start, 1.0, r.completion_mask
            )
        assert (r.logprobs - lp).abs().max() < 1e-5  # also after rows were dropped from the batch
        # stop_at_eos=False: every token is kept, ended still says whether EOS appeared
        full = engine.generate(PROMPTS, _greedy(12, False))
        assert torch.equal(full.completion_ids, ref.completion_ids) and bool(full.completion_mask.all())
        assert torch.equal(full.ended, r.ended)


def test_early_stop_when_all_rows_ended(llama: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = RolloutEngine(llama, eos_token_ids=[VOCAB - 1], pad_token_id=PAD).generate(
        PROMPTS, _greedy(12, False)
    )
    eos = sorted({int(t) for t in ref.completion_ids[:, 1]})  # every row ends by its 2nd token
    calls: list[int] = []
    step = LlamaCPUBackend.step
    monkeypatch.setattr(LlamaCPUBackend, "step", lambda self, t: (calls.append(1), step(self, t))[1])
    hook = llama.register_forward_hook(lambda *_: calls.append(1))
    try:
        for fast in (True, False):
            calls.clear()
            engine = RolloutEngine(llama, eos_token_ids=eos, pad_token_id=PAD, fast_path=fast)
            r = engine.generate(PROMPTS, _greedy(12))
            assert r.ended.all() and int(r.lengths.max()) <= 2
            assert len(calls) <= (1 if fast else 2)  # (prefill +) 1 step, not 12 steps
            assert r.completion_ids.shape == r.logprobs.shape == (len(PROMPTS), int(r.lengths.max()))
    finally:
        hook.remove()


def test_same_generator_state_same_rollout(llama: LlamaForCausalLM) -> None:
    config = SamplingConfig(max_new_tokens=10, temperature=1.0)
    for engine in _engines(llama)[:3]:
        g = torch.Generator().manual_seed(7)
        state = g.get_state()
        a = engine.generate(PROMPTS, config, g)
        g.set_state(state)
        b = engine.generate(PROMPTS, config, g)
        c = engine.generate(PROMPTS, config, torch.Generator().manual_seed(8))
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
        assert not torch.equal(a.completion_ids, c.completion_ids)


def test_top_k_1_and_tiny_top_p_equal_greedy(llama: LlamaForCausalLM) -> None:
    for engine in _engines(llama)[:2]:
        greedy = engine.generate(PROMPTS, _greedy())
        for cfg in (SamplingConfig(12, 1.0, top_k=1), SamplingConfig(12, 1.0, top_p=1e-6)):
            r = engine.generate(PROMPTS, cfg, torch.Generator().manual_seed(3))
            assert torch.equal(r.completion_ids, greedy.completion_ids)
            assert (r.logprobs - greedy.logprobs).abs().max() < 1e-5  # untruncated log-probs


def test_top_k_top_p_restrict_support(llama: LlamaForCausalLM) -> None:
    engine = RolloutEngine(llama, eos_token_ids=[EOS], pad_token_id=PAD)
    r = engine.generate(PROMPTS, SamplingConfig(1, 1.0, top_k=3), torch.Generator().manual_seed(0))
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        logits = llama(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    top3 = logits[:, -1].topk(3).indices
    assert (top3 == r.completion_ids[:, :1]).any(-1).all()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (4, 0.8)])
def test_sampling_frequencies_match_distribution(llama: LlamaForCausalLM, top_k: int, top_p: float) -> None:
    n, temperature = 4000, 0.7
    engine = RolloutEngine(llama, eos_token_ids=[EOS], pad_token_id=PAD)
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    r = engine.generate([[5, 6, 7]] * n, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = torch.softmax(llama(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1] / temperature, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if top_p < 1.0:
        renorm = torch.where(keep, sorted_p, 0.0) / torch.where(keep, sorted_p, 0.0).sum()
        keep &= (renorm.cumsum(0) - renorm) < top_p
    expected = torch.zeros_like(probs).scatter(0, order, torch.where(keep, sorted_p, 0.0))
    expected /= expected.sum()
    freq = torch.bincount(r.completion_ids[:, 0], minlength=VOCAB).float() / n
    assert (freq - expected).abs().max() < 0.03
    assert (freq[expected == 0] == 0).all()
    assert torch.allclose(r.logprobs[:, 0], probs.log()[r.completion_ids[:, 0]], atol=1e-5)  # untruncated


def test_fast_path_follows_weight_updates(llama: LlamaForCausalLM) -> None:
    model = _llama()
    engine = RolloutEngine(model, eos_token_ids=[EOS], pad_token_id=PAD)
    engine.generate(PROMPTS, _greedy(4))
    with torch.no_grad():  # an optimizer step updates parameters in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    r = engine.generate(PROMPTS, _greedy(6))
    with torch.no_grad():
        lp = sequence_logprobs(
            model, r.input_ids, r.attention_mask, r.completion_start, 1.0, r.completion_mask
        )
    assert (r.logprobs - lp).abs().max() < 1e-5


def test_peft_lora_merged_in_fast_path_and_dora_falls_back() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    fast = RolloutEngine(model, eos_token_ids=[EOS], pad_token_id=PAD)
    generic = RolloutEngine(model, eos_token_ids=[EOS], pad_token_id=PAD, fast_path=False)
    assert fast.fast_path
    tokens = []
    for adapters_on in (True, False):
        with contextlib.nullcontext() if adapters_on else model.disable_adapter():
            r = fast.generate(PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator().manual_seed(0))
            g = generic.generate(PROMPTS, SamplingConfig(max_new_tokens=6), torch.Generator().manual_seed(0))
            with torch.no_grad():
                lp = sequence_logprobs(
                    model, r.input_ids, r.attention_mask, r.completion_start, 1.0, r.completion_mask
                )
        assert (r.logprobs - lp).abs().max() < 1e-5 and torch.equal(r.completion_ids, g.completion_ids)
        tokens.append(r.completion_ids)
    assert not torch.equal(tokens[0], tokens[1])  # the adapters (merged, then not) changed the samples
    dora = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert not llama_fast_path_supported(dora)
    assert not RolloutEngine(dora, eos_token_ids=[EOS], pad_token_id=PAD).fast_path
