"""What the supervised trainers (SFT, reward model, DPO) share beyond the loop: a fixed training set.

Each of them trains on a list of encoded examples walked in a seeded, length-grouped epoch order
(`training.EpochStream`), so the number of optimizer steps follows from `train.epochs` and the data, and
each evaluates on a held-out list in sorted micro-batches. A new supervised trainer subclasses
`SupervisedTrainer` and writes its `collate`, `loss`, `evaluate` (a reduction over `eval_batches`) and
`save_final`; nothing else is copied.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from rlhfkit.training.loop import Batch, TrainLoop
from rlhfkit.training.settings import EpochStream

Example = TypeVar("Example")


class SupervisedTrainer(TrainLoop, Generic[Example]):
    """A `TrainLoop` over `train` examples (an epoch order by length) with `evals` held out."""

    def __init__(
        self, stage: Any, model: Any, tokenizer: Any, train: Sequence[Example], evals: Sequence[Example]
    ):
        """`stage` is the stage's config (its `train`, `data` and `output` sections are read)."""
        super().__init__(stage.train, model, stage.output, stage)
        self.tokenizer = tokenizer
        self.train_examples = list(train)
        self.eval_examples = list(evals)
        lengths = [self.example_length(ex) for ex in self.train_examples]
        self.stream = EpochStream(lengths, stage.train.batch_size, stage.train.seed, stage.data.group_window)

    def total_steps(self) -> int:
        """`train.max_steps`, or `train.epochs` passes over the training set."""
        if self.cfg.max_steps:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * len(self.train_examples) / self.cfg.batch_size))

    def step_examples(self, step: int) -> list[Example]:
        return [self.train_examples[i] for i in self.stream.batch(step)]

    def eval_batches(self) -> Iterator[tuple[list[Example], Batch]]:
        """The held-out examples, shortest first, as (examples, collated batch) of one micro-batch each
        (`batch_size / grad_accum` examples: what a training micro-batch holds)."""
        ordered = sorted(self.eval_examples, key=self.example_length)
        size = max(1, self.cfg.batch_size // max(self.cfg.grad_accum, 1))
        for start in range(0, len(ordered), size):
            part = ordered[start : start + size]
            yield part, self.collate(part)
