"""Evaluate a policy against its reference on held-out prompts: gold win rate, rewards, KL, lengths.

    rlhfkit eval --policy runs/x/rl --reference runs/x/sft --reward runs/x/rm --output runs/x/eval

    from rlhfkit.evaluation.evaluate import EvalConfig, run_eval
    results = run_eval(EvalConfig(policy="runs/x/rl", reference="runs/x/sft", output="runs/x/eval"))

What is measured, over N prompts (Shapes: B rows of a batch, P prompt tokens, T answer tokens):

* Answers: one greedy answer (temperature 0) per prompt from each model, so the evaluation is deterministic
  and a policy equal to its reference gives the same answers (every prompt a tie, win rate exactly 0.5).
* Win rate of the policy over the reference under the gold preference (`rlhfkit.rewards.panel`, or a user's
  `module:function`): per prompt o_i = 1 (win), 0.5 (tie: gold scores within 1e-9) or 0 (loss), and
  win rate = mean(o). Its 95% interval is the normal interval on the per-prompt outcomes,
  mean +- z * s / sqrt(N), s the sample standard deviation (ddof 1), clipped to [0, 1]. Why this and not a
  bootstrap: it is closed form and deterministic (no resampling seed to report), it is the standard error
  AlpacaEval reports beside its win rates, and o_i is bounded, so the central limit theorem is accurate at
  the ~100 prompts of an evaluation set. Its weak spot: with few prompts and a rate near 0 or 1 it is too
  narrow (all wins gives [1, 1]); with N < 2 we use the largest possible s of a [0, 1] outcome, 0.5.
* KL(policy || reference) in nats per answer: `kl_samples` answers per prompt sampled from the policy at
  temperature 1, and per answer sum_t (log pi(y_t) - log pi_ref(y_t)) over its tokens (EOS included): the
  k1 estimator (Schulman 2020), unbiased for the sequence KL of the policy's answer distribution (answers
  cut at `max_new_tokens`). Both log-probs come from one fresh forward pass each (`completion_logprobs`),
  not from the sampler's own log-probs, so a policy equal to its reference gives exactly 0 and the estimate
  never mixes two kernels' rounding. We report the mean and its standard error.
* Reward-model accuracy against gold: over every pair of different-gold answers to the same prompt
  (policy greedy, reference greedy, policy samples), the share the reward model orders like gold (a reward
  tie counts 1/2). For scale it is shown beside the 65.7% agreement of one human with the others on
  AlpacaEval (`ALPACAEVAL_HUMAN_AGREEMENT`); ours is agreement with a noise-free gold, so the two bound the
  same quantity from different sides rather than measure it alike.

Prompts are encoded as the RL trainers encode them (`encoding.prompt_ids`: message lists through the chat
template, strings as they are); the gold function sees the display text (`encoding.chat_prompt_text`).
Outputs (written atomically): `output/eval.json` (numbers + config) and `output/answers.jsonl`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import setting, validate
from rlhfkit.console import console
from rlhfkit.data.encoding import chat_prompt_text
from rlhfkit.data.records import PromptRecord, load_prompts, resolve_data_path
from rlhfkit.errors import RlhfkitError
from rlhfkit.fileio import write_atomic
from rlhfkit.losses import kl_estimate
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs
from rlhfkit.rewards.panel import load_gold
from rlhfkit.rollout import Rollout, RolloutEngine, SamplingConfig

ALPACAEVAL_HUMAN_AGREEMENT = 0.657
"""Agreement of one human annotator with the majority of the others on AlpacaEval's human-annotated pairs,
65.7% (the "humans" row of AlpacaEval's evaluator leaderboard, https://github.com/tatsu-lab/alpaca_eval,
src/alpaca_eval/configs/README.md; Dubois et al. 2023, "AlpacaFarm", arXiv:2305.14387)."""
ALPACAEVAL_SOURCE = "AlpacaEval evaluator leaderboard, 'humans' row (Dubois et al. 2023, arXiv:2305.14387)"
TIE_TOL = 1e-9  # gold scores closer than this tie (as `judge.gold_ranks`)


@dataclass
class EvalConfig:
    """Settings of `rlhfkit eval`."""

    policy: str = "runs/rl"
    """The trained policy: model directory, registered name or hub id."""
    reference: str = "runs/sft"
    """The model it is compared with and whose KL it is measured against (normally the SFT model)."""
    prompts: str = "bundled:eval_prompts.jsonl"
    """Held-out prompts, {"prompt": ...} records (never trained on)."""
    reward: str | None = None
    """Reward model directory (from `rlhfkit rm`): adds RM scores and the RM's accuracy against gold."""
    gold: str | None = None
    """Gold preference: `module:function` of (prompt, answer) -> float; None: `rewards.panel.gold_score`."""
    output: str = "runs/eval"
    """Output directory for eval.json and answers.jsonl."""
    max_new_tokens: int = setting(64, ge=1)
    """Longest answer, in tokens (use the RL stage's value, so answers are cut where training cut them)."""
    batch_size: int = setting(16, ge=1)
    """Prompts per generation batch (and sequences per reward-model pass)."""
    kl_samples: int = setting(1, ge=1)
    """Answers sampled from the policy per prompt (temperature 1) to estimate the KL."""
    seed: int = setting(0, ge=0)
    """Seed of the sampling generator (the greedy answers do not depend on it)."""
    best_of: int = setting(0, ge=0)
    """Also sample this many reference answers per prompt (T=1) and keep the one the reward model scores
    highest: the best-of-N line RL is compared against (needs `reward`; 0: off)."""
    limit: int | None = setting(None, ge=1)
    """Evaluate only the first N prompts (quick checks)."""
    trust_remote_code: bool = False
    """Allow custom model code from the model directories."""


# ------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class WinRate:
    """Win rate of A over B with a normal confidence interval; see the module docstring."""

    rate: float
    stderr: float
    low: float
    high: float
    confidence: float
    wins: int
    ties: int
    losses: int


def outcomes(
    policy_gold: Sequence[float], reference_gold: Sequence[float], tol: float = TIE_TOL
) -> list[float]:
    """Per-prompt outcome of the policy: 1 if its gold score is higher, 0 if lower, 0.5 within `tol`."""
    return [
        1.0 if p - r > tol else 0.0 if r - p > tol else 0.5
        for p, r in zip(policy_gold, reference_gold, strict=True)
    ]


def mean_and_stderr(values: Sequence[float], worst_sd: float | None = None) -> tuple[float, float]:
    """(mean, s / sqrt(n)) with s the sample standard deviation (ddof 1); `worst_sd` stands in when n < 2
    (0.0 if not given)."""
    if not values:
        raise ValueError("mean_and_stderr needs at least one value")
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else (worst_sd or 0.0)
    return statistics.fmean(values), sd / math.sqrt(n)


def win_rate(outcome: Sequence[float], confidence: float = 0.95) -> WinRate:
    """mean(o) and the normal interval mean +- z s / sqrt(N), clipped to [0, 1] (o_i in {0, 0.5, 1})."""
    rate, se = mean_and_stderr(outcome, worst_sd=0.5)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)  # 1.96 for 95%
    return WinRate(
        rate=rate,
        stderr=se,
        low=max(0.0, rate - z * se),
        high=min(1.0, rate + z * se),
        confidence=confidence,
        wins=sum(o == 1.0 for o in outcome),
        ties=sum(o == 0.5 for o in outcome),
        losses=sum(o == 0.0 for o in outcome),
    )


def ranking_accuracy(
    gold: Sequence[Sequence[float]], scores: Sequence[Sequence[float]], tol: float = TIE_TOL
) -> tuple[float | None, int]:
    """(accuracy, pairs): over all pairs of answers to the same prompt whose gold scores differ by more than
    `tol`, the share that `scores` orders the same way (equal scores count 1/2); None when no pair differs.

    gold[i] and scores[i] hold the answers of prompt i, in the same order."""
    agree, pairs = 0.0, 0
    for g, s in zip(gold, scores, strict=True):
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if abs(g[i] - g[j]) <= tol:
                    continue
                pairs += 1
                agree += 0.5 if s[i] == s[j] else float((s[i] - s[j]) * (g[i] - g[j]) > 0)
    return (agree / pairs if pairs else None), pairs


# ------------------------------------------------------------------------------------------ generation
@dataclass
class Answers:
    """Decoded answers of one model, one row per generated answer."""

    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated tokens, EOS included (as PPO's answer_length)
    ended: list[bool] = field(default_factory=list)  # the answer reached EOS before max_new_tokens
    kl: list[float] = field(default_factory=list)  # sampled answers only: sum_t log pi - log pi_ref


@torch.no_grad()
def sequence_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    rollout: Rollout,
    pad_token_id: int,
    sampled_at_t1: bool = False,
) -> torch.Tensor:
    """k1 estimate of KL(pi || pi_ref) per answer, (B,): sum over answer tokens of log pi - log pi_ref, from
    a fresh forward pass (temperature 1) on the rollout's tokens. `sampled_at_t1`: the rollout was drawn
    from `policy` at temperature 1 with no top-k / top-p, so its log-probs already are log pi (token in,
    token out) and only the reference runs."""
    batch = SharedPromptBatch.from_rollout(rollout, pad_token_id)
    if sampled_at_t1:
        logprobs = rollout.logprobs * rollout.completion_mask  # (B, T)
    else:
        logprobs, _ = completion_logprobs(policy, batch, entropy=False)  # (B, T), zero on padding
    ref_logprobs, _ = completion_logprobs(reference, batch, entropy=False)  # (B, T)
    return (kl_estimate(logprobs, ref_logprobs, "k1") * rollout.completion_mask).sum(-1)  # (B,)


def generate_answers(
    engine: RolloutEngine,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    batch_size: int,
    label: str,
    generator: torch.Generator | None = None,
    reference: torch.nn.Module | None = None,
) -> Answers:
    """Answers to token-id prompts in batches, with progress; with `reference`, also each answer's KL of
    the engine's model to it."""
    t0 = time.perf_counter()
    generation = engine.sample_texts(prompts, sampling, generator, batch_size, label)
    out = Answers(texts=generation.texts)
    for rollout in generation.rollouts:
        out.tokens += rollout.lengths.tolist()
        out.ended += rollout.ended.tolist()
        if reference is not None:
            plain = sampling.temperature == 1.0 and sampling.top_k == 0 and sampling.top_p == 1.0
            out.kl += sequence_kl(engine.model, reference, rollout, engine.pad_token_id, plain).tolist()
    console.print(f"eval: {label}: {len(prompts)} answers in {time.perf_counter() - t0:.1f}s")
    return out


# ------------------------------------------------------------------------------------------ outputs
def _pair(reference: Sequence[float], policy: Sequence[float]) -> dict[str, float]:
    return {"reference": statistics.fmean(reference), "policy": statistics.fmean(policy)}


def reward_model_scores(
    cfg: EvalConfig, records: Sequence[PromptRecord], answers: Sequence[tuple[Answers, int]]
) -> list[list[float]]:
    """Normalised reward-model scores per prompt of every answer set, in order (each set holds `m`
    answers per prompt: reference 1, policy 1, samples k, best-of-N candidates N), all answers scored in
    one pass over batches of similar length."""
    from rlhfkit.rewards.mix import RewardModelScorer

    assert cfg.reward is not None
    scorer = RewardModelScorer(cfg.reward, cfg.batch_size, cfg.trust_remote_code)
    groups = [[a for ans, m in answers for a in ans.texts[i * m : (i + 1) * m]] for i in range(len(records))]
    width = len(groups[0])
    prompts = [r.prompt for r in records for _ in range(width)]
    flat = scorer.score(prompts, [a for group in groups for a in group]).tolist()  # (N width,)
    return [flat[i * width : (i + 1) * width] for i in range(len(records))]


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.policy` against `cfg.reference`; writes eval.json and answers.jsonl, returns eval.json.

    Prompts, gold function and models are all checked before anything is generated or written."""
    validate(cfg)
    records = load_prompts(resolve_data_path(cfg.prompts))[: cfg.limit]
    gold_fn = load_gold(cfg.gold)
    t_start = time.perf_counter()
    policy, tokenizer = load_causal_lm(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    reference, ref_tokenizer = load_causal_lm(cfg.reference, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise RlhfkitError(
            f"policy {cfg.policy} and reference {cfg.reference} use different tokenizers; "
            "the KL between them needs one vocabulary (compare a policy with the model it was trained from)"
        )
    policy.requires_grad_(False).eval()
    reference.requires_grad_(False).eval()
    texts = [chat_prompt_text(r.prompt) for r in records]
    n, k = len(records), cfg.kl_samples

    greedy = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    ref_engine = RolloutEngine(reference, ref_tokenizer)
    engine = RolloutEngine(policy, tokenizer)
    ids = engine.encode_prompts(records, cfg.max_new_tokens)
    ref = generate_answers(ref_engine, ids, greedy, cfg.batch_size, "reference (greedy)")
    best_of = cfg.best_of if cfg.reward is not None else 0
    candidates = generate_answers(
        ref_engine, [p for p in ids for _ in range(best_of)],
        SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0), cfg.batch_size,
        f"reference samples for best-of-{best_of}", torch.Generator().manual_seed(cfg.seed + 1),
    ) if best_of else Answers()  # fmt: skip
    del ref_engine  # its fused weight copies (Llama fast path) are not needed any more
    pol = generate_answers(engine, ids, greedy, cfg.batch_size, "policy (greedy)")
    sampled = generate_answers(
        engine, [p for p in ids for _ in range(k)],
        SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0), cfg.batch_size,
        f"policy samples for the KL ({k} per prompt)", torch.Generator().manual_seed(cfg.seed), reference,
    )  # fmt: skip
    t_generated = time.perf_counter()

    ref_gold = [float(gold_fn(p, a)) for p, a in zip(texts, ref.texts, strict=True)]
    pol_gold = [float(gold_fn(p, a)) for p, a in zip(texts, pol.texts, strict=True)]
    sample_gold = [float(gold_fn(texts[i // k], a)) for i, a in enumerate(sampled.texts)]
    # answers per prompt, in the order reference, policy, samples: gold and (below) RM scores
    gold_groups = [[ref_gold[i], pol_gold[i], *sample_gold[i * k : (i + 1) * k]] for i in range(n)]
    rm_all = None
    if cfg.reward is not None:
        rm_all = reward_model_scores(cfg, records, [(ref, 1), (pol, 1), (sampled, k), (candidates, best_of)])
    rm_groups = None if rm_all is None else [g[: 2 + k] for g in rm_all]

    outcome = outcomes(pol_gold, ref_gold)
    wr = win_rate(outcome)
    kl_mean, kl_se = mean_and_stderr(sampled.kl)
    result: dict[str, Any] = {
        "n_prompts": n,
        "win_rate": {
            **asdict(wr),
            "method": "normal interval on per-prompt outcomes (win 1, tie 0.5, loss 0)",
        },
        "gold": {**_pair(ref_gold, pol_gold), "policy_sampled": statistics.fmean(sample_gold)},
        "reward_model": None,
        "rm_accuracy": None,
        "kl": {"mean": kl_mean, "stderr": kl_se, "samples": len(sampled.kl)},
        "length_tokens": _pair(ref.tokens, pol.tokens),
        "length_words": _pair([len(a.split()) for a in ref.texts], [len(a.split()) for a in pol.texts]),
        "eos_rate": _pair(ref.ended, pol.ended),
    }
    if rm_groups is not None:
        accuracy, pairs = ranking_accuracy(gold_groups, rm_groups)
        result["reward_model"] = {
            **_pair([g[0] for g in rm_groups], [g[1] for g in rm_groups]),
            "policy_sampled": statistics.fmean(s for g in rm_groups for s in g[2:]),
        }
        result["rm_accuracy"] = {
            "accuracy": accuracy, "pairs": pairs,
            "human_agreement": ALPACAEVAL_HUMAN_AGREEMENT, "human_agreement_source": ALPACAEVAL_SOURCE,
        }  # fmt: skip
    if best_of and rm_all is not None:
        picks = [i * best_of + max(range(best_of), key=lambda j: g[2 + k + j]) for i, g in enumerate(rm_all)]
        bon_gold = [float(gold_fn(texts[p // best_of], candidates.texts[p])) for p in picks]
        result["best_of_n"] = {
            "n": best_of, "win_rate": asdict(win_rate(outcomes(bon_gold, ref_gold))),
            "gold": statistics.fmean(bon_gold),
            "method": "per prompt, the reward model's favourite of N reference samples at T=1, judged by "
                      "the gold preference against the reference's greedy answer",
        }  # fmt: skip
    t_end = time.perf_counter()
    result["seconds"] = {"generation": t_generated - t_start, "total": t_end - t_start}
    result["config"] = asdict(cfg)

    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(records):  # one line of answers.jsonl per prompt
        rm = rm_groups[i] if rm_groups is not None else [None] * (2 + k)
        samples = [
            {"answer": sampled.texts[j], "kl": sampled.kl[j], "gold": sample_gold[j], "rm": rm[2 + j - i * k]}
            for j in range(i * k, (i + 1) * k)
        ]
        rows.append({
            "prompt": rec.prompt, "reference_answer": ref.texts[i], "policy_answer": pol.texts[i],
            "reference_gold": ref_gold[i], "policy_gold": pol_gold[i],
            "reference_rm": rm[0], "policy_rm": rm[1], "outcome": outcome[i],
            "reference_tokens": ref.tokens[i], "policy_tokens": pol.tokens[i],
            "reference_ended": ref.ended[i], "policy_ended": pol.ended[i], "samples": samples,
        })  # fmt: skip
        if best_of and rm_all is not None:
            rows[-1]["best_of_n"] = [
                {"answer": candidates.texts[i * best_of + j], "rm": rm_all[i][2 + k + j]}
                for j in range(best_of)
            ]
            rows[-1]["best_of_n_pick"] = picks[i] - i * best_of
    out = Path(cfg.output)
    write_atomic(out / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(out / "eval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result
