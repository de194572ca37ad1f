"""The generic rollout backend: any HF causal LM through its own forward, with a ``DynamicCache`` and a
growing attention mask (every model on the CPU that the Llama fast path does not take).

Besides the engine's ``start`` / ``step`` / ``select`` it has ``extend`` / ``trim`` (rows joining and leaving
a running batch: `rollout.continuous`, the server) and ``export`` / ``resume`` (rows that keep their cache
between calls: `rollout.turns`, multi-turn episodes). Both need a plain cache (every layer a
``DynamicLayer``); a sliding-window cache cannot be cut and restacked by slot, so those calls decline
(None) and the callers fall back to prefilling. Shape letters as in `rlhfkit.rollout.engine`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from rlhfkit.data.encoding import left_pad, position_ids_from_mask
from rlhfkit.models.compat import cache_keyword
from rlhfkit.rollout.llama_cpu import place_slots


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward takes the keyword `name`."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class GenericBackend:
    """Any HF causal LM: its own forward with a ``DynamicCache`` and a growing attention mask."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.keep_arg = accepts(model, "logits_to_keep")
        self.cache_key = cache_keyword(model)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, last: bool) -> torch.Tensor:
        """The model on ids (b, L) over the cache, attention mask (b, S), positions (b, L); the cache is
        filled in place. Returns the logits of the last position (b, V) float."""
        kw = {"logits_to_keep": 1} if last and self.keep_arg else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{self.cache_key: self.cache},
            **kw,
        )
        return out.logits[:, -1].float()  # (b, V)

    def start(
        self, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, n_new: int
    ) -> torch.Tensor:
        from transformers import DynamicCache

        b, p = ids.shape
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        self.mask = torch.cat([mask, mask.new_ones(b, n_new)], dim=1)  # (B, P + T), sliced per step
        self.pos = position_ids_from_mask(mask)[:, -1:]  # (B, 1) position of the last prompt token
        self.cur = p
        config: Any = self.model.config  # the transformers model's PretrainedConfig
        self.cache: Any = DynamicCache(config=config)
        return self._forward(ids, mask, position_ids_from_mask(mask), last=True)  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.pos = self.pos + 1
        self.cur += 1
        return self._forward(tokens[:, None].to(self.mask.device), self.mask[:, : self.cur], self.pos, False)

    def select(self, keep: torch.Tensor) -> bool:
        """Keep only rows ``keep`` of the running batch; False if the cache cannot do it."""
        if not hasattr(self.cache, "reorder_cache"):
            return False
        keep = keep.to(self.mask.device)
        self.cache.reorder_cache(keep)
        self.mask, self.pos = self.mask[keep], self.pos[keep]
        return True

    def _plain_layers(self) -> list[Any] | None:
        """The cache's layers if every one is a plain ``DynamicLayer`` (keys, values (b, Hk, S, hd))."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return layers if layers is not None and all(type(x) is DynamicLayer for x in layers) else None

    def extend(
        self, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, n_new: int
    ) -> torch.Tensor | None:
        """``start`` for more rows while others run: the new rows are prefilled alone, then both batches are
        right-aligned on the next slot (the shorter padded on the left, masked) and stacked. Returns the new
        rows' logits (b_new, V); None, changing nothing, when the cache is not plain (sliding windows)."""
        old_layers = self._plain_layers()
        if old_layers is None:
            return None
        old_mask, old_pos, old_cur = self.mask, self.pos, self.cur
        logits = self.start(prompts, ids, mask, n_new)
        cur = max(old_cur, self.cur)
        size = cur + max(old_mask.shape[1] - old_cur, self.mask.shape[1] - self.cur)  # keep every row's room
        for a, b in zip(old_layers, self._plain_layers() or [], strict=True):
            for name in ("keys", "values"):
                x, y = getattr(a, name), getattr(b, name)  # (b, Hk, c, hd)
                x = place_slots(x, 2, old_cur, cur - old_cur, cur, 0.0, None)
                setattr(b, name, torch.cat([x, place_slots(y, 2, self.cur, cur - self.cur, cur, 0.0, None)]))
        self.mask = torch.cat(
            [
                place_slots(old_mask, 1, old_cur, cur - old_cur, size, 0, 1),
                place_slots(self.mask, 1, self.cur, cur - self.cur, size, 0, 1),
            ]
        )  # (b + b_new, S)
        self.pos, self.cur = torch.cat([old_pos, self.pos]), cur
        return logits

    def export(self, rows: list[int]) -> list[torch.Tensor] | None:
        """The cache of each of `rows` (positions in the running batch): the keys and values of its real
        slots so far, in order, as one tensor (2, layers, Hk, n, hd) for `resume`. A row that ended is fed pad
        tokens while others run, so its real tokens come first and the caller cuts the rest. None when the
        cache is not plain or its layers differ in shape."""
        layers = self._plain_layers()
        if layers is None or len({(x.keys.shape[1], x.keys.shape[3]) for x in layers}) != 1:
            return None
        out = []
        for r in rows:
            slots = self.mask[r, : self.cur].nonzero().squeeze(1)  # (n,) the row's real slots
            keys = torch.stack([x.keys[r].index_select(1, slots) for x in layers])  # (layers, Hk, n, hd)
            values = torch.stack([x.values[r].index_select(1, slots) for x in layers])
            out.append(torch.stack([keys, values]))  # (2, layers, Hk, n, hd)
        return out

    def resume(self, caches: list[torch.Tensor | None], new_ids: list[list[int]], n_new: int) -> torch.Tensor:
        """Rows that go on from kept caches (`export`; None: a row without one): each cache is right-aligned
        before slot A (the longest cache's length), the rows' new tokens, left-padded to the longest (L), are
        prefilled together in one forward over slots [A, A + L), and the batch decodes on from there as after
        ``start``. Positions go on from each row's cache length. Returns the next-token logits (B, V)."""
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        kept = [0 if c is None else c.shape[3] for c in caches]
        like = next(c for c in caches if c is not None)  # (2, layers, Hk, c, hd)
        a, b = max(kept), len(caches)
        ids, new_mask = (x.to(device) for x in left_pad(new_ids, 0))  # (B, L)
        kv = like.new_zeros(2, like.shape[1], b, like.shape[2], a, like.shape[4])  # (2, layers, B, Hk, A, hd)
        key_mask = new_mask.new_zeros(b, a)  # (B, A)
        for r, c in enumerate(caches):
            if c is not None:
                kv[:, :, r, :, a - kept[r] :] = c
                key_mask[r, a - kept[r] :] = 1
        self.cache = DynamicCache()  # plain layers, filled below (lazily created per layer)
        for i in range(like.shape[1]):
            self.cache.update(kv[0, i], kv[1, i], i)
        mask = torch.cat([key_mask, new_mask], dim=1)  # (B, A + L)
        pos = (torch.tensor(kept, device=device)[:, None] + new_mask.cumsum(1) - 1).clamp(min=0)  # (B, L)
        logits = self._forward(ids, mask, pos, last=True)  # (B, V)
        self.mask = torch.cat([mask, mask.new_ones(b, n_new)], dim=1)  # (B, A + L + T)
        self.pos, self.cur = pos[:, -1:], mask.shape[1]
        return logits

    def trim(self) -> None:
        """Drop the leading slots no running row attends to (after long rows left)."""
        layers = self._plain_layers()
        seen = self.mask[:, : self.cur].bool().any(0)  # (S,)
        first = int(seen.float().argmax()) if bool(seen.any()) else 0
        if layers is None or first == 0:
            return
        for layer in layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        self.mask, self.cur = self.mask[:, first:], self.cur - first

    def release(self) -> None:
        self.cache = None
