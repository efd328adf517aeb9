"""``train.on_nonfinite: skip`` with limits: a step whose loss is NaN/Inf on any rank is skipped
(no backward, no optimizer step), but a run that keeps skipping is a failed run, not a
finished one. It fails (``FloatingPointError``) once more than ``train.max_skipped_fraction``
x ``train.max_iters`` steps were skipped in total, or more than ``train.max_consecutive_skips``
in a row. The counts travel in the checkpoints, so a resumed run keeps them; every run ends
with a line giving the count."""
from __future__ import annotations

import logging

log = logging.getLogger("epsdist.train")


class SkipCounter:
    def __init__(self, train_cfg, state: dict | None = None):
        self.t = train_cfg
        state = state or {}
        self.skipped = int(state.get("skipped_steps", 0))
        self.consecutive = int(state.get("consecutive_skips", 0))

    @property
    def budget(self) -> int:
        """The most skipped steps a run may have in total."""
        return int(self.t.max_skipped_fraction * self.t.max_iters)

    def finite(self) -> None:
        self.consecutive = 0

    def skip(self, iteration: int) -> None:
        """Count a skipped step (``iteration`` counts from 1); raise past a limit."""
        self.skipped += 1
        self.consecutive += 1
        log.warning("non-finite loss at iteration %d: step skipped (%d so far)", iteration,
                    self.skipped)
        if self.consecutive > self.t.max_consecutive_skips:
            raise FloatingPointError(
                f"non-finite loss in {self.consecutive} steps in a row (iterations "
                f"{iteration - self.consecutive + 1}-{iteration}), more than "
                f"train.max_consecutive_skips={self.t.max_consecutive_skips}: the run has "
                f"diverged ({self.skipped} steps skipped in all). Lower train.lr")
        if self.skipped > self.budget:
            raise FloatingPointError(
                f"{self.skipped} steps skipped for a non-finite loss by iteration {iteration}, "
                f"more than train.max_skipped_fraction={self.t.max_skipped_fraction} x "
                f"train.max_iters={self.t.max_iters} ({self.budget}). Lower train.lr")

    def state(self) -> dict:
        return {"skipped_steps": self.skipped, "consecutive_skips": self.consecutive}

    def summary(self, done: int) -> str:
        return (f"skipped steps (non-finite loss): {self.skipped} of {done} iterations "
                f"(train.on_nonfinite={self.t.on_nonfinite})")
