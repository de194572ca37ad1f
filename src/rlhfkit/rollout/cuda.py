"""The GPU rollout backend: a static preallocated KV cache, decode steps replayed as CUDA graphs.

For Llama, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) models, GQA, tied or untied
embeddings, plain or wrapped by ``peft`` (LoRA adapters run unmerged, as the trainer runs them). At a
small model the GPU is idle most of a decode step: ~10 kernel launches per layer, each a few microseconds
of CPU time, for a few microseconds of GPU work (shared/ANCHORS.md: TRL's GRPO spends 2.6 s/step on the
H200 on a 135M model, mostly launch overhead). Capturing the whole decode step once and replaying it
removes that; graphs need fixed shapes and fixed addresses, hence the rest of the design:

* The cache is allocated once, per layer ``(B_cap, Hk, S_cap, hd)``, and kept between rollouts while the
  batch and length fit (S_cap rounded up to a multiple of 256), so a training run captures its graphs once;
  unless it holds more than `KEEP_FRACTION` of the GPU's memory: then ``release`` frees it after each rollout,
  so that the update that follows has that memory (a 1.5B model at B 512 x S 1024 holds 15 GB in bf16).
* The cache is in the dtype the rollout computes in: the parameters' dtype, or the autocast dtype when the
  rollout runs under autocast (float32 master weights, bf16 compute: half the bytes every decode step reads,
  and the rounding the trainer's forward under the same autocast applies to its keys and values).
* Every decode step attends over all S_cap slots with a boolean key mask (the prompt's real tokens and the
  slots written so far): one shape for every step. Masked slots hold zeros or old values, never NaN.
* The step's inputs (tokens, positions, the next slot) live in device buffers that the graph reads; the
  slot and positions advance inside the graph, so a replay needs no host value.
* Graphs are captured per batch bucket (1, 2, 4, ... up to B_cap): when rows end and the engine drops them
  (``select``), the live rows are compacted into the first rows of the cache and the next smaller bucket
  that holds them runs; the rows past the live ones are stale and never read. Compaction copies only the
  slots written so far, not the whole S_cap.
* Prefill expands the keys and values to the query heads (transformers' ``repeat_kv``): with a mask, SDPA's
  flash kernel refuses the mask and its memory-efficient kernel refuses GQA (``enable_gqa``), so SDPA would
  fall back to its math kernel and materialise (B, H, P, P) scores (6.4 GB at B 512, 12 heads, P 512).
* Graphs hold parameter addresses: they are recaptured when a parameter is replaced (not when an optimizer
  updates it in place) or a peft adapter is switched on or off.

The math is the model's own: each layer calls the model's norms, projections (so biases, q/k norms and LoRA
come along), MLP, final norm and lm_head; RoPE is the model's rotary module evaluated once for positions
0..S_cap-1 (the same elementwise products, so the same numbers) and ``apply_rotary_pos_emb`` of transformers.
Only attention and the cache are written here. On the CPU in float32 with graphs off, log-probs match a
plain HF forward to ~1e-6 (tests/rollout/test_rollout_cuda.py); in bf16 within bf16 rounding.

``graphs`` (or ``$RLHFKIT_CUDA_GRAPHS``): "cuda" (default on a CUDA model) captures with
``torch.cuda.graph``; "off" runs eagerly (the CPU, and tests). There is no ``torch.compile`` variant: its
"reduce-overhead" mode skips CUDA graphs for functions that mutate their inputs in place (this cache, the
slot and positions, unless each is marked a static address), and one compiled function per bucket passes
dynamo's recompile limit (8) at B_cap 256, after which it runs eagerly, so it would measure neither.

Not supported (``static_backend_supported`` says why; the engine then uses `HFStaticBackend`): other
architectures, sliding-window attention, rope types whose frequencies depend on the length (dynamic,
longrope), DoRA and other peft variants. Shape letters as in `rlhfkit.rollout.engine`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from typing import Any, cast

import torch
import torch.nn.functional as F

from rlhfkit.data.encoding import position_ids_from_mask

SLOT_ROUND = 256  # S_cap is rounded up to this, so prompts of varying length reuse one cache and graphs
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # frequencies fixed at load time
KEEP_FRACTION = 0.25  # the cache and graphs stay between rollouts while they hold at most this much GPU


def _base(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "get_base_model"):  # peft -> transformers
        base = model.get_base_model()  # type: ignore[operator]  # peft's method; nn.Module.__getattr__ is loose
        return cast(torch.nn.Module, base)
    return model


def static_backend_supported(model: torch.nn.Module) -> str | None:
    """None when `StaticCacheBackend` can run this model; otherwise the reason it cannot."""
    base = _base(model)
    cfg: Any = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ("llama", "qwen2", "qwen3"):
        return f"model type {kind!r} (supported: llama, qwen2, qwen3)"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no decoder layers / rotary module where a Llama-family model has them"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "use_sliding_window", False) or any(
        t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])
    ):
        return "sliding-window attention"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE:
        return f"rope type {rope_type!r} (frequencies that change with the length)"
    for m in model.modules():
        if hasattr(m, "lora_A") and getattr(m, "lora_variant", None):
            return "a peft LoRA variant (DoRA, ...)"
    return None


def _adapter_key(model: torch.nn.Module) -> tuple:
    """What a captured graph depends on besides shapes: parameter addresses and peft adapter switches."""
    flags = tuple(
        (m.disable_adapters, m.merged, str(m.active_adapters))
        for m in model.modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    )
    return flags, tuple(p.data_ptr() for p in model.parameters())


def _device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None elsewhere (the CPU keeps its cache)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def _buckets(cap: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two below `cap`, and `cap`."""
    return sorted({2**i for i in range(int(math.log2(cap)) + 1) if 2**i < cap} | {cap})


class StaticCacheBackend:
    """Static KV cache + CUDA-graph decode over the model's own modules; see the module docstring.

    Same interface as the other backends (``start`` / ``step`` / ``select`` / ``release``); ``extend``
    returns None (continuous batching keeps the generic backend's growing cache) and ``trim`` does nothing.
    """

    def __init__(
        self, model: torch.nn.Module, graphs: str | None = None, pad_to_bucket: bool | None = None
    ) -> None:
        reason = static_backend_supported(model)
        if reason is not None:
            raise ValueError(f"the static-cache rollout backend does not support this model: {reason}")
        self.model = model
        # a transformers Llama / Qwen2 / Qwen3 model: its submodules and config fields are duck-typed here
        self.base = cast(Any, _base(model))
        self.inner = self.base.model
        self.layers = list(self.inner.layers)
        cfg = self.base.config
        self.n_kv: int = cfg.num_key_value_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        graphs = graphs or os.environ.get("RLHFKIT_CUDA_GRAPHS") or None
        if graphs is None:
            graphs = "cuda" if self.device.type == "cuda" else "off"
        if graphs not in ("cuda", "off"):
            raise ValueError(f"graphs must be 'cuda' or 'off', not {graphs!r}")
        if graphs == "cuda" and self.device.type != "cuda":
            raise ValueError("graphs='cuda' needs the model on a CUDA device; use graphs='off' on the CPU")
        self.graphs = graphs
        self.pad_to_bucket = graphs != "off" if pad_to_bucket is None else pad_to_bucket
        """Run a step on the smallest bucket that holds the rows (what graphs need; eager too, for tests)."""
        self.b_cap = self.s_cap = 0
        self.cache_dtype = self.dtype
        self.filled = 0  # cache slots written so far in this rollout (host-side: compaction copies these)
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}  # bucket -> (graph, its logits output)
        self._key: tuple | None = None
        self.captures = 0  # graphs captured so far (tests, bench)
        self.runs: Counter[int] = Counter()  # decode steps run per bucket (tests, bench)

    # ------------------------------------------------------------------ the math
    def _layer(
        self,
        layer: Any,  # a decoder layer of one of the supported architectures
        i: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        slot: torch.Tensor | None,
    ) -> torch.Tensor:
        """One decoder layer on x (b, L, D). slot None: prefill, keys and values of the L tokens go to cache
        slots [0, L) and attention is over them; else decode (L = 1) writes slot ``slot`` (1,) and attends
        over the whole cache. mask (b, 1, L, keys) bool, True = attend."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn, hd = layer.self_attn, self.head_dim
        b, n, _ = x.shape
        h = layer.input_layernorm(x)  # (b, L, D)
        q = attn.q_proj(h).view(b, n, -1, hd)  # (b, L, H, hd)
        k = attn.k_proj(h).view(b, n, -1, hd)  # (b, L, Hk, hd)
        v = attn.v_proj(h).view(b, n, -1, hd).transpose(1, 2)  # (b, Hk, L, hd)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's hd features
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (b, H|Hk, L, hd)
        kc, vc = self.k[i][:b], self.v[i][:b]  # (b, Hk, S_cap, hd) views of the static cache
        if slot is None:
            kc[:, :, :n] = k.to(kc.dtype)
            vc[:, :, :n] = v.to(vc.dtype)
            # repeat_kv (see the module docstring): flash and memory-efficient kernels, not the math one
            g = q.shape[1] // k.shape[1]
            if g > 1:
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (b, H, L, hd)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)  # (b, H, L, hd)
        else:
            kc.index_copy_(2, slot, k.to(kc.dtype))
            vc.index_copy_(2, slot, v.to(vc.dtype))
            # GQA without copying the cache: the H / Hk query heads of one kv head are its L = H / Hk
            # queries (q head j reads kv head j // (H / Hk), as transformers' repeat_kv has it)
            g = q.shape[1] // self.n_kv
            o = F.scaled_dot_product_attention(
                q.reshape(b, self.n_kv, g, hd), kc, vc, attn_mask=mask, scale=attn.scaling
            )  # (b, Hk, H / Hk, hd)
            o = o.reshape(b, -1, 1, hd)  # (b, H, 1, hd)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))  # (b, L, D)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:  # (b, D) last hidden -> (b, V) float32
        return self.base.lm_head(self.inner.norm(x)).float()

    def _decode(self, b: int) -> torch.Tensor:
        """One decode step of rows [0, b) from the device buffers; advances slot and positions. No host
        values, no allocation that depends on data: safe to capture."""
        pos = self.pos[:b]  # (b,)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (b, 1, hd)
        valid = self.valid[:b]  # (b, S_cap)
        valid.index_fill_(1, self.slot, True)
        x = self.inner.embed_tokens(self.tokens[:b, None])  # (b, 1, D)
        mask = valid[:, None, None, :]  # (b, 1, 1, S_cap)
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, i, x, cos, sin, mask, self.slot)
        logits = self._logits(x[:, -1])  # (b, V)
        self.slot.add_(1)
        pos.add_(1)
        return logits

    # ------------------------------------------------------------------ buffers and graphs
    def _ensure(self, b: int, s: int) -> None:
        """Cache and buffers for b rows and s slots, reallocated (graphs dropped) only when they do not fit,
        and graphs dropped when a parameter was replaced or an adapter switched."""
        key = _adapter_key(self.model)
        if key != self._key:
            self._graphs.clear()
            self._key = key
        kind = self.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.dtype
        if b <= self.b_cap and s <= self.s_cap and dtype == self.cache_dtype:
            return
        self.b_cap, self.s_cap = max(b, self.b_cap), SLOT_ROUND * math.ceil(max(s, self.s_cap) / SLOT_ROUND)
        self._graphs.clear()
        self.k = self.v = []  # free the old cache before allocating the new one
        self.cache_dtype = dtype
        shape = (self.b_cap, self.n_kv, self.s_cap, self.head_dim)
        new: dict[str, Any] = dict(device=self.device, dtype=dtype)
        self.k = [torch.zeros(shape, **new) for _ in self.layers]  # layers x (B_cap, Hk, S_cap, hd)
        self.v = [torch.zeros(shape, **new) for _ in self.layers]
        self.valid = torch.zeros(self.b_cap, self.s_cap, dtype=torch.bool, device=self.device)
        self.tokens = torch.zeros(self.b_cap, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(self.b_cap, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        positions = torch.arange(self.s_cap, device=self.device)[None]  # (1, S_cap)
        # in the parameters' dtype, as the model's forward has them (its rotary module reads x's dtype only)
        like = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.inner.rotary_emb(like, positions)  # (1, S_cap, hd) each
        self.cos, self.sin = cos[0], sin[0]  # (S_cap, hd)

    def _capture_all(self) -> None:
        """Capture one graph per bucket up to B_cap. Warm-up and capture write garbage into the cache and
        advance the buffers; `start` resets them afterwards."""
        if self._graphs or self.graphs != "cuda":
            return
        self.slot.zero_()  # warm-up writes slots 0, 1, ... and reads positions from the table: in range
        self.pos.zero_()
        self.valid.zero_()
        with self._no_autocast_cache():
            self._capture_buckets()

    def _no_autocast_cache(self) -> Any:
        """Under an enclosing bf16 autocast (fp32 weights), capture with autocast's cast cache off: cached
        weight casts would be freed when the autocast region ends while the graphs still read them."""
        if torch.is_autocast_enabled("cuda"):
            return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        return contextlib.nullcontext()

    def _capture_buckets(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            for bucket in _buckets(self.b_cap):
                self._decode(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for bucket in _buckets(self.b_cap):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._decode(bucket)
            self._graphs[bucket] = (graph, out)
            self.captures += 1

    def _run_decode(self, b: int) -> torch.Tensor:
        bucket = next(x for x in _buckets(self.b_cap) if x >= b) if self.pad_to_bucket else b
        self.runs[bucket] += 1
        self.filled += 1
        if self.graphs == "off":
            return self._decode(bucket)[:b]
        graph, out = self._graphs[bucket]
        graph.replay()
        return out[:b].clone()  # (b, V): the output buffer is overwritten by the next replay

    # ------------------------------------------------------------------ backend interface
    def start(
        self, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, n_new: int
    ) -> torch.Tensor:
        b, p = ids.shape
        self._ensure(b, p + n_new)
        self._capture_all()
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = position_ids_from_mask(mask)  # (B, P)
        # rows past b (a bucket's padding) start at position 0 and advance with the slot: always in range,
        # and each decode step marks the slot it writes valid for every row, so no row is fully masked (NaN)
        self.valid.zero_()
        self.valid[:b, :p] = mask.bool()
        self.slot.fill_(p)
        self.filled = p
        self.pos.zero_()
        self.pos[:b] = pos[:, -1] + 1
        self.b = b
        qi = torch.arange(p, device=self.device)
        causal = qi[None, :] <= qi[:, None]  # (P, P) key <= query
        prefill_mask = (causal[None] & mask.bool()[:, None, :]) | torch.eye(
            p, dtype=torch.bool, device=self.device
        )
        prefill_mask = prefill_mask[:, None]  # (B, 1, P, P); a padded query sees itself, so it stays finite
        cos, sin = self.cos[pos], self.sin[pos]  # (B, P, hd)
        x = self.inner.embed_tokens(ids)  # (B, P, D)
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, i, x, cos, sin, prefill_mask, None)
        return self._logits(x[:, -1])  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode one step for tokens (b,), best on the device already (`generate` keeps them there): tokens
        from the host would make each step wait for a copy."""
        b = tokens.shape[0]
        self.tokens[:b].copy_(tokens)
        return self._run_decode(b)  # (b, V)

    def select(self, keep: torch.Tensor) -> bool:
        """Compact the rows ``keep`` (ascending) into the first rows of the cache (the smaller bucket then
        runs). Only the slots written so far are copied: the rest are never read before they are written."""
        keep = keep.to(self.device)
        n, s = keep.shape[0], self.filled
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[:n, :, :s] = kc[keep, :, :s]  # (n, Hk, s, hd)
            vc[:n, :, :s] = vc[keep, :, :s]
        self.valid[:n, :s] = self.valid[keep, :s]
        self.pos[:n] = self.pos[keep]
        return True

    def extend(
        self, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, n_new: int
    ) -> torch.Tensor | None:
        return None  # rows joining a running batch: not with a fixed-shape cache

    def trim(self) -> None:
        pass

    def held_bytes(self) -> int:
        """Device memory the cache and the graphs' logits outputs hold (their activations come on top)."""
        tensors = [*self.k, *self.v, *(out for _, out in self._graphs.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def release(self) -> None:
        """After a rollout: keep the cache and graphs for the next one (a training run's shapes repeat, and a
        capture costs seconds), unless they hold more than `KEEP_FRACTION` of the GPU's memory, which the
        update that follows then gets back (`free`)."""
        total = _device_memory(self.device)
        if total is not None and self.held_bytes() > KEEP_FRACTION * total:
            self.free()

    def free(self) -> None:
        """Drop the cache and graphs (GPU memory back to the allocator); the next rollout rebuilds them."""
        self._graphs.clear()
        self.k = self.v = []
        self.b_cap = self.s_cap = 0
