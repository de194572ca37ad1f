"""`rlhfkit generate`: offline batch sampling, `n` answers to every prompt of a file, as JSONL.

    rlhfkit generate --model runs/ppo --prompts prompts.jsonl --output answers.jsonl --n 4 \
        --set sampling.temperature=0.7

Each output row is the prompt record's fields plus ``completion``, ``sample`` (0..n-1), ``tokens`` (EOS
included) and ``finish_reason`` ("stop" or "length"), in prompt order. The prompts are read and checked
(characters, then tokens against the context minus max_new_tokens) before anything is sampled: a bad record
stops the command with one line naming file:line:field. The file is written atomically at the end.
Sampling is `LocalLLM.complete`, i.e. `RolloutEngine.sample_texts`, seeded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.chat.llm import LocalLLM
from rlhfkit.config import setting
from rlhfkit.data.records import load_prompts, resolve_data_path
from rlhfkit.errors import ConfigError
from rlhfkit.fileio import write_atomic
from rlhfkit.rollout.engine import SamplingConfig


@dataclass
class GenerateConfig:
    """Settings of `rlhfkit generate`."""

    model: str = ""
    """Model: registered name or local directory."""
    prompts: str = ""
    """Prompts file (or bundled:NAME): rows with a `prompt` (text or messages)."""
    output: str = ""
    """JSONL file to write."""
    n: int = setting(1, ge=1)
    """Answers per prompt."""
    seed: int = 0
    """Sampling seed: the same seed gives the same answers."""
    batch_size: int = setting(32, ge=1)
    """Rows sampled together."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the model."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How to sample (temperature, top_p, top_k, max_new_tokens)."""


def run_generate(cfg: GenerateConfig) -> int:
    """Sample and write the answers; returns the number of rows written."""
    for name in ("model", "prompts", "output"):
        if not getattr(cfg, name):
            raise ConfigError(f"generate needs --{name}")
    records = load_prompts(resolve_data_path(cfg.prompts))
    llm = LocalLLM(cfg.model, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)
    ids = llm.engine.encode_prompts(records, cfg.sampling.max_new_tokens)
    answers = llm.complete(ids, cfg.sampling, n=cfg.n, seed=cfg.seed, label="generate")
    rows = [
        {**rec.fields, "prompt": rec.prompt, "completion": c.text, "sample": j, "tokens": c.tokens,
         "finish_reason": c.finish_reason}
        for rec, completions in zip(records, answers, strict=True)
        for j, c in enumerate(completions)
    ]  # fmt: skip
    write_atomic(Path(cfg.output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
