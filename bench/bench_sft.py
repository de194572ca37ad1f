"""SFT step speed on the embedded default model, with tokens/s and MFU against the fp32 matmul peak.

    .venv/bin/python bench/bench_sft.py --data ../shared/bench-data/sft.jsonl --steps 4

Same settings as the TRL SFTTrainer anchor in shared/ANCHORS.md: SmolLM2-135M-Instruct in float32,
2 threads, batch 8, max length 256, completion-only loss. Runs our real trainer's optimizer steps (forward,
backward, AdamW) after one warm-up step and reports the median.

FLOPs of a step (what the step must compute, the "floor" at the measured matmul peak), with
`common.LlamaShape`:
  forward = 2 * body_params * tokens                 (every real token through the decoder layers)
          + 2 * hidden * vocab * labelled_tokens     (the output layer, only where there is a label)
          + 2 * 2 * layers * heads * head_dim * sum_i T_i^2/2  (causal attention scores and values)
  training step = 3 x forward (backward = 2 x forward)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import ANCHOR_PEAK_GFLOPS, DATA_DIR, LlamaShape, matmul_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DATA_DIR / "sft.jsonl"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rlhfkit.config import load_config
    from rlhfkit.trainers.sft import SFTConfig, SFTTrainer, prepare_sft

    with tempfile.TemporaryDirectory() as out:
        sets = [
            f"model={args.model}", f"data.path={args.data}", f"output={out}",
            f"data.max_length={args.max_length}",
            "data.truncation=true", "data.eval_fraction=0", f"train.batch_size={args.batch_size}",
            f"train.threads={args.threads}", "train.save_every=0",
        ]  # fmt: skip
        cfg = load_config(SFTConfig, None, sets)
        train, _ = prepare_sft(cfg)
        trainer = SFTTrainer(cfg, train, [])
        _ = trainer.scheduler
        shape = LlamaShape.from_config(trainer.model.config.to_dict())
        body = shape.body_params
        times, flops, tokens, padded = [], [], [], []
        for step in range(args.steps + 1):
            examples = trainer.step_examples(step)
            real = sum(len(ex) for ex in examples)
            labelled = sum(len(ex) - ex.answer_start for ex in examples)
            forward = shape.forward(real, labelled, sum(len(ex) ** 2 for ex in examples))
            batches = trainer.micro_batches(examples)
            t0 = time.perf_counter()
            trainer.optimize(batches, trainer.loss)
            seconds = time.perf_counter() - t0
            if step == 0:
                continue  # warm-up
            times.append(seconds)
            flops.append(3 * forward)
            tokens.append(real)
            padded.append(sum(b["input_ids"].numel() for b in batches))
    peak = matmul_peak()
    med = statistics.median(times)
    achieved = statistics.median(f / t for f, t in zip(flops, times, strict=True)) / 1e9
    print(f"model {args.model}: body params {body / 1e6:.1f}M, threads {args.threads}")
    print(f"matmul peak (measured, 2048^3 fp32): {peak:.0f} GFLOP/s")
    print(f"steps: {', '.join(f'{t:.2f}' for t in times)} s; median {med:.2f} s/step")
    print(f"real tokens/step {statistics.mean(tokens):.0f} (padded {statistics.mean(padded):.0f})")
    print(f"tokens/s {statistics.mean(tokens) / med:.0f}; achieved {achieved:.0f} GFLOP/s")
    anchor = ANCHOR_PEAK_GFLOPS
    print(f"MFU vs {anchor:.0f} GFLOP/s: {achieved / anchor:.0%}; vs measured peak: {achieved / peak:.0%}")
    floor = statistics.median(flops) / 1e9
    print(f"FLOP floor: {floor / anchor:.2f} s/step at {anchor:.0f} GFLOP/s, {floor / peak:.2f} at the peak")


if __name__ == "__main__":
    main()
