"""Benchmark: the rollout engine's decode step at small batches (one stream, a few), float32 on the CPU.

Each batch size samples 64 tokens without EOS stopping from the same chat prompt, `--rounds` times after
one warm-up; the median gives ms per decode step and tokens per second. With `--profile`, torch's profiler
then lists the ops of one batch-1 generation by their own time: how much is the weights' matmuls (and at
what bandwidth: bytes of the weights / time) and how much everything else is.

`--kernels`: the matmul kernels alone on 30 random (3072, 576) weights (SmolLM2's gate/up, 212 MB, more
than the caches hold), GB/s of weights read per kernel and row count: `W @ x.T` (the fast path's decode
today), `F.linear(x, W)`, and a oneDNN-packed weight (`_linear_pointwise`, as the fast path's lm_head).

Usage: python bench/bench_decode.py [--model smollm2-135m-instruct] [--batches 1 2 4 8] [--profile]
       python bench/bench_decode.py --kernels [--batches 1 2 4 8 32]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

print = functools.partial(print, flush=True)  # progress shows up when piped


def kernels(batches: list[int], reps: int = 5) -> None:
    """The `--kernels` table (see the module docstring)."""
    import torch.nn.functional as F

    weights = [torch.randn(3072, 576) for _ in range(30)]
    size = sum(w.numel() * w.element_size() for w in weights)

    def rate(call: Callable[[torch.Tensor], torch.Tensor], ws: list[torch.Tensor]) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for w in ws:
                call(w)
            times.append(time.perf_counter() - start)
        return size / statistics.median(times) / 1e9

    print("| rows | W @ x.T | F.linear(x, W) | oneDNN packed |")
    print("|---:|---:|---:|---:|")
    for b in batches:
        x = torch.randn(b, 576)
        xt = x.t().contiguous()
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, b) for w in weights]
        mm = rate(lambda w, xt=xt: torch.mm(w, xt), weights)
        linear = rate(lambda w, x=x: F.linear(x, w), weights)
        onednn = rate(lambda w, x=x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), packed)
        print(f"| {b} | {mm:.1f} | {linear:.1f} | {onednn:.1f} |")


def main() -> None:
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.rollout import RolloutEngine
    from rlhfkit.rollout.engine import SamplingConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="the matmul kernels alone (no model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(" ".join([Path(sys.executable).name, *sys.argv]))
    if args.kernels:
        return kernels(args.batches)
    model, tokenizer = load_causal_lm(args.model)
    model.requires_grad_(False).eval()
    engine = RolloutEngine(model, tokenizer)
    messages = [{"role": "user", "content": "Tell me about the history of the bicycle."}]
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    if isinstance(prompt[0], str):  # a BatchEncoding's keys
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, stop_at_eos=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"backend {engine.backend_name}; {weights / 1e6:.0f} MB of weights; prompt {len(prompt)} tokens; "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    print("| batch | ms / step | tokens / s | weights streamed (GB/s) |")
    print("|---:|---:|---:|---:|")
    for b in args.batches:
        times = []
        for r in range(args.rounds + 1):  # round 0: warm-up
            start = time.perf_counter()
            engine.generate([prompt] * b, config, torch.Generator().manual_seed(r))
            times.append(time.perf_counter() - start)
        step = statistics.median(times[1:]) / args.new_tokens
        print(f"| {b} | {step * 1e3:.1f} | {b / step:.1f} | {weights / step / 1e9:.1f} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate([prompt], config, torch.Generator().manual_seed(0))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
