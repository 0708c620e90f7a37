"""Recovery from loss blow-ups (Model Garden's trainer `Recovery`): when to roll back, how often.

A train step whose loss is not finite or exceeds `train.loss_upper_bound`, at or after
`train.recovery_begin_steps`, makes the driver restore the latest intact checkpoint, skip the
batches up to and including the bad one, and go on; after `train.recovery_max_trials` such
recoveries the run stops with one line. `recovery_max_trials=0` (the default) turns it off:
non-finite updates are then only skipped (`train.max_consecutive_skips`).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from mlm.errors import DivergenceError


class LossBlowUpError(Exception):
    """Raised by the train logger when a step's loss calls for a recovery.

    Attributes:
      step: the step whose loss blew up.
      loss: that loss.
    """

    def __init__(self, step: int, loss: float):
        super().__init__(f"step {step}: loss {loss}")
        self.step = step
        self.loss = loss


@dataclasses.dataclass
class RecoveryPolicy:
    """When a step's loss calls for a recovery, and how many recoveries are left.

    Attributes:
      loss_upper_bound: a finite loss above this blows up.
      begin_steps: steps before this are never recovered.
      max_trials: recoveries allowed in one run (a process); 0: recovery is off.
      trials: recoveries made so far.
    """

    loss_upper_bound: float
    begin_steps: int
    max_trials: int
    trials: int = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> RecoveryPolicy:
        """The policy of `config.train` (its loss_upper_bound, recovery_* fields)."""
        train = config.train
        return cls(train.loss_upper_bound, train.recovery_begin_steps, train.recovery_max_trials)

    @property
    def enabled(self) -> bool:
        return self.max_trials > 0

    def blows_up(self, step: int, loss: float) -> bool:
        """Whether step `step`'s loss calls for a recovery."""
        if not self.enabled or step < self.begin_steps:
            return False
        return not math.isfinite(loss) or loss > self.loss_upper_bound

    def start_trial(self, blow_up: LossBlowUpError, resume_step: int) -> None:
        """Counts one recovery, back to the checkpoint of `resume_step` (0: the run's start).

        Raises:
          DivergenceError: the trials have run out (one line naming the fields and the fix).
        """
        if self.trials >= self.max_trials:
            raise DivergenceError(
                f"training diverged: the loss was {_loss_text(blow_up.loss)} at step "
                f"{blow_up.step} after {self.trials} recoveries (train.recovery_max_trials="
                f"{self.max_trials}); lower optimizer.learning_rate, check the data or raise "
                f"train.loss_upper_bound, and run again to resume from step {resume_step}"
            )
        self.trials += 1

    def report(self, blow_up: LossBlowUpError, resume_step: int) -> str:
        """The line that reports the recovery just made."""
        return (
            f"step {blow_up.step}: loss {_loss_text(blow_up.loss)} (train.loss_upper_bound="
            f"{self.loss_upper_bound:g}): restored step {resume_step} and skipped the batches "
            f"up to step {blow_up.step}; recovery {self.trials} of {self.max_trials}"
        )


def _loss_text(loss: float) -> str:
    return f"{loss:.4g}" if math.isfinite(loss) else str(loss)
