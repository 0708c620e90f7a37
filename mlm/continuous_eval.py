"""`--mode continuous_eval`: evaluates each checkpoint a training job saves, as it appears.

Model Garden's `continuous_eval` mode: a second job on the workdir of a training job evaluates
every finished checkpoint step once, oldest first, while the training goes on. It stops after
the step of `train.num_steps`, or when no new step has appeared for
`train.continuous_eval_timeout_s` seconds (one line, exit status 0).

Run (two jobs, the same config and workdir):
  python -m mlm.train --config configs/quickstart.py --workdir /tmp/run --mode train
  python -m mlm.train --config configs/quickstart.py --workdir /tmp/run --mode continuous_eval

The evaluator is a reader. It takes no workdir lock (the training job holds it) and writes only
`eval_metrics.jsonl` (one record per step, with the keys `--mode eval` writes) and its own
TensorBoard events (`tensorboard_eval/`); config.json, metrics.jsonl, tensorboard/ and
everything under checkpoints*/ belong to the training job and are only read. Steps are read
through orbax's read-only manager (as `--mode eval` reads them), which lists a step only once
its save has been committed, never a `*.orbax-checkpoint-tmp` directory in progress. A step
already in eval_metrics.jsonl is not evaluated again, so a restarted evaluator goes on where it
stopped. It keeps no best checkpoint: that is the training job's (`train.best_metric` with
`--mode train_and_eval`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mlm import checkpoint, parallel, paths, train
from mlm import workdir as workdir_lib
from mlm.data.inputs import build_inputs
from mlm.errors import ConfigError, WorkdirError
from mlm.experiment import Experiment
from mlm.metrics import MetricWriter

# Seconds between two looks at the checkpoint directory (TF's checkpoints_iterator waits 1 s).
POLL_INTERVAL_S = 1.0
# What process 0 tells the others when there is no step to evaluate now.
_WAIT, _STOP_DONE, _STOP_TIMED_OUT = -1, -2, -3


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    """Evaluates the workdir's checkpoint steps as a training job saves them, until the last.

    Args:
      config: the validated config of the run (model and data fields as the training job's;
        the eval data may differ, as for `--mode eval`).
      workdir: the training job's workdir; it may not exist yet (the evaluator waits).

    Returns:
      {'train': {}, 'eval': the metrics of the last step this call evaluated (empty if none)}.

    Raises:
      WorkdirError: the workdir is a URL, or config.json cannot be read.
      ConfigError: the data source has no eval data, or a step holds another model.
    """
    workdir_lib.check_path(workdir)
    directory = checkpoint.checkpoint_dir(workdir)
    timeout_s = config.train.continuous_eval_timeout_s
    results: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
    _report(
        f"continuous eval: watching {directory} until step {config.train.num_steps} "
        "(train.num_steps)"
    )
    # The training job writes vocab.txt and config.json before its first step is saved: read
    # them only then, so the evaluator never writes them itself.
    since = time.monotonic()
    while not _agree(int(checkpoint.has_checkpoint(workdir))):
        if _agree(int(_timed_out(timeout_s, since))):
            _report(_timed_out_line(directory, timeout_s))
            return results
        time.sleep(POLL_INTERVAL_S)
    previous_config = workdir_lib.check_consistent(config, workdir, "eval")
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(
        config.train.global_batch_size, config.optimizer.grad_accum_steps, mesh
    )
    inputs = build_inputs(
        config,
        workdir,
        need_train=False,
        need_eval=True,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    if inputs.eval is None:
        raise ConfigError(
            f"--mode continuous_eval: {inputs.source} has no eval data; set the eval data of "
            "the source (data.eval_files, data.tfds_eval_split, data.hf_eval_split or "
            "data.eval_tfrecord_files)"
        )
    train.check_inputs(inputs, config.train.global_batch_size // jax.process_count())
    experiment = Experiment.build(config, mesh)
    reader = checkpoint.open_reader(directory)
    writer = MetricWriter(
        workdir,
        start_step=None,  # Appends; never drops another job's records.
        tensorboard_dirname=paths.CONTINUOUS_EVAL_TENSORBOARD_DIRNAME,
    )
    watch = _Watch(workdir, config.train.num_steps, timeout_s)
    try:
        while True:
            reader.reload()
            step = _agree(watch.next_step(reader.all_steps()) if jax.process_index() == 0 else 0)
            if step == _STOP_DONE:
                _report(
                    f"continuous eval: step {config.train.num_steps} (train.num_steps) is "
                    "evaluated; stopped"
                )
                return results
            if step == _STOP_TIMED_OUT:
                _report(_timed_out_line(directory, timeout_s))
                return results
            if step == _WAIT:
                time.sleep(POLL_INTERVAL_S)
                continue
            state = _restore(reader, step, experiment, previous_config)
            if state is None:
                watch.skipped.add(step)
                continue
            metrics = train.evaluate(
                experiment.eval_step,
                train.eval_params(state),
                iter(inputs.eval),
                config.train.eval_steps,
                mesh,
                step,
            )
            which = " (EMA params)" if state.ema_params is not None else ""
            del state
            writer.write("eval_metrics", metrics)
            results["eval"] = metrics
            watch.evaluated()
            shown = {key: round(value, 4) for key, value in metrics.items() if key != "step"}
            _report(f"eval step {step}{which}: {shown}")
    finally:
        reader.close()
        writer.close()


class _Watch:
    """Process 0's view of the checkpoint steps: which to evaluate next, and when to stop."""

    def __init__(self, workdir: str, last_step: int, timeout_s: float):
        self._workdir = workdir
        self._last_step = last_step
        self._timeout_s = timeout_s
        self._seen: set[int] = set()
        self._since = time.monotonic()  # When a step last appeared or was evaluated.
        self.skipped: set[int] = set()  # Steps that could not be read (e.g. removed meanwhile).

    def next_step(self, steps: list[int]) -> int:
        """The oldest finished step not yet evaluated, or _WAIT / _STOP_DONE / _STOP_TIMED_OUT."""
        if set(steps) - self._seen:
            self._seen.update(steps)
            self._since = time.monotonic()
        # Read again each time: a resumed training job drops the records after its step.
        done = evaluated_steps(self._workdir)
        if self._last_step in done:
            return _STOP_DONE
        pending = sorted(set(steps) - done - self.skipped)
        if pending:
            return pending[0]
        return _STOP_TIMED_OUT if _timed_out(self._timeout_s, self._since) else _WAIT

    def evaluated(self) -> None:
        """Notes an evaluation: the timeout counts from its end."""
        self._since = time.monotonic()


def evaluated_steps(workdir: str) -> set[int]:
    """The steps with a record in the workdir's eval_metrics.jsonl (a torn last line is none)."""
    path = paths.metrics_path(workdir, "eval_metrics")
    if not os.path.exists(path):
        return set()
    steps = set()
    with open(path) as file:
        for line in file:
            try:
                steps.add(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return steps


def _restore(reader: Any, step: int, experiment: Experiment, previous_config: dict | None) -> Any:
    """The state of `step`, or None (reported) when the step is gone or cannot be read."""
    reasons: list[str] = []
    try:
        state, _ = checkpoint.restore_latest_intact(
            reader, experiment.restore_target(), report=reasons.append, steps=[step]
        )
    except checkpoint.StateMismatchError as error:
        raise workdir_lib.state_mismatch(error, previous_config, experiment.config) from None
    except WorkdirError:
        reader.reload()
        if step not in reader.all_steps():
            why = "was removed by the training job (train.keep_checkpoints) before it was read"
        elif reasons:
            why = reasons[0].split("; left in place")[0].removeprefix(f"checkpoint step {step} ")
        else:
            why = "cannot be read"
        _report(f"continuous eval: checkpoint step {step} {why}; skipped")
        return None
    return state


def _timed_out(timeout_s: float, since: float) -> bool:
    return bool(timeout_s) and time.monotonic() - since >= timeout_s


def _timed_out_line(directory: str, timeout_s: float) -> str:
    return (
        f"continuous eval timed out: no new checkpoint in {directory} for {timeout_s:g} s "
        "(train.continuous_eval_timeout_s); stopped"
    )


def _agree(value: int) -> int:
    """Process 0's `value` on every process (each decides alike only if it reads alike)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _report(message: str) -> None:
    """Prints one line to stderr on process 0."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
