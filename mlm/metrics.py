"""Metric writers: JSON lines, TensorBoard and the console progress bar.

Only process 0 writes; on the other processes every writer is a no-op.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import tqdm
from tensorboardX import SummaryWriter

from mlm.paths import TENSORBOARD_DIRNAME, metrics_path, write_text_atomically


def _jsonable(value: float | int) -> float | int | str | None:
    """Keeps full float precision; NaN / inf become strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    """Appends metrics to `NAME.jsonl` files and TensorBoard events in a workdir.

    A run that starts from step `start_step` (0: a new run) first drops the records of later
    steps, which an earlier attempt logged and this run logs again: JSON lines are rewritten
    and TensorBoard is told to purge them, so every step is logged once.

    Args:
      workdir: the run directory; events go to `workdir/tensorboard`.
      start_step: the step the run starts from (the restored checkpoint's, or 0); None for a
        reader (e.g. `--mode eval`) that only appends.
    """

    def __init__(self, workdir: str, start_step: int | None = 0):
        self._workdir = workdir
        self._enabled = jax.process_index() == 0
        self._tensorboard = None
        if self._enabled:
            if start_step is not None:
                self.drop_after(start_step)
            self._tensorboard = SummaryWriter(
                os.path.join(workdir, TENSORBOARD_DIRNAME),
                purge_step=None if start_step is None else start_step + 1,
            )

    def write(self, name: str, metrics: Mapping[str, float | int]) -> None:
        """Writes one record (must contain `step`) to `name.jsonl` and TensorBoard.

        Args:
          name: the file stem, e.g. `metrics` or `eval_metrics`; also the TensorBoard prefix
            (`train` for `metrics`, `eval` for `eval_metrics`).
          metrics: `step` and float values.
        """
        if not self._enabled:
            return
        record = {key: _jsonable(value) for key, value in metrics.items()}
        with open(metrics_path(self._workdir, name), "a") as file:
            file.write(json.dumps(record) + "\n")
        prefix = "eval" if name.startswith("eval") else "train"
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step":
                self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)
        self._tensorboard.flush()

    def drop_after(self, step: int) -> None:
        """Removes JSON-lines records of steps after `step` (a resumed run logs them again).

        Args:
          step: the step the run resumes from.
        """
        if not self._enabled:
            return
        for name in os.listdir(self._workdir):
            if not name.endswith(".jsonl"):
                continue
            path = os.path.join(self._workdir, name)
            with open(path) as file:
                lines = file.readlines()
            kept = [line for line in lines if _record_step(line) <= step]
            if len(kept) < len(lines):
                write_text_atomically(path, "".join(kept))

    def logged(self, name: str, step: int) -> dict | None:
        """The record of `step` in `name.jsonl` (every process reads it), or None.

        Args:
          name: the file stem, e.g. `eval_metrics`.
          step: the step.
        """
        path = os.path.join(self._workdir, f"{name}.jsonl")
        if not os.path.exists(path):
            return None
        with open(path) as file:
            for line in file:
                if _record_step(line) == step:
                    return json.loads(line)
        return None

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self._tensorboard is not None:
            self._tensorboard.close()


def _record_step(line: str) -> int:
    """The `step` of one JSON-lines record; a torn last line (a killed write) counts as later."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 2**62


def progress_bar(start_step: int, num_steps: int) -> tqdm.tqdm:
    """Returns the console progress bar (disabled on processes other than 0).

    Args:
      start_step: the step training starts from (non-zero when resuming).
      num_steps: the last step.
    """
    return tqdm.tqdm(
        total=num_steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=jax.process_index() != 0,
    )
