"""Step B: the reward model, learned from preference pairs and rankings of K answers.

    rlhfkit rm --model runs/sft --data preferences.jsonl --output runs/rm

Model: `AutoModelForSequenceClassification` with one output, built from any causal LM checkpoint (the SFT
model in the pipeline): the decoder is kept, the new linear head is initialised with std 1/sqrt(C + 1) and
bias 0 (lm-human-preferences, Ziegler et al. 2019) rather than transformers' 0.02, dropout is off and the
pad token differs from EOS, so the saved directory loads as is with plain transformers and its score is
read at the last real token (the EOS). See `rlhfkit.rewards.mix` for how the score is computed and used.

Loss (Bradley-Terry; Stiennon et al. 2020, Ouyang et al. 2022): one training example is one prompt with
its K >= 2 answers; a pair is K = 2 with ranks (0, 1) and an optional Llama 2 margin. All answers of all
prompts of a micro-batch run through ONE decoder pass (a flat batch of N sequences); every prompt's
comparable pairs get weight 1 / n_pairs (`losses.pairwise_from_rankings`, ties form no pair), so each
prompt counts once: InstructGPT's "all K-choose-2 pairs of a prompt in one batch element". Optional reward
centering `centering_coef * mean((r_c + r_r)^2)` (Eisenstein et al. 2023). `train.batch_size` counts
prompts; the loop's loss normaliser is the number of prompts, so batch 8 x 1 equals 2 x 4 accumulation.

After training (lm-human-preferences; "N+ implementation details", Huang et al. 2024) the raw scores of a
calibration set of reference-policy answers give `shift` = mean (and `scale` = population std with
`normalize: shift_scale`); they are stored in config.json (`rlhfkit_reward_shift`, `rlhfkit_reward_scale`)
and `rlhfkit score` / `RewardModelScorer` return (raw - shift) / scale. By default the calibration set is
every answer of the preference data: in our pipeline those ARE samples of the reference (SFT) policy. If
yours are not (human-written answers, another model's), pass `calibration_data`: a prompt/completion file
sampled from the policy you will optimise.

Where we depart from TRL's RewardTrainer and why:
- the head runs on the N last-token hidden states only, found from the attention mask (TRL computes
  (N, T, 1) logits and finds the last token from the pad id): same value, less work, and correct under
  left padding;
- rankings of K answers are trained (TRL has pairs only), all answers of a prompt in one pass;
- prompts are grouped by length (as in SFT), so little compute goes into padding;
- normalisation constants live in config.json instead of being folded into the head: Llama's
  classification head has no bias.
Metrics: train/eval loss, pairwise accuracy and mean margin (r_c - r_r); at the end a calibration table
(predicted P(chosen preferred) = sigmoid(r_c - r_r) in 10 bins vs the observed frequency, over both
orderings of every eval pair, so it is symmetric) is printed and written to metrics.jsonl.

Shapes: N answers in a flat micro-batch, T tokens, C hidden size, P (better, worse) pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from rlhfkit.config import setting
from rlhfkit.console import console
from rlhfkit.data.encoding import PreferenceExample, SequenceExample, encode_answer, load_preference_examples
from rlhfkit.data.records import DATA_RENAMED, DataSettings, load_sft, resolve_data_path
from rlhfkit.device import resolve_runtime
from rlhfkit.losses import bradley_terry_loss, pairwise_from_rankings
from rlhfkit.models.loading import (
    DEFAULT_MODEL,
    build_reward_model,
    load_tokenizer,
    save_model,
    set_normalization,
)
from rlhfkit.models.prefix import SharedPromptBatch
from rlhfkit.rewards.mix import score_sequences, shared_rewards_at, shared_sequence_rewards
from rlhfkit.trainers.base import SupervisedTrainer
from rlhfkit.training.settings import StageConfig, TrainConfig, set_seed

SCORE_BATCH = 16  # sequences per forward pass when scoring without gradients (calibration)


@dataclass
class RMConfig(StageConfig):
    """Settings of `rlhfkit rm`."""

    model: str = DEFAULT_MODEL
    """Start from a causal LM (the SFT model) or a reward model: registered name, directory or hub id."""
    data: DataSettings = field(default_factory=DataSettings)
    """Preference pairs and/or rankings (`data.path`), held-out pairs, lengths."""
    output: str = "runs/rm"
    """Output directory: the reward model (transformers format), metrics, checkpoints."""
    centering_coef: float = setting(0.0, ge=0)
    """Reward centering: adds coef * mean((r_chosen + r_rejected)^2) to the loss (Eisenstein et al.: 0.01)."""
    normalize: Literal["none", "shift", "shift_scale"] = "shift"
    """After training: subtract the calibration mean ("shift"), also divide by the std ("shift_scale")."""
    calibration_data: str | None = None
    """Reference-policy samples (prompt/completion or messages) for the normalisation; default: every answer
    of the preference data (train and eval), which in the pipeline are samples of the reference policy."""
    turn_flag_coef: float = setting(1.0, ge=0)
    """Trajectory rankings with flagged turns: adds coef x the mean over flagged turns of
    -log sigmoid(r(before the turn) - r(end of the turn)), the score read at the two positions of the same
    pass, so the score drops at the turn where people said the episode went wrong (0: flags ignored)."""
    calibration_samples: int = setting(1024, ge=1)
    """Score at most this many calibration answers (a seeded random subset)."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-5, batch_size=8, epochs=1.0, scheduler="linear")
    )
    """The shared training loop; `batch_size` counts prompts (a pair is one prompt with 2 answers)."""

    RENAMED: ClassVar[dict[str, str]] = DATA_RENAMED


# ------------------------------------------------------------------------------------------ data
def calibration_set(
    cfg: RMConfig, tokenizer: Any, examples: list[PreferenceExample]
) -> list[SequenceExample]:
    """The answers whose raw scores set the normalisation: `calibration_data`, or every distinct answer of
    the preference examples; at most `calibration_samples` of them (a seeded random subset)."""
    if cfg.calibration_data:
        records = load_sft(resolve_data_path(cfg.calibration_data))
        d = cfg.data
        found = [
            encode_answer(tokenizer, r, r.completion, r.answer_field, d.max_length, d.truncation)
            for r in records
        ]
        answers = [a for a in found if a is not None]
    else:
        answers = list({a.input_ids: a for ex in examples for a in ex.answers}.values())
    if len(answers) > cfg.calibration_samples:
        keep = sorted(random.Random(cfg.train.seed).sample(range(len(answers)), cfg.calibration_samples))
        answers = [answers[i] for i in keep]
    return answers


def calibration_table(diffs: torch.Tensor, bins: int = 10) -> list[dict[str, Any]]:
    """Reliability table of p = P(chosen preferred) = sigmoid(r_c - r_r). Every pair enters twice, as (p,
    chosen won) and (1 - p, rejected won), so the table is symmetric and its observed frequencies are
    comparable with the predictions in every bin. diffs: (P,) reward differences r_c - r_r."""
    p = torch.sigmoid(diffs.double())  # (P,)
    probs = torch.cat([p, 1.0 - p])  # (2P,)
    won = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2P,)
    which = (probs * bins).long().clamp(0, bins - 1)  # (2P,)
    rows = []
    for b in range(bins):
        sel = which == b  # (2P,)
        n = int(sel.sum())
        rows.append({
            "bin": b, "lo": b / bins, "hi": (b + 1) / bins, "count": n,
            "predicted": float(probs[sel].mean()) if n else None,
            "observed": float(won[sel].mean()) if n else None,
        })  # fmt: skip
    return rows


def expected_calibration_error(rows: list[dict[str, Any]]) -> float:
    """ECE = sum_b (n_b / n) |predicted_b - observed_b| (Guo et al. 2017) over a calibration table."""
    total = sum(r["count"] for r in rows)
    if not total:
        return 0.0
    return sum(r["count"] / total * abs(r["predicted"] - r["observed"]) for r in rows if r["count"])


# ------------------------------------------------------------------------------------------ trainer
class RMTrainer(SupervisedTrainer[PreferenceExample]):
    name = "rm"
    stage: RMConfig
    supports_sharding = False  # the calibration pass after training runs on rank 0 alone

    def __init__(
        self,
        cfg: RMConfig,
        train: list[PreferenceExample],
        evals: list[PreferenceExample],
        calibration: list[SequenceExample],
    ) -> None:
        set_seed(cfg.train.seed)  # the new head's initialisation
        model, tokenizer = build_reward_model(
            cfg.model, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code,
            runtime=resolve_runtime(cfg.train), gradient_checkpointing=cfg.train.gradient_checkpointing,
        )  # fmt: skip
        super().__init__(cfg, model, tokenizer, train, evals)
        self.calibration = calibration
        self._calibration_rows: list[dict[str, Any]] = []

    def example_length(self, example: PreferenceExample) -> int:
        return example.length

    def collate(self, examples: list[PreferenceExample]) -> dict[str, Any]:
        """A flat batch of the N answers of all prompts, plus the weighted (better, worse) pairs."""
        shared = SharedPromptBatch.from_examples(
            [a for ex in examples for a in ex.answers], self.tokenizer.pad_token_id
        )
        group = torch.tensor(
            [g for g, ex in enumerate(examples) for _ in ex.answers]
        )  # (N,) prompt of each answer
        ranks = torch.tensor([r for ex in examples for r in ex.ranks])  # (N,)
        pairs = pairwise_from_rankings(group, ranks)
        margins = torch.tensor([ex.margin for ex in examples])[group[pairs.chosen_index]]  # (P,)
        starts = [0]
        for ex in examples:
            starts.append(starts[-1] + len(ex.answers))
        flags = [(starts[g] + a, b, e, g) for g, ex in enumerate(examples) for a, b, e in ex.flags]
        columns = torch.tensor(flags, dtype=torch.long).view(-1, 4)  # (F, 4)
        flag_rows, before, after, flag_group = columns.unbind(1)  # (F,) each
        return {
            "batch": shared,  # the N answers, each prompt (and the prefix all share) run once
            "chosen_index": pairs.chosen_index,  # (P,)
            "rejected_index": pairs.rejected_index,  # (P,)
            "weights": pairs.weights,  # (P,) 1 / n_pairs(prompt): each prompt's weights sum to 1
            "margin": margins,  # (P,)
            "flag_rows": flag_rows,  # (F,) the row of each flagged turn
            "flag_before": before,  # (F,) its position read before the turn (-1: the prompt's last token)
            "flag_after": after,  # (F,) and at its end
            "flag_weights": 1.0 / torch.bincount(flag_group)[flag_group] if flags else torch.zeros(0),  # (F,)
            "num_items": len(examples),  # prompts
            "num_tokens": shared.tokens_processed,
        }

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        flagged = self.stage.turn_flag_coef > 0 and len(batch["flag_rows"]) > 0
        if not flagged:
            return self.pairwise(shared_sequence_rewards(model, batch["batch"]), batch)  # (N,)
        rows = torch.cat([batch["flag_rows"], batch["flag_rows"]])  # (2F,)
        positions = torch.cat([batch["flag_before"], batch["flag_after"]])  # (2F,)
        rewards, at = shared_rewards_at(model, batch["batch"], rows, positions)  # (N,), (2F,)
        loss, sums = self.pairwise(rewards, batch)
        before, after = at.chunk(2)  # (F,), (F,)
        weights = batch["flag_weights"].to(at.dtype)  # (F,) each episode group's flags weigh 1 in all
        turn = -(torch.nn.functional.logsigmoid(before - after) * weights).sum()
        sums["turn_flag_loss"] = turn.detach()
        sums["turn_flag_drop"] = ((before - after).detach() * weights).sum()
        return loss + self.stage.turn_flag_coef * turn, sums

    def pairwise(
        self, rewards: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum over prompts of the prompt's mean pair loss, metric sums) from the flat rewards (N,)."""
        chosen, rejected = rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]  # (P,), (P,)
        mean, metrics = bradley_terry_loss(
            chosen,
            rejected,
            margin=batch["margin"],
            weights=batch["weights"],
            centering_coef=self.stage.centering_coef,
        )  # mean over prompts
        n = batch["num_items"]
        sums = {
            "accuracy": metrics["rewards/accuracy"] * n,
            "margin": metrics["rewards/margin"] * n,
            "reward_chosen": metrics["rewards/chosen"] * n,
            "reward_rejected": metrics["rewards/rejected"] * n,
        }
        if self.stage.centering_coef:
            sums["centering"] = metrics["loss/centering"] * n
        return mean * n, sums

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        totals: dict[str, float] = {}
        diffs = []
        for _, collated in self.eval_batches():
            batch = self.to_device(collated)
            with self.autocast():
                rewards = shared_sequence_rewards(self.model, batch["batch"]).float()  # (N,)
            loss_sum, sums = self.pairwise(rewards, batch)
            for key, value in {"loss": loss_sum, **sums}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            diffs.append(rewards[batch["chosen_index"]] - rewards[batch["rejected_index"]])  # (P,)
        self._calibration_rows = calibration_table(torch.cat(diffs))
        metrics = {key: value / len(self.eval_examples) for key, value in totals.items()}
        metrics["ece"] = expected_calibration_error(self._calibration_rows)
        return metrics

    @torch.no_grad()
    def normalize(self) -> dict[str, float]:
        """Set shift/scale in the model config from the raw scores of the calibration answers."""
        if self.stage.normalize == "none" or not self.calibration:
            shift, scale, raw = 0.0, 1.0, torch.zeros(0)
        else:
            sequences = [ex.input_ids for ex in self.calibration]
            with self.autocast():
                raw = score_sequences(
                    self.model, sequences, self.tokenizer.pad_token_id, SCORE_BATCH
                ).double()  # (M,)
            shift = float(raw.mean())
            std = float(raw.std(unbiased=False))
            scale = std if self.stage.normalize == "shift_scale" and std > 0 else 1.0
        set_normalization(self.model, shift, scale, self.stage.normalize)
        stats = {"shift": shift, "scale": scale, "answers": len(raw)}
        if len(raw):
            stats["raw_std"] = float(raw.std(unbiased=False))
        return stats

    def save_final(self) -> None:
        if self._calibration_rows:
            for row in self._calibration_rows:
                self.log("calibration", row)
            print_calibration(self._calibration_rows)
        self.log("normalization", self.normalize())
        save_model(self.model, self.tokenizer, self.output_dir, self.final_state())


def print_calibration(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = Table(title="reward model calibration (eval pairs, both orderings)")
    for column in ("P(chosen) bin", "pairs", "predicted", "observed"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r['lo']:.1f}-{r['hi']:.1f}", str(r["count"]), fmt(r["predicted"]), fmt(r["observed"])
        )
    console.print(table)


# ------------------------------------------------------------------------------------------ entry points
def prepare_rm(
    cfg: RMConfig,
) -> tuple[list[PreferenceExample], list[PreferenceExample], list[SequenceExample]]:
    """Read, validate and tokenise all data (nothing is written anywhere until this succeeds)."""
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train, evals = load_preference_examples(cfg.data, tokenizer, cfg.train.seed, "rm")
    return train, evals, calibration_set(cfg, tokenizer, train + evals)


def run_rm(cfg: RMConfig) -> dict[str, float]:
    train, evals, calibration = prepare_rm(cfg)
    return RMTrainer(cfg, train, evals, calibration).run()
