"""What every bench script shares: the matmul peak, FLOP counts of a Llama, memory, settings, child runs.

Imports only the standard library and torch, so the TRL workers (in their own virtual environment, without
rlhfkit) import it too.

FLOPs of a Llama (multiply-adds count 2; embeddings are lookups; norms and activations are ignored):
  body  = layers x (q, o: 2 x C x H x hd  +  k, v: 2 x C x Hkv x hd  +  MLP: 3 x C x I)    (+ norm weights)
  head  = C x V                                        (the output layer; counted once when it is tied)
  forward of R real tokens, L of which need logits, rows of lengths T_i:
        2 x body x R  +  2 x head x L  +  attention,   attention = 4 x layers x H x hd x sum_i T_i^2 / 2
        (QK^T and AV over the causal half of each row)
  backward = 2 x forward, so a training pass is 3 x forward ("6N per token").
  decode of one token at context length c: 2 x (body + head) + 4 x layers x H x hd x c.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "bench-data"  # sft.jsonl, preference.jsonl, grpo_prompts.jsonl
ANCHOR_PEAK_GFLOPS = 175.0  # fp32 2048^3 matmul peak of the 2-core machine in shared/ANCHORS.md


@dataclass(frozen=True)
class BenchSettings:
    """The settings both sides of the side-by-side bench run with (those of shared/ANCHORS.md)."""

    threads: int = 2
    """torch threads in every worker."""
    batch_size: int = 8
    """SFT examples, RM and DPO pairs, GRPO prompts per optimizer step."""
    max_length: int = 256
    """Longest prompt + answer (SFT, RM, DPO); longer ones are truncated on both sides."""
    sft_lr: float = 2e-5
    """SFT learning rate (constant schedule on both sides; speed does not depend on it)."""
    rm_lr: float = 1e-5
    """Reward-model learning rate."""
    dpo_lr: float = 1e-6
    """DPO learning rate."""
    dpo_beta: float = 0.1
    """DPO beta; the reference model is a separate frozen copy on the TRL side."""
    num_generations: int = 4
    """GRPO group size G: batch_size prompts x G answers per step."""
    completion_length: int = 64
    """New tokens per answer (GRPO, PPO); both sides generate exactly this many (EOS stopping off)."""
    grpo_beta: float = 0.04
    """GRPO KL coefficient (> 0: the reference model is loaded and run)."""
    grpo_temperature: float = 1.0
    """GRPO sampling temperature (TRL's default)."""
    rl_lr: float = 1e-6
    """GRPO / PPO learning rate."""
    ppo_rollouts: int = 16
    """PPO rollouts (prompts, one answer each) per iteration."""
    ppo_epochs: int = 4
    """PPO epochs over each rollout batch (one minibatch: one optimizer update per epoch)."""
    ppo_temperature: float = 0.7
    """PPO sampling temperature."""
    ppo_kl_coef: float = 0.05
    """PPO KL coefficient (fixed)."""
    generate_batch: int = 32
    """Rows of the generation-only bench."""


SETTINGS = BenchSettings()


# ------------------------------------------------------------------------------------------- machine
def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul GFLOP/s with the current torch thread count (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: MKL picks its kernels and allocates once
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Highest resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_average() -> float:
    return os.getloadavg()[0]


def run_child(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, int, float]:
    """Run `cmd` to completion (stdout and stderr to `log`) -> (exit code, its peak RSS in bytes, seconds).

    The peak RSS comes from wait4 on this one child, so it is per process, not a maximum over all
    children so far as RUSAGE_CHILDREN would give."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama-style decoder that its FLOPs depend on."""

    layers: int
    hidden: int  # C
    heads: int  # H
    kv_heads: int  # Hkv
    head_dim: int  # hd
    intermediate: int  # I
    vocab: int  # V

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> LlamaShape:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LlamaShape:
        """From a transformers config as a dict (config.json, or `model.config.to_dict()`)."""
        heads = cfg["num_attention_heads"]
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
        )

    @property
    def body_params(self) -> int:
        """Parameters of the decoder layers and the final norm (no embedding, no output layer)."""
        c, hd = self.hidden, self.head_dim
        attn = 2 * c * self.heads * hd + 2 * c * self.kv_heads * hd  # q, o + k, v
        return self.layers * (attn + 3 * c * self.intermediate + 2 * c) + c

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    def attention(self, sum_sq: float) -> float:
        """Causal self-attention of rows whose squared lengths sum to `sum_sq`."""
        return 4 * self.layers * self.heads * self.head_dim * sum_sq / 2

    def forward(self, tokens: float, logit_tokens: float, sum_sq: float) -> float:
        """One forward pass over `tokens` real tokens, the output layer on `logit_tokens` of them."""
        return 2 * self.body_params * tokens + 2 * self.head_params * logit_tokens + self.attention(sum_sq)

    def decode(self, rows: int, prompt_len: float, new_tokens: int) -> float:
        """Sampling `new_tokens` per row after prompts of mean length `prompt_len` (prefill not counted)."""
        context = rows * (new_tokens * prompt_len + new_tokens * (new_tokens + 1) / 2)
        return 2 * (self.body_params + self.head_params) * rows * new_tokens + (
            4 * self.layers * self.heads * self.head_dim * context
        )


def step_flops(trainer: str, shape: LlamaShape, s: dict[str, Any], minimal: bool) -> float:
    """FLOPs of one optimizer step of `trainer` from the step's token statistics `s` (what a worker
    records).

    minimal=True: the floor. The forward/backward passes run over the step's prefix trie (`trie_tokens`:
    a prompt or prefix several rows share is computed once), the output layer only where a log-prob is
    needed, each distinct prompt prefilled once for generation.
    minimal=False: the work the side actually did, "6N" style: its passes over the tokens it processed
    (`processed_tokens`: rlhfkit runs shared prompts once; TRL runs every row in full), the output layer
    on every one of them."""
    if trainer == "generate":
        return shape.decode(s["rows"], s["prompt_tokens"] / s["rows"], s["new_tokens"])
    real, sum_sq = s["real_tokens"], s["sum_sq"]
    tokens = s.get("trie_tokens", real) if minimal else s.get("processed_tokens", real)
    logits = s["logit_tokens"] if minimal else tokens
    if trainer in ("sft", "rm", "dpo"):
        passes = {"sft": 3, "rm": 3, "dpo": 4}[trainer]  # DPO: + the reference forward
        return passes * shape.forward(tokens, logits if trainer != "rm" else 0, sum_sq)
    # RL: generation, then forward-only passes (reference, value, reward), then the training passes
    rows, prompt, new = s["rows"], s["prompt_tokens"], s["new_tokens"]
    prefill_tokens = s["unique_prompt_tokens"] if minimal else prompt
    generation = shape.forward(prefill_tokens, 0, 0) + shape.decode(rows, prompt / rows, new)
    policy_fwd = shape.forward(tokens, logits, sum_sq)
    critic_fwd = shape.forward(tokens, 0, sum_sq)
    if trainer == "grpo":
        return generation + policy_fwd + 3 * policy_fwd  # reference + one update (num_iterations 1)
    if trainer == "ppo":
        # reference + value + reward forwards, then each epoch trains policy and value
        return generation + policy_fwd + 2 * critic_fwd + s["epochs"] * 3 * (policy_fwd + critic_fwd)
    raise ValueError(f"unknown trainer {trainer!r}")


def rows_of(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each row of a padded batch (any padding side, holes allowed)."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def trie_tokens(sequences: list[list[int]]) -> int:
    """Nodes of the prefix trie of `sequences`: the fewest token positions a forward pass over all of them
    must compute when every shared prefix (prompt, system prompt) is computed once."""
    root: dict[int, dict] = {}
    nodes = 0
    for seq in sequences:
        node = root
        for token in seq:
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                nodes += 1
            node = child
    return nodes


# ------------------------------------------------------------------------------------------- shared data
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def length_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """The GRPO bench reward on both sides: cheap (no model), so the step times generation and training
    only, as the anchor's profile does. Prefers answers of ~200 characters. Accepts plain strings (rlhfkit)
    and conversational completions, lists of messages (TRL)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [-abs(len(t) - 200) / 200 for t in texts]


def sequence_stats(mask: torch.Tensor) -> tuple[int, int, float]:
    """(real tokens, padded tokens, sum of squared row lengths) of an attention mask (rows, T)."""
    lengths = mask.sum(-1).double()  # (rows,)
    return int(lengths.sum()), mask.numel(), float((lengths**2).sum())


# ------------------------------------------------------------------------------------------- workers
class StepRecorder:
    """Per-step records of a worker: the seconds of each optimizer step, the token statistics of the
    batches it consumed (summed over its micro-batches), and the memory after it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.setup_seconds: float | None = None
        self.pending: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.extra: dict[str, Any] = {}
        """Run-level facts to report (e.g. the seconds of a one-off reference pass)."""

    def add(self, **stats: float) -> None:
        """Count statistics of a batch of the step in progress."""
        for key, value in stats.items():
            self.pending[key] = self.pending.get(key, 0.0) + float(value)

    def end_step(self, seconds: float) -> None:
        if self.setup_seconds is None:
            self.setup_seconds = time.perf_counter() - self.start - seconds
        self.steps.append(
            {"seconds": seconds, **self.pending, "rss": rss_bytes(), "threads": torch.get_num_threads()}
        )
        self.pending = {}

    def write(self, path: str | Path, warmup: int, **extra: Any) -> None:
        """The JSON a worker hands back to the driver; the first `warmup` steps are marked, not dropped."""
        record = {
            "warmup": warmup,
            "setup_seconds": self.setup_seconds,
            "steps": self.steps,
            "peak_rss": peak_rss_bytes(),
            **self.extra,
            **extra,
        }
        Path(path).write_text(json.dumps(record, indent=1))


def worker_args(description: str) -> Any:
    """The command line both workers take."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--trainer", required=True, choices=["sft", "rm", "dpo", "grpo", "ppo", "generate"])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--model", required=True, help="local transformers directory of the model")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="holds sft.jsonl, preference.jsonl, ...")
    parser.add_argument(
        "--max-length",
        type=int,
        default=SETTINGS.max_length,
        help="SFT/RM/DPO length limit (a character-level tiny model needs ~1024)",
    )
    parser.add_argument("--threads", type=int, default=SETTINGS.threads, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args
