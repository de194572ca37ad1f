"""`rlhfkit feedback prepare`: sample K answers per prompt and store them as a labelling project.

Sampling runs in batches through the RolloutEngine (KV cache, Llama fast path), seeded, with a progress bar.
Repeated answers of one prompt are merged (people cannot rank identical texts and the ranking format
forbids duplicates), empty ones dropped, and a prompt left with fewer than two distinct answers is not
stored (the count is reported). The database is written in one transaction after sampling, so an
interrupted run leaves no half-made project behind.

    rlhfkit feedback prepare --model runs/pipeline/sft --prompts bundled:prompts.jsonl --k 3 --db fb.sqlite
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.config import setting
from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.engine import SamplingConfig

MAX_K = 10  # more answers than this cannot be ranked carefully on one page (and keys a-j name them)


@dataclass
class PrepareConfig:
    """Settings of `rlhfkit feedback prepare`."""

    model: str
    """Model that writes the answers: registered name, local directory or hub id."""
    prompts: str
    """Prompts file ({"prompt": ...} rows; .jsonl/.json/.csv/.parquet) or bundled:NAME."""
    db: str
    """SQLite file to create (refused if it already holds a project)."""
    k: int = setting(3, ge=2, le=MAX_K)
    """Answers sampled per prompt (2 to 10)."""
    overlap: int = setting(2, ge=1)
    """N: annotators who label each item (agreement needs at least 2)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.8))
    """How answers are sampled (temperature 0 would make the K answers identical)."""
    seed: int = setting(0, ge=0)
    """Seed of the sampling generator: the same seed gives the same answers."""
    batch_size: int = setting(16, ge=1)
    """Sequences per RolloutEngine batch."""
    guidelines: str | None = None
    """Text file with the labelling guidelines shown to annotators (default: a short generic text)."""


def _check(cfg: PrepareConfig) -> None:
    if not 2 <= cfg.k <= MAX_K:
        raise RlhfkitError(f"--k must be between 2 and {MAX_K}, got {cfg.k}")
    if cfg.overlap < 1:
        raise RlhfkitError(f"--overlap must be at least 1, got {cfg.overlap}")
    if cfg.sampling.temperature <= 0:
        raise RlhfkitError("--temperature must be > 0: greedy decoding gives K identical answers")
    if cfg.batch_size < 1 or cfg.sampling.max_new_tokens < 1:
        raise RlhfkitError("--batch-size and --max-new-tokens must be at least 1")


def sample_answers(cfg: PrepareConfig, records: list) -> list[list[str]]:
    """K decoded answers for each prompt record, sampled in batches of ``cfg.batch_size`` sequences."""
    import torch

    from rlhfkit.data.encoding import checked_prompt_ids
    from rlhfkit.models.loading import context_length, load_causal_lm
    from rlhfkit.rollout import RolloutEngine

    model, tokenizer = load_causal_lm(cfg.model)
    limit = context_length(model) - cfg.sampling.max_new_tokens
    encoded = [
        checked_prompt_ids(tokenizer, r, limit, "the model's context minus --max-new-tokens") for r in records
    ]
    rows = [i for i in range(len(records)) for _ in range(cfg.k)]  # prompt index of each sequence
    texts = RolloutEngine(model, tokenizer).sample_texts(
        [encoded[i] for i in rows], cfg.sampling, torch.Generator().manual_seed(cfg.seed),
        cfg.batch_size, "feedback: sampling",
    ).texts  # fmt: skip
    return [texts[p * cfg.k : (p + 1) * cfg.k] for p in range(len(records))]


def distinct(answers: list[str]) -> list[str]:
    """Non-empty answers, each once, in sampling order."""
    return list(dict.fromkeys(a for a in answers if a.strip()))


def run_prepare(cfg: PrepareConfig) -> dict[str, int]:
    """Validate the inputs, sample, store; returns counts (items stored, prompts dropped, answers)."""
    from rlhfkit.data.records import load_prompts, resolve_data_path
    from rlhfkit.feedback.store import DEFAULT_GUIDELINES, create_project, open_db

    _check(cfg)
    records = load_prompts(resolve_data_path(cfg.prompts))
    guidelines = DEFAULT_GUIDELINES
    if cfg.guidelines is not None:
        try:
            guidelines = Path(cfg.guidelines).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RlhfkitError(f"{cfg.guidelines}: cannot read the guidelines ({exc.strerror})") from None
    conn = open_db(cfg.db, create=True)
    try:
        if conn.execute("SELECT count(*) FROM items").fetchone()[0]:  # fail before sampling, not after
            raise RlhfkitError(f"{cfg.db} already holds a labelling project; use a new --db file")
        answers = sample_answers(cfg, records)
        items = [
            (rec.prompt, [(text, cfg.model) for text in distinct(texts)])
            for rec, texts in zip(records, answers, strict=True)
        ]
        kept = [item for item in items if len(item[1]) >= 2]
        if not kept:
            raise RlhfkitError(
                "no prompt got two distinct non-empty answers; raise --temperature or --max-new-tokens"
            )
        create_project(conn, kept, cfg.overlap, guidelines)
    finally:
        conn.close()
    return {"items": len(kept), "dropped": len(items) - len(kept), "answers": sum(len(a) for _, a in kept)}
