"""Online feedback in step C: the reward model keeps learning from rankings of the policy's own answers.

    rlhfkit grpo --policy runs/sft --reward runs/rm --set online_feedback.labeler=my_judge:score ...
    rlhfkit pipeline                          # on by default there: the simulated panel labels each group

A reward model trained once, on the SFT model's answers, is asked as RL goes on to score answers unlike
any it learned from, and the policy moves where it is wrong: the further the policy moves, the more a
frozen reward model falls behind the gold it imitates (measured on the pipeline's data: bench/RESULTS.md).
Iterated online RLHF (Bai et al. 2022, section 4.5; Dong et al. 2024, "RLHF Workflow") closes the gap by
labelling the current policy's answers and training the reward model on them as the policy moves.

Here, every iteration of GRPO / RLOO:
 1. the G answers of each group are scored by the reward model (as they are without this module); when
    the batch is one pass of the update (B <= `micro_batch`) that forward keeps its graph for step 3;
 2. a labeler ranks each group: a panel of simulated annotators over `labeler`, a `module:function`
    (prompt, answer) -> float (the pipeline's gold, an LLM judge, ...), each annotator swapping adjacent
    answers of its ranking with `flip_prob` (`rlhfkit.rewards.panel`, as in the pipeline's feedback stage);
 3. before the policy's update the reward model takes one AdamW step on the Bradley-Terry loss of those
    rankings, every group weighted 1 (all its comparable pairs, each 1 / n_pairs, as `rlhfkit rm` weighs a
    prompt): its own optimizer (`device.make_optimizer`, at `lr`), stepped through `guard.checked_update`
    as every step of the project (gradient norm clipped to 1, non-finite losses refused).
So iteration t's rewards come from the reward model that learned from iterations < t; the policy still
sees nothing but the reward model. People cannot rank within a 20-second iteration: with people, collect
feedback on the policy's answers between runs (`rlhfkit feedback`) and train the reward model again.

Logged each iteration, before the update, on labels the reward model has not learned from:
`rm_online_accuracy` (agreement with the panel's rankings) and `rm_online_label_accuracy` (with the
labeler's own, noise-free order); `rm_online_loss` and `rm_online_pairs`. The final reward model is saved
to OUTPUT/reward_model with the normalisation constants it started with (GRPO divides by the group's
std, so a drift of scale does not change the advantages; RLOO's KL penalty is relative to that scale).
Its weights and optimizer moments are in every checkpoint, so a resumed run continues exactly.

Shapes: B answers (groups of G consecutive rows), T tokens, P pairs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import setting
from rlhfkit.device import Runtime, make_optimizer
from rlhfkit.losses import bradley_terry_loss, pairwise_from_rankings
from rlhfkit.models.loading import build_reward_model, check_reward_model, normalization, save_model
from rlhfkit.models.prefix import SharedPromptBatch
from rlhfkit.rewards.mix import RewardComponent, shared_sequence_rewards
from rlhfkit.rewards.panel import Annotator, gold_ranks, load_gold
from rlhfkit.training.guard import checked_update
from rlhfkit.training.settings import TrainConfig

MAX_GRAD_NORM = 1.0


@dataclass
class OnlineFeedbackConfig:
    """Rank the policy's answers during RL and train the reward model on them (see `rewards.online`)."""

    labeler: str | None = None
    """`module:function` (prompt, answer) -> float whose simulated panel ranks every group, or "default"
    (rlhfkit.rewards.panel.gold_score); None: the reward model stays frozen."""
    annotators: int = setting(4, ge=1)
    """Size of the panel; groups are dealt round-robin."""
    flip_prob: float = setting(0.25, ge=0, le=0.5)
    """Each annotator swaps each adjacent pair of its ranking with this probability."""
    lr: float = setting(1e-5, gt=0)
    """The reward model's learning rate (AdamW, no weight decay)."""
    micro_batch: int = setting(32, ge=1)
    """Answers per forward pass of the reward model's update (whole groups; memory, not the values)."""


class OnlineRewardModel:
    """A trainable reward model, its optimizer and its labeler; one instance per RL run."""

    def __init__(
        self,
        cfg: OnlineFeedbackConfig,
        path: str,
        runtime: Runtime,
        seed: int,
        trust_remote_code: bool = False,
    ) -> None:
        assert cfg.labeler is not None
        self.cfg = cfg
        self.source = path
        self.seed = seed
        self.labeler: Callable[[str, str], float] = load_gold(cfg.labeler)
        check_reward_model(path, trust_remote_code)  # a reward model to go on training, never a new head
        self.model, self.tokenizer = build_reward_model(
            path, trust_remote_code=trust_remote_code, runtime=runtime
        )
        self.shift, self.scale = normalization(self.model.config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # the project's AdamW (device.make_optimizer), with this update's own learning rate, no decay
        self.optimizer = make_optimizer(TrainConfig(lr=cfg.lr), self.params, self.params[0].device)
        self._kept: tuple[list[list[int]], torch.Tensor] | None = None  # see score_batch

    # -- scoring, as `rewards.rollout_scorer` does for a frozen reward model
    def score_batch(self, batch: SharedPromptBatch) -> torch.Tensor:
        """Normalised rewards (B,) of a batch's rows with the current weights. A batch that is one pass of
        the update (B <= micro_batch) is run with its graph, kept for `update`: the same rows with the same
        weights, so an iteration runs the reward model forward once, not twice (that pass runs in eval mode:
        a reward model with dropout learns from it without dropout; the bundled models have none)."""
        self._kept = None
        if batch.rows > self.cfg.micro_batch:
            with torch.no_grad():
                raw = shared_sequence_rewards(self.model, batch).float()  # (B,)
        else:
            with torch.enable_grad():
                raw = shared_sequence_rewards(self.model, batch).float()  # (B,)
            self._kept = (batch.sequences(), raw)
        return (raw.detach().cpu() - self.shift) / self.scale

    def component(self, weight: float = 1.0) -> RewardComponent:
        pad = self.tokenizer.pad_token_id

        def score(
            prompts: list[str], completions: list[str], rollout: Any, records: list[Any]
        ) -> torch.Tensor:
            return self.score_batch(SharedPromptBatch.from_rollout(rollout, pad))

        return RewardComponent(Path(self.source).name, weight, score, source=f"{self.source} (online)")

    # -- labels
    def rank_groups(
        self,
        step: int,
        prompts: Sequence[str],
        completions: Sequence[str],
        group: int,
        scores: Sequence[float] | None = None,
    ) -> tuple[list[int], list[int]]:
        """(the panel's rank levels, the labeler's own levels) of every answer, rank 0 best within its group.
        Group g of iteration `step` goes to annotator (step x groups + g) mod panel, whose noise is seeded by
        (seed, step, g): the same labels however often the run is resumed. `scores`: the labeler's scores of
        the answers when the caller already has them (they are computed otherwise)."""
        if scores is None:
            scores = [float(self.labeler(p, c)) for p, c in zip(prompts, completions, strict=True)]
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(
                f"online_feedback.labeler {self.cfg.labeler} returned {scores[bad[0]]} for row {bad[0]}"
            )
        n_groups = len(scores) // group
        panel, truth = [], []
        for g in range(n_groups):
            chunk = scores[g * group : (g + 1) * group]
            who = (step * n_groups + g) % self.cfg.annotators
            annotator = Annotator(f"sim-{who}", self.cfg.flip_prob, random.Random(f"{self.seed}-{step}-{g}"))
            panel += annotator.rank(chunk)
            truth += gold_ranks(chunk)
        return panel, truth

    # -- the update
    def update(
        self,
        step: int,
        batch: SharedPromptBatch,
        prompts: Sequence[str],
        completions: Sequence[str],
        group: int,
        scores: Sequence[float] | None = None,
    ) -> dict[str, float]:
        """Rank the groups, measure the reward model on those labels, then one optimizer step on them."""
        kept = self.take_scoring_pass(batch)  # (B,) with its graph, or None: the passes are run anew
        ranks, truth = self.rank_groups(step, prompts, completions, group, scores)
        n = batch.rows
        group_index = torch.arange(n // group).repeat_interleave(group)  # (B,)
        pairs = pairwise_from_rankings(group_index, torch.tensor(ranks))
        true_pairs = pairwise_from_rankings(group_index, torch.tensor(truth))
        n_groups = len(set(group_index[pairs.chosen_index].tolist()))  # groups with at least one pair
        stats = {"rm_online_pairs": float(len(pairs.weights))}
        if n_groups == 0:  # every group tied: nothing to learn
            return stats
        per_pass = n if kept is not None else max(1, self.cfg.micro_batch // group) * group
        rewards = torch.zeros(n)  # (B,) raw, before the update
        loss_total = 0.0
        self.model.train()
        with torch.enable_grad():
            for lo in range(0, n, per_pass):
                rows = torch.arange(lo, min(lo + per_pass, n))
                # (P,) the pairs within these rows (a pass holds whole groups)
                inside = (pairs.chosen_index >= lo) & (pairs.chosen_index < lo + per_pass)
                if not bool(inside.any()):
                    continue
                if kept is not None:  # the scoring pass of these rows, same weights
                    r = kept  # (b,) = (B,)
                else:
                    r = shared_sequence_rewards(self.model, batch.select(rows)).float()  # (b,)
                rewards[rows] = r.detach().cpu()
                chosen = r[pairs.chosen_index[inside] - lo]  # (p,)
                rejected = r[pairs.rejected_index[inside] - lo]  # (p,)
                w = pairs.weights[inside].to(r.device)  # (p,) each group's weights sum to 1
                loss, _ = bradley_terry_loss(chosen, rejected, weights=w)  # mean over these groups
                part = loss * float(w.sum()) / n_groups  # this pass's share of the mean over groups
                part.backward()
                loss_total += float(part.detach())
        # the loop's clip / non-finite guard / step (guard.checked_update), on this model's optimizer
        norm = checked_update(
            self.optimizer, self.params, loss_total, MAX_GRAD_NORM,
            f"in the online reward model's update at iteration {step + 1}",
        )  # fmt: skip
        self.model.eval()

        def accuracy(p: Any) -> float:
            diff = rewards[p.chosen_index] - rewards[p.rejected_index]  # (P,)
            return float(((diff > 0).float() * p.weights).sum() / p.weights.sum()) if len(diff) else math.nan

        stats.update(
            rm_online_loss=loss_total,
            rm_online_accuracy=accuracy(pairs),
            rm_online_label_accuracy=accuracy(true_pairs),
            rm_online_grad_norm=norm,
        )
        return stats

    def take_scoring_pass(self, batch: SharedPromptBatch) -> torch.Tensor | None:
        """The raw rewards (B,), with their graph, of the last `score_batch` if it scored these very rows
        and the weights have not changed since; it is handed out once."""
        kept, self._kept = self._kept, None
        if kept is None or kept[0] != batch.sequences():
            return None
        return kept[1]

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.model.state_dict(),  # written out at once: no copy needed
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._kept = None
        with torch.no_grad():
            self.model.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, out_dir: Path) -> Path:
        return save_model(self.model, self.tokenizer, out_dir)
