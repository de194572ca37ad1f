"""Helpers that several test modules share: stage configs and data for the trainers, reward functions, rollout
oracles and tiny model families, evaluation models, and servers run the way users run them. Fixtures live in
tests/conftest.py; a helper that one module alone uses stays in that module."""

from __future__ import annotations

import os
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from safetensors.torch import load_file
from tests.conftest import free_port, wait_until_up, write_jsonl
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlhfkit.config import load_config
from rlhfkit.feedback import store
from rlhfkit.feedback.app import create_app
from rlhfkit.models.loading import build_reward_model, load_causal_lm
from rlhfkit.rollout import RolloutEngine, position_ids_from_mask
from rlhfkit.trainers.dpo import DPOConfig
from rlhfkit.trainers.grpo import GRPOConfig
from rlhfkit.trainers.ppo import PPOConfig
from rlhfkit.trainers.rm import RMConfig
from rlhfkit.trainers.sft import SFTConfig


# ------------------------------------------------------------------------------- stage configs and runs
def sft_config(model: Path, data: Path, out: Path, *sets: str) -> SFTConfig:
    base = [
        f"model={model}",
        f"data.path={data}",
        f"output={out}",
        "data.eval_fraction=0",
        "train.save_every=0",
    ]
    return load_config(SFTConfig, None, base + list(sets))


def rm_config(model: Path, data: Path, out: Path, *sets: str) -> RMConfig:
    # one thread: a tiny model gains nothing from two, and it keeps the tests fast on a busy machine
    base = [f"model={model}", f"data.path={data}", f"output={out}", "train.save_every=0", "train.threads=1"]
    return load_config(RMConfig, None, base + list(sets))


def dpo_config(model: Path, data: Path, out: Path, *sets: str) -> DPOConfig:
    # one thread: a tiny model gains nothing from two, and it keeps the tests fast on a busy machine
    base = [f"policy={model}", f"data.path={data}", f"output={out}", "train.save_every=0", "train.threads=1"]
    return load_config(DPOConfig, None, base + list(sets))


def grpo_config(cls: type[GRPOConfig], model: Path, prompts: Path, out: Path, *sets: str) -> GRPOConfig:
    base = [
        f"policy={model}", f"prompts={prompts}", f"output={out}", "sampling.max_new_tokens=16",
        "sampling.temperature=1.0",
        "prompts_per_step=8", "num_generations=4", "sample_every=0", "train.save_every=0",
        "reward_fn=tests.helpers:count_target", "train.scheduler=cosine",
    ]  # fmt: skip
    return load_config(cls, None, base + list(sets))


def ppo_config(model: Path, prompts: Path, out: Path, *sets: str) -> PPOConfig:
    base = [
        f"policy={model}", f"prompts={prompts}", f"output={out}", "sampling.max_new_tokens=16",
        "rollout_batch=32",
        "sampling.temperature=1.0", "no_eos_score=null", "sample_every=0", "train.save_every=0",
        "train.scheduler=cosine",  # the schedule these tests were tuned with
    ]  # fmt: skip
    return load_config(PPOConfig, None, base + list(sets))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


class Stop(Exception):
    pass


# --------------------------------------------------------------------------------- data and rewards
# 4-letter fillers; three start with "g", so a single character cannot give away the word "good"
FILLERS = ["blue", "cold", "warm", "soft", "dark", "tall", "slow", "fast", "gold", "grey", "goat", "thin"]


def good_word_pairs(n: int, seed: int) -> list[dict]:
    """Random prompts; chosen = four random words with "good" in one slot, rejected = the same words with a
    filler in that slot: same length, same other words, so only the presence of "good" separates them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(FILLERS, 4)
        chosen = list(words)
        chosen[rng.randrange(4)] = "good"
        rows.append({"prompt": f"Item {rng.randrange(1000)}:", "chosen": " " + " ".join(chosen),
                     "rejected": " " + " ".join(words)})  # fmt: skip
    return rows


def good_word_rankings(n: int, seed: int) -> list[dict]:
    """K = 4 answers ranked by how many "good" they hold (2 > 1 = 1 > 0, a tie in the middle)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answers = []
        for goods in (2, 1, 1, 0):
            words = rng.sample(FILLERS, 4)
            for slot in rng.sample(range(4), goods):
                words[slot] = "good"
            answers.append(" " + " ".join(words))
        order = rng.sample(range(4), 4)  # shuffle the completions; the ranking points back to them
        completions = [answers[i] for i in order]
        best, mid, worst = order.index(0), [order.index(1), order.index(2)], order.index(3)
        rows.append({"prompt": f"Item {rng.randrange(1000)}:", "completions": completions,
                     "ranking": [best, mid, worst]})  # fmt: skip
    return rows


def grpo_prompts_file(tmp_path: Path, n: int = 16) -> Path:
    rows = [
        {"prompt": [{"role": "user", "content": f"Write {i}."}], "target": "a" if i % 2 else "e"}
        for i in range(n)
    ]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def count_target(prompts: list[str], completions: list[str], target: list[str], **fields) -> list[float]:
    """Verifiable reward: how many answer characters equal the prompt's own `target` field."""
    return [float(c.count(t)) for c, t in zip(completions, target, strict=True)]


def constant(prompts: list[str], completions: list[str], **fields) -> list[float]:
    return [1.0] * len(completions)


def ppo_prompts_file(tmp_path: Path) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"Say something {i}."}]} for i in range(32)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


PPO_TARGET = "a"


def ppo_count_target(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Programmatic reward: how many answer characters equal PPO_TARGET (at most max_new_tokens = 16)."""
    return [float(sum(ch == PPO_TARGET for ch in c)) for c in completions]


# ---------------------------------------------------------------------- rollout oracles, model families
PAD, EOS, VOCAB = 0, 1, 128
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 20, 21], [5, 6, 7, 8, 30], [5, 6, 7, 8, 20, 21], [40, 41]]
FAMILY_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    eos_token_id=EOS,
)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    temperature: float = 1.0,
    completion_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: log-probs (B, T) of input_ids[:, completion_start:] from one plain transformers forward."""
    pos = position_ids_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits  # (B, L, V)
    logits = logits[:, completion_start - 1 : -1].float()  # (B, T, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, completion_start:, None]).squeeze(-1)
    return lp if completion_mask is None else lp * completion_mask


def family_model(kind: str, dtype: torch.dtype = torch.float32, **overrides: object) -> torch.nn.Module:
    """A tiny random model of one family; Qwen2 gets random q/k/v biases, Qwen3 head_dim != D / H and
    random q/k norm weights, Llama untied embeddings, so each family's own parts matter."""
    torch.manual_seed(0)
    kw: dict = {**FAMILY_SHAPE, **overrides}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **kw))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **kw))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, tie_word_embeddings=True, **kw))
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # sharper logits than the 0.02 init
        for name, p in model.named_parameters():
            if name.endswith("proj.bias") or "q_norm" in name or "k_norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model.to(dtype).eval()


def hf_logprobs(model: torch.nn.Module, r: object, temperature: float = 1.0) -> torch.Tensor:
    """The trainer's view: log-probs (B, T) of the completion from one plain forward over prompt + answer."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(
            input_ids=r.input_ids.to(device),
            attention_mask=r.attention_mask.to(device),
            position_ids=r.position_ids.to(device),
        ).logits.cpu()  # (B, L, V)
    logits = logits[:, r.completion_start - 1 : -1].float() / temperature  # (B, T, V)
    lp = torch.log_softmax(logits, -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    return lp * r.completion_mask


def rollout_engine(model: torch.nn.Module, backend: str, eos: int = EOS) -> RolloutEngine:
    return RolloutEngine(model, eos_token_ids=[eos], pad_token_id=PAD, backend=backend)


def eos_ending_rows(completion_ids: torch.Tensor, rows: int = 2) -> int:
    """A token that at least `rows` rows of a greedy rollout produce, but not every row, the earliest there
    is: as the EOS, it ends those rows while others run on, so the batch compacts into a smaller bucket."""
    for k in range(1, completion_ids.shape[1] + 1):
        counts = Counter(tok for row in completion_ids[:, :k].tolist() for tok in set(row))
        for token, n in counts.most_common():
            if rows <= n < completion_ids.shape[0] and token not in (PAD, EOS):
                return token
    raise AssertionError(f"no token ends {rows} rows of {completion_ids.tolist()}")


# ------------------------------------------------------------------------------------ evaluation models
def perturbed_model(base: Path, out: Path, seed: int, scale: float = 0.2) -> Path:
    """A copy of the tiny model with Gaussian noise on its matrices: the untouched random model answers
    every prompt with newlines, a perturbed one with varied characters (so gold scores differ)."""
    if (out / "config.json").is_file():
        return out
    model, tokenizer = load_causal_lm(str(base))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reward_model(base: Path, out: Path) -> Path:
    """A reward model with a random (seeded) head on the tiny model."""
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model, tokenizer = build_reward_model(str(base))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def eval_prompts(path: Path, n: int = 6) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about item {i}?"}]} for i in range(n)]
    return write_jsonl(path, rows)


# -------------------------------------------------------------------------------------------- servers
@contextmanager
def running_server(model: Path, *options: str) -> Iterator[str]:
    """`rlhfkit serve` in its own process on a free loopback port; yields the /v1 base URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "rlhfkit.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        *options,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: threads only add overhead on a shared CPU
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, f"{base}/health", timeout=120)
        yield f"{base}/v1"
    finally:
        server.terminate()
        server.wait(timeout=30)


PASSWORD = "correct horse battery"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"><b>bold</b>'


def make_project(
    db: Path, items: Sequence[tuple[Any, Sequence[str]]], overlap: int, users: dict[str, str]
) -> sqlite3.Connection:
    """A feedback project of ``(prompt, answer texts)`` items and ``{name: role}`` accounts (all with
    PASSWORD)."""
    conn = store.open_db(db, create=True)
    store.create_project(
        conn, [(p, [(a, f"model-{i % 2}") for i, a in enumerate(ans)]) for p, ans in items], overlap
    )
    for name, role in users.items():
        store.add_user(conn, name, role, PASSWORD)
    return conn


@contextmanager
def live_server(db: Path, **options: Any) -> Iterator[str]:
    """Serve the feedback app (``create_app(db, **options)``) with uvicorn in a thread on a free loopback
    port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(db, **options), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:  # readiness poll: `started` flips once the socket accepts connections
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
