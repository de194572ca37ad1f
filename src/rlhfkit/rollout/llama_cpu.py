"""The CPU Llama fast path of the rollout engine: a hand-written forward for float32 Llama models.

For ``LlamaForCausalLM`` with SiLU MLP and no biases (SmolLM2, TinyLlama, Llama 3), plain or wrapped by
``peft`` with plain LoRA adapters, which are merged into the derived weights: a hand-written forward
over the model's own weights (q/k/v and gate/up concatenated into fused buffers with the RMSNorm weights
folded in, rebuilt whenever a parameter changes, e.g. after an optimizer step; o/down are used in place
unless LoRA is merged), a preallocated static KV cache written in place, RoPE from the model's own
rotary module (so every ``rope_parameters`` type is respected), and decode matmuls computed as ``W @
x.T`` with activations kept (features, rows): with 32 rows MKL on this CPU is ~1.7x faster that way
round than ``x @ W.T``. The lm_head uses a oneDNN-packed copy (1.4x faster than MKL on a cold 113 MB
weight). The prefill runs each distinct prompt once and the prefix all prompts share (chat template,
system prompt) once at batch 1, then copies the cache rows; the lm_head runs only on the last prompt
position. A row can leave a batch with its cache (``export``) and go on from it in a later batch (``resume``,
the new tokens of all rows prefilled in one forward): multi-turn episodes (`rlhfkit.rollout.turns`).
Extra memory: the fused copies (~80% of the decoder weights) plus the lm_head copy. Everything
else (GPT-2, Qwen2, ..., DoRA or other peft variants) goes through the generic path: the HF forward with
a ``DynamicCache``.

Shape letters as in `rlhfkit.rollout.engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from rlhfkit.data.encoding import common_prefix_len, left_pad, position_ids_from_mask

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM


def _onednn_pack(w: torch.Tensor, rows: int) -> torch.Tensor | None:
    """oneDNN-packed copy of a (N, K) weight for ``_linear_pointwise``; None where oneDNN is missing."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, w.shape[1]), packed, None, "none", [], "")
        return packed
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return None


def place_slots(
    x: torch.Tensor, dim: int, filled: int, start: int, size: int, pad: float, rest: float | None
) -> torch.Tensor:
    """A copy of ``x`` with its first ``filled`` slots along ``dim`` moved to ``[start, start + filled)`` of
    ``size`` slots: ``pad`` before them, ``rest`` after (None: uninitialised, for cache slots that are
    written before they are read). Right-aligns two batches' caches on one next slot (``extend``)."""
    shape = list(x.shape)
    shape[dim] = size
    out = x.new_empty(shape) if rest is None else x.new_full(shape, rest)
    out.narrow(dim, 0, start).fill_(pad)
    out.narrow(dim, start, filled).copy_(x.narrow(dim, 0, filled))
    return out


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "get_base_model"):  # peft -> transformers
        base = model.get_base_model()  # type: ignore[operator]  # peft's method; nn.Module.__getattr__ is loose
        return cast(torch.nn.Module, base)
    return model


def _lora_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _linear_weight(mod: torch.nn.Module) -> torch.Tensor | None:
    """Weight of a bias-free Linear with its active peft LoRA adapters merged; None if unsupported."""
    base = getattr(mod, "base_layer", mod)
    if not isinstance(base, torch.nn.Linear) or base.bias is not None:
        return None
    if base is mod or mod.disable_adapters or mod.merged:
        return base.weight
    if not hasattr(mod, "lora_A"):
        return None
    w = base.weight
    for name in mod.active_adapters:
        if name in mod.lora_A:
            if name in getattr(mod, "lora_variant", {}) or mod.lora_B[name].bias is not None:
                return None  # DoRA and other variants, LoRA biases
            w = w + mod.scaling[name] * (mod.lora_B[name].weight @ mod.lora_A[name].weight)
    return w


def _supported_weight(mod: torch.nn.Module) -> torch.Tensor:
    """``_linear_weight`` of a module that ``llama_fast_path_supported`` has accepted."""
    w = _linear_weight(mod)
    assert w is not None, "llama_fast_path_supported accepts only bias-free Linear weights"
    return w


_PROJ: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_PROJ += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_fast_path_supported(model: torch.nn.Module) -> bool:
    """True for a float32 CPU ``LlamaForCausalLM`` (SiLU, no biases), plain or with peft LoRA adapters."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:  # pragma: no cover
        return False
    base = _base_model(model)
    if not isinstance(base, LlamaForCausalLM) or not isinstance(base.model.embed_tokens, torch.nn.Embedding):
        return False
    cfg = base.config
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "attention_bias", False):
        return False
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "pretraining_tp", 1) not in (1, None):
        return False
    if not all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()):
        return False
    with torch.no_grad():
        mods = [base.lm_head] + [layer.get_submodule(n) for layer in base.model.layers for n in _PROJ]
        return all(_linear_weight(m) is not None for m in mods)


class LlamaCPUBackend:
    """Hand-written Llama forward over the model's own weights with a static in-place KV cache.

    Derived weights, rebuilt whenever a parameter changes (``data_ptr`` / ``_version``): per layer
    ``wqkv`` = [Wq / sqrt(hd); Wk; Wv] * input-norm weight (columns) with the q and k rows of each
    head reordered to interleaved rotary pairs (q.k is unchanged when both are permuted alike; the
    rotation becomes one complex multiply), ``wgu`` = [Wg; Wu] * post-attention-norm weight, and a
    oneDNN-packed lm_head, repacked only when the lm_head weight changes (never under LoRA). The K
    cache holds keys in that permuted order. Decode keeps activations transposed, (features, b), so
    every matmul is ``W @ x``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.base = cast("LlamaForCausalLM", _base_model(model))  # llama_fast_path_supported checked it
        cfg = self.base.config
        self.n_heads = cfg.num_attention_heads
        assert cfg.num_key_value_heads is not None  # LlamaConfig sets it (to num_attention_heads if unset)
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.embed = self.base.model.embed_tokens
        self.layers = list(self.base.model.layers)
        self.rotary = self.base.model.rotary_emb
        self._key: tuple | None = None
        self._head_key: tuple | None = None
        self.min_shared_prefix = 4  # tokens; below that the batch-1 prefix pass is not worth it

    def _refresh(self) -> None:
        flags = tuple(
            (m.disable_adapters, m.merged, str(m.active_adapters)) for m in _lora_modules(self.model)
        )
        head_w = self.base.lm_head.weight if isinstance(self.base.lm_head, torch.nn.Linear) else None
        head_key = (flags, None if head_w is None else (head_w.data_ptr(), head_w._version))
        if head_key != self._head_key:  # frozen under LoRA: packed once
            with torch.no_grad():
                self.head = _supported_weight(self.base.lm_head).detach()  # (V, D)
                self.head_packed = _onednn_pack(self.head, 32)
            self._head_key = head_key
        key = (flags, *((p.data_ptr(), p._version) for p in self.model.parameters()))
        if key == self._key:
            return
        h, hk, hd = self.n_heads, self.n_kv, self.head_dim
        half = torch.arange(hd // 2)
        pair = torch.stack([half, half + hd // 2], -1).flatten()  # (hd,) interleaved rotary pairs
        perm_q = (torch.arange(h)[:, None] * hd + pair).flatten()  # (H hd,)
        perm_k = (torch.arange(hk)[:, None] * hd + pair).flatten()  # (Hk hd,)
        self.wqkv: list[torch.Tensor] = []
        self.wo: list[torch.Tensor] = []
        self.wgu: list[torch.Tensor] = []
        self.wd: list[torch.Tensor] = []
        with torch.no_grad():
            for layer in self.layers:
                wq, wk, wv, wo, wg, wu, wd = (_supported_weight(layer.get_submodule(n)) for n in _PROJ)
                w = torch.cat([wq[perm_q] * hd**-0.5, wk[perm_k], wv])  # ((H + 2 Hk) hd, D)
                self.wqkv.append(w * layer.input_layernorm.weight)
                self.wgu.append(torch.cat([wg, wu]) * layer.post_attention_layernorm.weight)  # (2 I, D)
                self.wo.append(wo.detach())  # the parameter itself unless LoRA is merged in
                self.wd.append(wd.detach())
        self._key = key

    def _freqs(self, pos: torch.Tensor) -> torch.Tensor:
        """Complex rotations (b, L, 1, hd / 2) from the model's rotary module (any rope type)."""
        cos, sin = self.rotary(torch.empty(0), pos)  # (b, L, hd) each, cat(f, f) halves
        n = self.head_dim // 2
        return torch.complex(cos[..., :n], sin[..., :n]).unsqueeze(2)

    def _norm(self, x: torch.Tensor, dim: int) -> torch.Tensor:  # RMSNorm without its weight
        return x * x.pow(2).mean(dim, keepdim=True).add_(self.eps).rsqrt_()

    def _head(self, y: torch.Tensor) -> torch.Tensor:  # (b, D) normalised -> (b, V) logits
        y = y * self.base.model.norm.weight
        if self.head_packed is not None:
            return torch.ops.mkldnn._linear_pointwise(y, self.head_packed, None, "none", [], "")
        return F.linear(y, self.head)

    def _alloc(self, b: int, s: int) -> None:
        shape = (b, self.n_kv, s, self.head_dim)
        self.k = [torch.empty(shape) for _ in self.layers]  # layers x (b, Hk, S, hd)
        self.v = [torch.empty(shape) for _ in self.layers]

    def _prefill(self, ids: torch.Tensor, pos: torch.Tensor, start: int, bias: torch.Tensor) -> torch.Tensor:
        """Run ids (b, L) through the layers, writing cache rows [0, b), slots [start, start + L).

        bias (b, 1, L, start + L) is additive; returns the last hidden state, normalised (b, L, D).
        """
        b, n = ids.shape
        h, hk, hd = self.n_heads, self.n_kv, self.head_dim
        freqs = self._freqs(pos)  # (b, L, 1, hd / 2)
        x = self.embed(ids).reshape(b * n, -1)  # (bL, D)
        for i in range(len(self.layers)):
            qkv = F.linear(self._norm(x, -1), self.wqkv[i])  # (bL, (H + 2 Hk) hd)
            qk = torch.view_as_complex(qkv[:, : (h + hk) * hd].reshape(b, n, h + hk, hd // 2, 2))
            qk = torch.view_as_real(qk * freqs).reshape(b, n, h + hk, hd)  # rotated
            v = qkv[:, (h + hk) * hd :].reshape(b, n, hk, hd)
            kc, vc = self.k[i][:b], self.v[i][:b]  # (b, Hk, S, hd)
            kc[:, :, start : start + n] = qk[:, :, h:].transpose(1, 2)
            vc[:, :, start : start + n] = v.transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qk[:, :, :h].transpose(1, 2),
                kc[:, :, : start + n],
                vc[:, :, : start + n],
                attn_mask=bias,
                scale=1.0,
                enable_gqa=hk != h,
            )  # (b, H, L, hd)
            x = x + F.linear(o.transpose(1, 2).reshape(b * n, h * hd), self.wo[i])
            gu = F.linear(self._norm(x, -1), self.wgu[i])  # (bL, 2 I)
            g, u = gu.chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, self.wd[i])  # (bL, D)
        return self._norm(x, -1).reshape(b, n, -1)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row at cache slot ``self.cur``; returns logits (b, V)."""
        b = tokens.shape[0]
        h, hk, hd, s = self.n_heads, self.n_kv, self.head_dim, self.cur + 1
        freqs = self._freqs(self.pos[:, None])[:, 0]  # (b, 1, hd / 2)
        bias = (
            self.bias[:, None, :, :s].expand(b, hk, h // hk, s).reshape(b * hk, h // hk, s)
        )  # (b Hk, H/Hk, S)
        xt = self.embed(tokens).t().contiguous()  # (D, b)
        for i in range(len(self.layers)):
            qkv = torch.mm(self.wqkv[i], self._norm(xt, 0))  # ((H + 2 Hk) hd, b)
            qk = qkv[: (h + hk) * hd].t().contiguous()  # (b, (H + Hk) hd)
            qk = torch.view_as_real(torch.view_as_complex(qk.view(b, h + hk, hd // 2, 2)) * freqs)
            kc, vc = self.k[i], self.v[i]  # (b, Hk, S, hd)
            kc[:, :, s - 1] = qk[:, h:].reshape(b, hk, hd)
            vc[:, :, s - 1] = qkv[(h + hk) * hd :].view(hk, hd, b).permute(2, 0, 1)
            q = qk[:, :h].reshape(b * hk, h // hk, hd)  # (b Hk, H/Hk, hd): heads grouped by kv head
            att = torch.baddbmm(
                bias, q, kc[:, :, :s].reshape(b * hk, s, hd).transpose(1, 2)
            )  # (b Hk, H/Hk, S)
            o = torch.bmm(torch.softmax(att, -1), vc[:, :, :s].reshape(b * hk, s, hd))  # (b Hk, H/Hk, hd)
            xt = torch.addmm(xt, self.wo[i], o.view(b, h * hd).t())  # (D, b)
            gu = torch.mm(self.wgu[i], self._norm(xt, 0))  # (2 I, b)
            g, u = gu.chunk(2, dim=0)
            xt = torch.addmm(xt, self.wd[i], F.silu(g).mul_(u))  # (D, b)
        return self._head(self._norm(xt, 0).t())  # (b, V)

    @staticmethod
    def _prefill_bias(key_mask: torch.Tensor, start: int) -> torch.Tensor:
        """Additive mask (b, 1, L, start + L) for queries at slots [start, start + L), causal + padding.

        A query always sees itself, so padded query rows stay finite (nothing reads them).
        """
        b, s = key_mask.shape
        qi = torch.arange(start, s)[:, None]  # (L, 1)
        ki = torch.arange(s)[None, :]  # (1, S)
        ok = ((ki <= qi)[None] & key_mask.bool()[:, None, :]) | (ki == qi)[None]  # (b, L, S)
        return torch.zeros(b, 1, s - start, s).masked_fill_(~ok[:, None], float("-inf"))

    def forward_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (B, L, V) of left-padded ``ids`` without a cache (tests, reference)."""
        self._refresh()
        b, n = ids.shape
        self._alloc(b, n)
        y = self._prefill(ids, position_ids_from_mask(mask), 0, self._prefill_bias(mask, 0))
        return self._head(y.reshape(b * n, -1)).reshape(b, n, -1)

    def start(
        self, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, n_new: int
    ) -> torch.Tensor:
        self._refresh()
        uniq: dict[tuple[int, ...], int] = {}
        inverse = torch.tensor([uniq.setdefault(tuple(p), len(uniq)) for p in prompts])  # (B,)
        uprompts = [list(p) for p in uniq]
        u = len(uprompts)
        shared = common_prefix_len(uprompts) if u > 1 else 0
        shared = min(shared, min(len(p) for p in uprompts) - 1)
        if shared < self.min_shared_prefix:
            shared = 0
        sids, smask = left_pad([p[shared:] for p in uprompts], 0)  # (U, Ps)
        ps = sids.shape[1]
        s_total = shared + ps + n_new
        self._alloc(u, s_total)
        key_mask = torch.cat([torch.ones(u, shared, dtype=torch.long), smask], dim=1)  # (U, c + Ps)
        if shared:  # the prefix every prompt shares, once, then copied to every row
            pre = torch.tensor(uprompts[0][:shared])[None]  # (1, c)
            self._prefill(pre, torch.arange(shared)[None], 0, self._prefill_bias(key_mask[:1, :shared], 0))
            for kc, vc in zip(self.k, self.v, strict=True):
                kc[1:, :, :shared] = kc[:1, :, :shared]
                vc[1:, :, :shared] = vc[:1, :, :shared]
        pos = position_ids_from_mask(key_mask)[:, shared:]  # (U, Ps)
        y = self._prefill(sids, pos, shared, self._prefill_bias(key_mask, shared))  # (U, Ps, D)
        logits = self._head(y[:, -1].contiguous())  # (U, V)
        if u != len(prompts):  # one cache row per prompt row
            self.k = [kc.index_select(0, inverse) for kc in self.k]
            self.v = [vc.index_select(0, inverse) for vc in self.v]
            logits, key_mask = logits[inverse], key_mask[inverse]
        self.cur = shared + ps  # next cache slot
        self.pos = pos[inverse, -1] + 1  # (B,) position of the next token
        self.bias = torch.zeros(len(prompts), 1, s_total)  # (B, 1, S) additive key mask for decode
        self.bias[:, 0, : self.cur].masked_fill_(key_mask == 0, float("-inf"))
        return logits  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self._decode(tokens)  # (b, V)
        self.cur += 1
        self.pos = self.pos + 1
        return logits

    def select(self, keep: torch.Tensor) -> bool:
        self.k = [kc.index_select(0, keep) for kc in self.k]
        self.v = [vc.index_select(0, keep) for vc in self.v]
        self.bias, self.pos = self.bias[keep], self.pos[keep]
        return True

    def extend(
        self, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, n_new: int
    ) -> torch.Tensor:
        """``start`` for more rows while others run (continuous batching): the new rows are prefilled alone,
        then both batches are right-aligned on the next cache slot (the shorter one padded on the left,
        masked) and stacked, each row keeping its room to grow. Returns the new rows' logits (b_new, V)."""
        if not self.k:
            return self.start(prompts, ids, mask, n_new)
        k, v, bias, pos, cur_a = self.k, self.v, self.bias, self.pos, self.cur
        logits = self.start(prompts, ids, mask, n_new)
        cur_b = self.cur
        cur = max(cur_a, cur_b)
        size = cur + max(bias.shape[-1] - cur_a, self.bias.shape[-1] - cur_b)

        def stack(a: torch.Tensor, b: torch.Tensor, pad: float, rest: float | None) -> torch.Tensor:
            a = place_slots(a, 2, cur_a, cur - cur_a, size, pad, rest)
            return torch.cat([a, place_slots(b, 2, cur_b, cur - cur_b, size, pad, rest)])

        self.k = [stack(a, b, 0.0, None) for a, b in zip(k, self.k, strict=True)]  # (b + b_new, Hk, S, hd)
        self.v = [stack(a, b, 0.0, None) for a, b in zip(v, self.v, strict=True)]
        self.bias = stack(bias, self.bias, float("-inf"), 0.0)  # (b + b_new, 1, S)
        self.pos, self.cur = torch.cat([pos, self.pos]), cur
        return logits

    def export(self, rows: list[int]) -> list[torch.Tensor]:
        """The cache of each of `rows` (positions in the running batch): the keys and values of its real
        slots so far, in order, as one tensor (2, layers, Hk, n, hd) for `resume`. A row that ended is fed pad
        tokens while others run, so its real tokens come first and the caller cuts the rest."""
        out = []
        for r in rows:
            slots = torch.isfinite(self.bias[r, 0, : self.cur]).nonzero().squeeze(1)  # (n,) real slots
            kv = torch.empty(2, len(self.layers), self.n_kv, len(slots), self.head_dim)
            for i, (kc, vc) in enumerate(zip(self.k, self.v, strict=True)):
                torch.index_select(kc[r], 1, slots, out=kv[0, i])  # (Hk, n, hd)
                torch.index_select(vc[r], 1, slots, out=kv[1, i])
            out.append(kv)
        return out

    def resume(self, caches: list[torch.Tensor | None], new_ids: list[list[int]], n_new: int) -> torch.Tensor:
        """Rows that go on from kept caches (`export`; None: a row without one): each cache is right-aligned
        before slot A (the longest cache's length), the rows' new tokens, left-padded to the longest (L), are
        prefilled together in one forward over slots [A, A + L), and the batch decodes on from there as after
        ``start``. Positions go on from each row's cache length. Returns the next-token logits (B, V)."""
        self._refresh()
        kept = [0 if c is None else c.shape[3] for c in caches]
        a, b = max(kept), len(caches)
        ids, new_mask = left_pad(new_ids, 0)  # (B, L)
        s_total = a + ids.shape[1] + n_new
        shape = (2, len(self.layers), b, self.n_kv, s_total, self.head_dim)
        kv = torch.empty(shape)  # (2, layers, B, Hk, S, hd): the batch's keys and values, one allocation
        key_mask = torch.zeros(b, a, dtype=torch.long)  # (B, A)
        for r, c in enumerate(caches):
            kv[:, :, r, :, : a - kept[r]] = 0.0  # masked slots are read (times 0): never NaN
            if c is not None:
                kv[:, :, r, :, a - kept[r] : a] = c
                key_mask[r, a - kept[r] :] = 1
        self.k, self.v = list(kv[0].unbind(0)), list(kv[1].unbind(0))  # layers x (B, Hk, S, hd)
        key_mask = torch.cat([key_mask, new_mask], dim=1)  # (B, A + L)
        pos = (torch.tensor(kept)[:, None] + new_mask.cumsum(1) - 1).clamp(min=0)  # (B, L)
        y = self._prefill(ids, pos, a, self._prefill_bias(key_mask, a))  # (B, L, D)
        logits = self._head(y[:, -1].contiguous())  # (B, V)
        self.cur = key_mask.shape[1]  # next cache slot
        self.pos = pos[:, -1] + 1  # (B,) position of the next token
        self.bias = torch.zeros(b, 1, s_total)  # (B, 1, S) additive key mask for decode
        self.bias[:, 0, : self.cur].masked_fill_(key_mask == 0, float("-inf"))
        return logits

    def trim(self) -> None:
        """Drop the leading cache slots no running row attends to (after long rows left): decode time
        grows with the slots."""
        seen = torch.isfinite(self.bias[:, 0, : self.cur]).any(0)  # (S,)
        first = int(seen.float().argmax()) if bool(seen.any()) else 0
        if first:
            self.k = [kc[:, :, first:] for kc in self.k]
            self.v = [vc[:, :, first:] for vc in self.v]
            self.bias, self.cur = self.bias[:, :, first:], self.cur - first

    def release(self) -> None:
        self.k, self.v = [], []
