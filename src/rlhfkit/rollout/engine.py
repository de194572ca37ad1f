"""Rollout engine: batched sampling from a causal LM with a KV cache, returning per-token log-probs.

Used by PPO, GRPO, RLOO and the labelling tool. Shape letters: B batch (rows), U unique prompts,
P padded prompt length, T completion length (max_new_tokens), S cache length, V vocabulary,
D hidden size, H / Hk query / key-value heads, hd head dim.

Log-probs are ``log_softmax(logits / temperature)`` of the sampled token, *before* top-k / top-p
truncation (temperature 1 when greedy). That is what a trainer's forward pass recomputes
(``prefix.completion_logprobs``), so the PPO ratio is exactly 1 at the first epoch (TRL, "N+ implementation
details of RLHF"); the truncation only changes which tokens can be drawn.

Where this departs from ``model.generate`` and why:

* Positions are ``cumsum(mask) - 1`` (clamped at 0), so a left-padded prompt gets the same positions
  as an unpadded one; a row's tokens do not depend on its batch companions.
* Sampling takes an explicit ``torch.Generator``: the same generator state gives the same rollout,
  so a training run can checkpoint and restore its rollout RNG for an exact resume.
* Rows that emitted EOS are dropped from the batch (their cache rows too) once a quarter of the
  running batch has ended, and the loop stops when every row has ended (or never stops early with
  ``stop_at_eos=False``, lm-human-preferences style).
* Backends, one module each: the Llama fast path for float32 models on the CPU (``llama_cpu``, see its
  docstring), the static-cache CUDA-graph path for Llama / Qwen2 / Qwen3 models on a GPU (``cuda``), the
  HF forward over a ``StaticCache`` for other models on a GPU (``hf_static``), and the generic path, the
  HF forward with a ``DynamicCache`` (any other model on the CPU: ``generic``). `RolloutEngine` picks one
  (``choose_backend``); ``backend=`` or the environment variable ``RLHFKIT_ROLLOUT_BACKEND`` forces one
  (``cuda_static`` runs on the CPU too, graphs off: that is how its math is tested).
  Each has ``start`` / ``step`` / ``select`` / ``release``; ``extend`` / ``trim`` for callers that keep
  a batch running while rows come and go (``rollout.continuous``, the server); and, on the CPU backends,
  ``export`` / ``resume`` for rows that keep their cache between calls (``rollout.turns``: multi-turn
  episodes). ``generate`` uses none of these; ``sample`` is its decode loop, for a caller's own first step.
* On a GPU a decode step waits for the GPU once at most: a rollout's uniforms are drawn in one call and
  copied once, the tokens, log-probs and masks are written into device buffers (copied back when the rollout
  ends), and the one read-back of a step is which rows ended (none with ``stop_at_eos=False``). Each
  blocking copy a step (a uniform in, the tokens and log-probs out) would leave the GPU idle meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rlhfkit.config import setting
from rlhfkit.console import progress
from rlhfkit.data.encoding import checked_prompt_ids, left_pad, position_ids_from_mask
from rlhfkit.models import loading as models
from rlhfkit.rollout.cuda import StaticCacheBackend, static_backend_supported
from rlhfkit.rollout.generic import GenericBackend
from rlhfkit.rollout.hf_static import HFStaticBackend
from rlhfkit.rollout.llama_cpu import LlamaCPUBackend, llama_fast_path_supported

BACKENDS = ("llama_cpu", "cuda_static", "hf_static", "generic")


@dataclass
class SamplingConfig:
    """How to sample answers: temperature, then top-k, then top-p (nucleus; the top token is always kept).
    The `sampling` section of every config that samples (RL trainers, labelling, the pipeline)."""

    max_new_tokens: int = setting(64, ge=1)
    """Longest answer, in tokens."""
    temperature: float = setting(1.0, ge=0)
    """Sampling temperature (0: greedy); log-probs are those of logits / temperature everywhere."""
    top_p: float = setting(1.0, gt=0, le=1)
    """Nucleus sampling: draw from the smallest set of tokens with this much probability (1: off)."""
    top_k: int = setting(0, ge=0)
    """Draw from the k most likely tokens only (0: off)."""
    stop_at_eos: bool = True
    """Stop an answer at its EOS (False: sample all max_new_tokens, lm-human-preferences style)."""


# Settings that moved into the `sampling` section (old key -> new key); the old keys still work, with a
# deprecation message, until rlhfkit 0.3.
SAMPLING_RENAMED = {
    "max_new_tokens": "sampling.max_new_tokens",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
}


@dataclass
class Rollout:
    """One batch of completions. T is max_new_tokens, or less when every row ended earlier.

    With ``stop_at_eos=False`` nothing is cut: every sampled token is real (mask 1), and ``ended``
    still says whether an EOS was sampled.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (B, P) 1 = real token
    completion_ids: torch.Tensor  # (B, T) pad after the first EOS
    completion_mask: torch.Tensor  # (B, T) 1 for real tokens including the first EOS
    logprobs: torch.Tensor  # (B, T) log pi(token) under logits / temperature, 0 where masked
    ended: torch.Tensor  # (B,) bool: the completion contains EOS

    @property
    def lengths(self) -> torch.Tensor:  # (B,) completion lengths including EOS
        return self.completion_mask.sum(-1)

    @property
    def completion_start(self) -> int:  # index of the first completion token in input_ids
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + T) prompt + completion
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + T)
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:  # (B, P + T)
        return position_ids_from_mask(self.attention_mask)


class KeptCaches(Protocol):
    """Rows that keep their KV cache between calls, by key (`rollout.turns.TurnCaches`)."""

    def generate(
        self,
        keys: Sequence[Hashable],
        sequences: list[list[int]],
        config: SamplingConfig,
        generator: torch.Generator | None = None,
    ) -> Rollout: ...


@dataclass
class Generation:
    """Answers sampled in batches (`RolloutEngine.sample_texts`): one rollout a batch, the texts in order."""

    rollouts: list[Rollout] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def rollout(self) -> Rollout:
        """The single rollout of a one-batch generation."""
        if len(self.rollouts) != 1:
            raise ValueError(f"expected one rollout batch, got {len(self.rollouts)}")
        return self.rollouts[0]


def draw_uniforms(
    steps: int, rows: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """(steps, rows) float32 uniforms in [0, 1) on `device`, in one draw and one copy.

    Drawn where the generator lives (a CPU generator keeps a resume exact on any device). Row-major (step,
    row): the numbers a draw of `rows` per step would give, while no row has left the batch."""
    where = generator.device if generator is not None else device
    u = torch.rand(steps, rows, generator=generator, device=where)  # (T, B)
    if u.device != device:
        u = (u.pin_memory() if device.type == "cuda" else u).to(device, non_blocking=True)
    return u


def _draw(
    weights: torch.Tensor, generator: torch.Generator | None, uniform: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw from unnormalised (b, n) weights; returns indices (b,) and row totals (b,).

    One uniform per row: ~20x cheaper than ``torch.multinomial`` (an exponential per vocab entry) here.
    `uniform` (b,), on the weights' device, is used when given; else one is drawn from `generator`.
    """
    cdf = weights.cumsum(-1)  # (b, n)
    total = cdf[:, -1:]  # (b, 1)
    if uniform is None:
        uniform = draw_uniforms(1, cdf.shape[0], generator, cdf.device)[0]  # (b,)
    u = uniform.to(cdf.dtype)[:, None] * total  # (b, 1)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # < total even after rounding
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # (b, 1)
    return idx.squeeze(1), total.squeeze(1)


def sample_tokens(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from (b, V) float logits; returns tokens (b,) and their log-probs (b,).

    Temperature, then top-k, then top-p (the smallest set with mass >= top_p, always the top token);
    the log-prob is that of ``log_softmax(logits / temperature)`` before the truncation. `uniform` (b,): the
    rows' uniforms, drawn beforehand on the logits' device (`draw_uniforms`); None: drawn from `generator`.
    """
    if config.temperature <= 0:
        tokens = logits.argmax(-1)  # (b,)
        return tokens, logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
    scaled = logits / config.temperature if config.temperature != 1.0 else logits  # (b, V)
    if config.top_k > 0 or config.top_p < 1.0:
        logz = torch.logsumexp(scaled, -1)  # (b,)
        if config.top_k > 0:
            cand, cand_idx = scaled.topk(min(config.top_k, scaled.shape[-1]), dim=-1)  # (b, k) sorted
        else:
            cand, cand_idx = scaled.sort(dim=-1, descending=True)  # (b, V)
        probs = torch.softmax(cand, -1)  # (b, k) renormalised over the candidates
        if config.top_p < 1.0:
            # Nucleus: drop a candidate when the mass before it already reaches top_p.
            drop = (probs.cumsum(-1) - probs) >= config.top_p  # (b, k)
            drop[:, 0] = False
            probs = probs.masked_fill(drop, 0.0)
        pick, _ = _draw(probs, generator, uniform)  # (b,)
        tokens = cand_idx.gather(1, pick[:, None]).squeeze(1)  # (b,)
    else:
        peak = scaled.amax(-1, keepdim=True)  # (b, 1)
        tokens, total = _draw(torch.exp(scaled - peak), generator, uniform)  # (b,), (b,)
        logz = peak.squeeze(1) + total.log()  # (b,)
    return tokens, scaled.gather(1, tokens[:, None]).squeeze(1) - logz


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's (first) parameter lives."""
    return next(model.parameters()).device


def choose_backend(model: torch.nn.Module, backend: str | None = None, fast_path: bool | None = None) -> str:
    """The rollout backend for `model`, one of `BACKENDS`: `backend` (or ``$RLHFKIT_ROLLOUT_BACKEND``) when
    given, else the Llama fast path for a float32 Llama on the CPU (unless ``fast_path=False``), the
    static-cache CUDA path for a supported model on a GPU, the HF ``StaticCache`` path for any other model
    on a GPU, the generic path otherwise. A forced backend the model cannot use is an error, with the reason.
    """
    name = backend or os.environ.get("RLHFKIT_ROLLOUT_BACKEND") or None
    if fast_path:
        name = "llama_cpu"
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown rollout backend {name!r}; choose from {', '.join(BACKENDS)}")
        if name == "llama_cpu" and not llama_fast_path_supported(model):
            raise ValueError(f"the Llama fast path does not support {type(model).__name__}")
        reason = static_backend_supported(model) if name == "cuda_static" else None
        if reason is not None:
            raise ValueError(f"rollout backend cuda_static does not support {type(model).__name__}: {reason}")
        return name
    if fast_path is None and llama_fast_path_supported(model):
        return "llama_cpu"
    if model_device(model).type == "cuda":
        return "cuda_static" if static_backend_supported(model) is None else "hf_static"
    return "generic"


class RolloutEngine:
    """Samples completions for batches of prompt token ids; see the module docstring.

    ``eos_token_ids`` and ``pad_token_id`` default to the tokenizer's (and the model's generation
    config's) when a tokenizer is given. ``fast_path=None`` picks the Llama fast path when supported
    (False: never, True: always); ``backend`` forces one of `BACKENDS` (see `choose_backend`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        fast_path: bool | None = None,
        backend: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if eos_token_ids is None and tokenizer is not None:
            eos_token_ids = models.eos_token_ids(tokenizer, model)
        if not eos_token_ids:
            raise ValueError("RolloutEngine needs eos_token_ids (or a tokenizer with an eos_token_id)")
        self.eos_token_ids = list(eos_token_ids)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else self.eos_token_ids[0])
        self.backend_name = choose_backend(model, backend, fast_path)
        self.fast_path = self.backend_name == "llama_cpu"
        # backends that keep state between rollouts (derived weights; the static cache and its graphs)
        self._kept: Any = None
        if self.fast_path:
            self._kept = LlamaCPUBackend(model)
        elif self.backend_name == "cuda_static":
            self._kept = StaticCacheBackend(model)

    def encode_prompts(self, records: list[Any], max_new_tokens: int) -> list[list[int]]:
        """Token ids of the records' prompts, each checked (characters, then tokens) to leave room for
        `max_new_tokens` in the model's context; a DataError names the file and line of one that does not."""
        limit = models.context_length(self.model) - max_new_tokens
        return [
            checked_prompt_ids(self.tokenizer, r, limit, "the context minus max_new_tokens") for r in records
        ]

    def decode(self, rollout: Rollout) -> list[str]:
        """The answers of a rollout as text: the real tokens, special tokens (EOS) left out, surrounding
        whitespace stripped. The one rule every caller uses (rewards, labelling, evaluation, the server)."""
        return [
            self.decode_ids(ids[mask.bool()].tolist())
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask, strict=True)  # (T,) each
        ]

    def decode_ids(self, ids: list[int], strip: bool = True) -> str:
        """`decode` of one answer's token ids; `strip=False` keeps surrounding whitespace (for a text that
        is still growing, as the server's streams are)."""
        if self.tokenizer is None:
            raise ValueError("RolloutEngine.decode needs the engine to have a tokenizer")
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.strip() if strip else text

    def backend(self) -> Any:
        """A backend for callers that step a batch themselves and join rows to it (`rollout.continuous`,
        the server): the Llama fast path (one per engine: it holds the derived weights), else a new generic
        one (on a GPU too: the static caches cannot take rows into a running batch). Not to be used while
        `generate` runs on the same engine."""
        return self._kept if self.fast_path else GenericBackend(self.model)

    def _generate_backend(self) -> Any:
        """The backend `generate` samples with: `backend_name`'s."""
        if self._kept is not None:
            return self._kept
        return HFStaticBackend(self.model) if self.backend_name == "hf_static" else GenericBackend(self.model)

    def sample_texts(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
        batch_size: int = 0,
        label: str | None = None,
        caches: KeptCaches | None = None,
        keys: Sequence[Hashable] | None = None,
    ) -> Generation:
        """Answers to token-id prompts, sampled in batches of `batch_size` rows (0: one batch) in order,
        with a progress bar named `label` (None: none): one rollout per batch and the decoded texts. With
        `caches` (of this engine) and a key per prompt, each prompt continues its key's kept cache
        (`TurnCaches.generate`: the same draws, so the same answers for a seed)."""
        size = batch_size or len(prompt_ids)
        out = Generation()
        with progress(label is not None) as bar:
            task = bar.add_task(label or "", total=len(prompt_ids), status="")
            for lo in range(0, len(prompt_ids), size):
                rows = prompt_ids[lo : lo + size]
                if caches is not None and keys is not None:
                    rollout = caches.generate(keys[lo : lo + size], rows, sampling, generator)
                else:
                    rollout = self.generate(rows, sampling, generator)
                out.rollouts.append(rollout)
                out.texts += self.decode(rollout)
                bar.update(task, completed=len(out.texts))
        return out

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], config: SamplingConfig, generator: torch.Generator | None = None
    ) -> Rollout:
        """One completion per token-id prompt (prompts need not share a length: they are left-padded)."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs at least one prompt and every prompt needs a token")
        ids, mask = left_pad(prompt_ids, self.pad_token_id)  # (B, P)
        t = config.max_new_tokens

        def begin(backend: Any) -> torch.Tensor:
            return backend.start(prompt_ids, ids, mask, t)  # (B, V)

        out = self.sample(self._generate_backend(), begin, len(prompt_ids), config, generator)
        return Rollout(ids, mask, *out)  # completion ids, mask, log-probs, ended

    def sample(
        self,
        backend: Any,
        begin: Callable[[Any], torch.Tensor],
        rows: int,
        config: SamplingConfig,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decode loop of `generate` over `backend`, from the first logits (B, V) that `begin(backend)`
        gives (its ``start``, or ``resume`` for rows that go on from kept caches: `rollout.turns`); the
        backend is released at the end. Returns the completion ids, mask, log-probs (B, T) and ended (B,),
        on the CPU."""
        b, t, pad = rows, config.max_new_tokens, self.pad_token_id
        if t == 0:
            empty = torch.zeros((b, 0), dtype=torch.long)  # (B, 0)
            return empty, empty, empty.float(), torch.zeros(b, dtype=torch.bool)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            try:
                logits = begin(backend)  # (B, V)
                dev = logits.device  # every buffer of the loop lives there: no copy a step but one
                greedy, compacts = config.temperature <= 0, True  # compacts: until a backend cannot
                uniforms = None if greedy else draw_uniforms(t, b, generator, dev)  # (T, B)
                eos = torch.tensor(self.eos_token_ids, device=dev)
                out_ids = torch.full((b, t), pad, dtype=torch.long, device=dev)  # (B, T)
                out_mask = torch.zeros((b, t), dtype=torch.long, device=dev)  # (B, T)
                out_lp = torch.zeros((b, t), dtype=torch.float32, device=dev)  # (B, T)
                ended = torch.zeros(b, dtype=torch.bool, device=dev)  # (B,)
                rows_at = torch.arange(b, device=dev)  # (b,) original row of each running row
                done = torch.zeros(b, dtype=torch.bool, device=dev)  # (b,) running rows that have ended
                step = 0
                for step in range(t):
                    u = None if uniforms is None else uniforms[step]  # (b,)
                    tokens, lp = sample_tokens(logits, config, generator, u)  # (b,), (b,)
                    live = ~done  # (b,)
                    # equivalent to: out_ids[rows_at[live], step] = tokens[live] (and the same for mask, lp)
                    out_ids[rows_at, step] = tokens.masked_fill(done, pad)
                    out_mask[rows_at, step] = live.long()
                    out_lp[rows_at, step] = lp.masked_fill(done, 0.0)
                    hit_eos = torch.isin(tokens, eos) & live  # (b,)
                    ended[rows_at] |= hit_eos
                    if step == t - 1:
                        break
                    if config.stop_at_eos:
                        done = done | hit_eos
                        flags = done.cpu()  # the step's one read-back: which rows ended
                        if bool(flags.all()):
                            break
                        if compacts and int(flags.sum()) * 4 >= flags.numel():  # once a quarter ended
                            keep = (~flags).nonzero().squeeze(1).to(dev)  # (b',) the rows that go on
                            if compacts := backend.select(keep):
                                rows_at, done, tokens = rows_at[keep], done[keep], tokens[keep]
                                uniforms = None if uniforms is None else uniforms[:, keep]  # (T, b')
                    logits = backend.step(tokens.masked_fill(done, pad))  # (b, V)
                n = step + 1  # steps run: trim the columns no row reached
                out = [x[:, :n].cpu() for x in (out_ids, out_mask, out_lp)]  # (B, n) each
            finally:
                self.model.train(was_training)
                backend.release()
        return out[0], out[1], out[2], ended.cpu()
