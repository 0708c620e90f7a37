"""Metric writers: JSON lines, TensorBoard and the console progress.

Only process 0 writes; on the other processes every writer is a no-op.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import ml_collections
import tqdm

from mlm.errors import ConfigError
from mlm.paths import (
    TENSORBOARD_DIRNAME,
    WANDB_ID_FILENAME,
    metrics_path,
    write_text_atomically,
)


def _summary_writer_class() -> type:
    """tensorboardX's `SummaryWriter`, imported on first use and without importing torch.

    When torch is installed, `import tensorboardX` imports it too (only to accept torch tensors,
    which mlm never passes): 2.2 s of a 5.6 s `mlm.train` start on a 2-core CPU. Marking torch
    absent in `sys.modules` for the import makes tensorboardX skip it; the mark is removed at
    once, so a later `import torch` works as usual.

    Returns:
      The `tensorboardX.SummaryWriter` class.
    """
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError.
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


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
      wandb_run: a Weights & Biases run (`start_wandb`) that also gets every record, or None.
      tensorboard_dirname: the events' directory in the workdir (`--mode continuous_eval`
        keeps its own, apart from the training job's).
    """

    def __init__(
        self,
        workdir: str,
        start_step: int | None = 0,
        wandb_run: Any = None,
        tensorboard_dirname: str = TENSORBOARD_DIRNAME,
    ):
        self._workdir = workdir
        self._enabled = jax.process_index() == 0
        self._tensorboard = None
        self._wandb_run = wandb_run
        if self._enabled:
            if start_step is not None:
                self.drop_after(start_step)
            # tensorboardX names a file by the second it was made and opens it with "wb": a
            # second writer made within the same second (an eval, then the run resumed) would
            # truncate the first one's file. The nanosecond suffix keeps the names apart, and
            # in the order they were made, which is the order TensorBoard reads them in.
            self._tensorboard = _summary_writer_class()(
                os.path.join(workdir, tensorboard_dirname),
                purge_step=None if start_step is None else start_step + 1,
                filename_suffix=f".{time.time_ns()}",
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
        scalars = {f"{prefix}/{key}": value for key, value in metrics.items() if key != "step"}
        for tag, value in scalars.items():
            self._tensorboard.add_scalar(tag, value, step)
        self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)

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
        path = metrics_path(self._workdir, name)
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
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def require_wandb(config: ml_collections.ConfigDict) -> None:
    """Checks, before a run starts, that W&B is installed when `train.wandb_project` is set.

    Raises:
      ConfigError: `train.wandb_project` without the `wandb` extra.
    """
    if not config.train.wandb_project:
        return
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"train.wandb_project '{config.train.wandb_project}' needs wandb; install the wandb "
            "extra (pip install -e '.[wandb]') or leave train.wandb_project empty"
        )


def start_wandb(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Starts (or, for a resumed run, continues) the W&B run of a workdir on process 0.

    The run's id is kept in `WORKDIR/wandb_run_id`, so the same command after a stop or a
    preemption continues the same W&B run; W&B keeps its own files in `WORKDIR/wandb/`.

    Args:
      config: the run's config (`train.wandb_project`, `train.wandb_run_name`), also sent as
        the W&B run's config.
      workdir: the run directory.

    Returns:
      The W&B run, or None (no project set, or not process 0).
    """
    if not config.train.wandb_project or jax.process_index() != 0:
        return None
    import wandb

    id_path = os.path.join(workdir, WANDB_ID_FILENAME)
    if os.path.exists(id_path):
        with open(id_path) as file:
            run_id = file.read().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B run ids: lower-case letters and digits.
        write_text_atomically(id_path, run_id + "\n")
    return wandb.init(
        project=config.train.wandb_project,
        name=config.train.wandb_run_name or None,
        id=run_id,
        resume="allow",
        dir=workdir,
        config=config.to_dict(),
    )


def _record_step(line: str) -> int:
    """The `step` of one JSON-lines record; a torn last line (a killed write) counts as later."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 2**62


class ConsoleProgress:
    """Training progress on stderr (process 0 only).

    On a terminal: a tqdm bar, with the latest loss, accuracy and tokens/s. Elsewhere (a SLURM
    `.out` file, a log collected over ssh, a notebook's captured stream): one plain line per
    log interval, flushed at once, with no carriage returns. Messages go through `write`, so
    they never share a line with the bar.
    """

    def __init__(
        self,
        start_step: int,
        num_steps: int,
        stream: TextIO | None = None,
        interactive: bool | None = None,
    ):
        """Starts the progress display.

        Args:
          start_step: the step training starts from (non-zero when resuming).
          num_steps: the last step.
          stream: where to write; default sys.stderr.
          interactive: draw a bar; default: whether `stream` is a terminal.
        """
        self._stream = sys.stderr if stream is None else stream
        self._enabled = jax.process_index() == 0
        if interactive is None:
            interactive = hasattr(self._stream, "isatty") and self._stream.isatty()
        self._num_steps = num_steps
        self._started = time.monotonic()
        self._first: tuple[int, float] | None = None  # The first step done (after compiling).
        self._bar = None
        if self._enabled and interactive:
            self._bar = tqdm.tqdm(
                total=num_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                file=self._stream,
            )

    def advance(self, step: int) -> None:
        """Counts step `step` as done."""
        if self._first is None:
            self._first = (step, time.monotonic())
        if self._bar is not None:
            self._bar.update(1)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Shows one log interval's metrics (a line, or the bar's postfix)."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                acc=f"{metrics['masked_lm_accuracy']:.3f}",
                tok_s=f"{metrics.get('tokens_per_s', 0):.0f}",
            )
            return
        self.write(format_progress_line(step, self._num_steps, metrics, *self._times(step)))

    def _times(self, step: int) -> tuple[float, float | None]:
        """Seconds since the start, and the estimated seconds left (None before a rate)."""
        now = time.monotonic()
        remaining = None
        if self._first is not None and step > self._first[0]:
            per_step = (now - self._first[1]) / (step - self._first[0])
            remaining = per_step * (self._num_steps - step)
        return now - self._started, remaining

    def write(self, message: str) -> None:
        """Prints a message on its own line (above the bar on a terminal)."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        """Ends the bar's line, so what is printed next starts on its own line."""
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_progress_line(
    step: int,
    num_steps: int,
    metrics: Mapping[str, float],
    elapsed_s: float,
    remaining_s: float | None,
) -> str:
    """One plain progress line: step, loss, accuracy, learning rate, tokens/s and times.

    Args:
      step: the step logged.
      num_steps: the last step.
      metrics: the interval's train metrics (`loss`, `masked_lm_accuracy`, `learning_rate`,
        and `tokens_per_s` when measured).
      elapsed_s: seconds since the run started.
      remaining_s: estimated seconds to the last step, or None.

    Returns:
      e.g. 'step 40/2000: loss 5.1234, accuracy 0.123, lr 1e-04, 3,184 tokens/s, elapsed
      0:01:05, remaining 0:52:10'.
    """
    parts = [
        f"loss {metrics['loss']:.4f}",
        f"accuracy {metrics['masked_lm_accuracy']:.3f}",
        f"lr {metrics['learning_rate']:.3g}",
    ]
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
    parts.append(f"elapsed {_clock(elapsed_s)}")
    if remaining_s is not None:
        parts.append(f"remaining {_clock(remaining_s)}")
    return f"step {step}/{num_steps}: " + ", ".join(parts)
