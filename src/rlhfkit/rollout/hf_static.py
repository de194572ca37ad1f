"""The fallback rollout backend on a GPU: the model's own HF forward over a transformers ``StaticCache``.

For CUDA models `rollout.cuda` does not support (other architectures, sliding windows, length-dependent
RoPE): the cache that ``model.generate(cache_implementation="static")`` uses, with the engine's own sampler
on top, so sampling, the generator and the log-probs are those of every other backend (``generate`` would
draw with its own RNG and return processed scores). The attention mask always has the cache's full length
(one shape per rollout). Rows that end are not dropped (``select`` says False: a ``StaticCache`` cannot
reorder its rows); the engine keeps feeding them the pad token and masks their output.

Shape letters as in `rlhfkit.rollout.engine`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from rlhfkit.data.encoding import position_ids_from_mask


class HFStaticBackend:
    """Any HF causal LM with a ``StaticCache`` of length P + T."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x names the argument `cache` (the old name warns until 5.40)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=pos,
            cache_position=slots,
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        return out.logits[:, -1].float()  # (b, V)

    def start(
        self, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, n_new: int
    ) -> torch.Tensor:
        from transformers import StaticCache

        b, p = ids.shape
        ids, mask = ids.to(self.device), mask.to(self.device)
        config: Any = getattr(self.model, "config", None)  # the transformers model's PretrainedConfig
        self.cache: Any = StaticCache(config=config, max_cache_len=p + n_new)
        self.mask = torch.cat([mask, mask.new_zeros(b, n_new)], dim=1)  # (B, P + T): slots written so far
        self.pos = position_ids_from_mask(mask)[:, -1:]  # (B, 1)
        self.cur = p
        self.slots = torch.arange(p + n_new, device=self.device)  # (P + T,) cache positions, sliced per step
        return self._forward(ids, position_ids_from_mask(mask), self.slots[:p])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask[:, self.cur] = 1
        self.pos = self.pos + 1
        slot = self.slots[self.cur : self.cur + 1]  # (1,) a view: no host-to-device copy a step
        self.cur += 1
        return self._forward(tokens.to(self.device)[:, None], self.pos, slot)  # (B, V)

    def select(self, keep: torch.Tensor) -> bool:
        return False  # a StaticCache cannot drop rows: the engine keeps them, fed the pad token

    def extend(
        self, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, n_new: int
    ) -> torch.Tensor | None:
        return None

    def trim(self) -> None:
        pass

    def release(self) -> None:
        self.cache = None
