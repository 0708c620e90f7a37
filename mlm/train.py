"""The driver: `train_and_evaluate(config, workdir)` and the `python -m mlm.train` command line.

Run:
  python -m mlm.train --config configs/quickstart.py --workdir /tmp/mlm_quickstart \
      [--config.train.num_steps=500 ...] [--mode train|eval|train_and_eval|continuous_eval]
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlm import checkpoint, distributed, initialize, kernels, parallel, paths, privacy, task
from mlm import config as config_lib
from mlm import config_file as config_file_lib
from mlm import metrics as metrics_lib
from mlm import workdir as workdir_lib
from mlm.data.inputs import Inputs, build_inputs
from mlm.data.pipeline import first_batch, prefetch
from mlm.errors import ConfigError, DivergenceError, WorkdirError
from mlm.experiment import Experiment
from mlm.metrics import ConsoleProgress, MetricWriter
from mlm.preemption import PreemptionWatcher
from mlm.recovery import LossBlowUpError, RecoveryPolicy


class _TrainLogger:
    """Aggregates train-step logs on the host, one step late, and writes them every `log_every`.

    `add` hands over the device logs of a just-dispatched step and processes the previous one,
    whose values are ready by then, so reading metrics never stalls dispatch.
    """

    def __init__(
        self,
        writer: MetricWriter,
        log_every: int,
        last_step: int,
        progress: ConsoleProgress,
        max_consecutive_skips: int = 2**30,
        last_saved: Callable[[], int | None] = lambda: None,
        extra_metrics: Callable[[int], dict[str, float]] = lambda step: {},
        recovery: RecoveryPolicy | None = None,
    ):
        self._writer = writer
        self._recovery = recovery
        self._extra_metrics = extra_metrics
        self._max_consecutive_skips = max_consecutive_skips
        self._last_saved = last_saved
        self._log_every = log_every
        self._last_step = last_step
        self._progress = progress
        self._pending: tuple[int, Any, int] | None = None
        self._aggregated = None
        self._tokens = 0
        self._steps = 0
        self._interval_start: float | None = None
        self.last_metrics: dict[str, float] = {}

    def add(self, step: int, device_logs: Any, num_tokens: int) -> None:
        """Queues step `step` and processes the previously queued one."""
        previous, self._pending = self._pending, (step, device_logs, num_tokens)
        if previous is not None:
            self._process(*previous)

    def flush(self) -> None:
        """Processes the queued step now (before eval, checkpoints and at the end)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._process(*pending)

    def reset(self) -> None:
        """Drops the queued step and the interval's aggregate (a recovery discards them)."""
        self._pending, self._aggregated = None, None
        self._tokens, self._steps, self._interval_start = 0, 0, None

    def _check_divergence(self, step: int, consecutive_skips: int) -> None:
        if consecutive_skips < self._max_consecutive_skips:
            return
        saved = self._last_saved()
        resume = f"step {saved}" if saved is not None else "the start"
        raise DivergenceError(
            f"training diverged: the loss or gradients were not finite for {consecutive_skips} "
            f"steps in a row (up to step {step}); those updates were skipped and nothing was "
            f"saved after {resume}; lower optimizer.learning_rate (or check the data) and run "
            f"again to resume from {resume}"
        )

    def _process(self, step: int, device_logs: Any, num_tokens: int) -> None:
        host_logs = jax.device_get(device_logs)
        if self._recovery is not None and "loss" in host_logs:
            loss = float(host_logs["loss"])
            if self._recovery.blows_up(step, loss):
                raise LossBlowUpError(step, loss)
        now = time.perf_counter()
        self._progress.advance(step)
        self._aggregated = task.aggregate_logs(self._aggregated, host_logs)
        self._check_divergence(step, int(host_logs.get("consecutive_skips", 0)))
        if self._interval_start is None:
            # The first step of a run includes compilation: time from its end instead.
            self._interval_start = now
        else:
            self._tokens += num_tokens
            self._steps += 1
        if step % self._log_every and step != self._last_step:
            return
        metrics = task.reduce_aggregated_logs(self._aggregated, step)
        metrics.update(self._extra_metrics(step))
        if self._recovery is not None and self._recovery.enabled:
            metrics["recoveries"] = self._recovery.trials
        elapsed = now - self._interval_start
        if self._steps and elapsed > 0:
            metrics["tokens_per_s"] = self._tokens / elapsed
            metrics["steps_per_s"] = self._steps / elapsed
        self._writer.write("metrics", metrics)
        self._progress.log(step, metrics)
        self.last_metrics = metrics
        self._aggregated, self._tokens, self._steps = None, 0, 0
        self._interval_start = now


def evaluate(
    eval_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterator[dict[str, np.ndarray]],
    num_batches: int,
    mesh: jax.sharding.Mesh,
    step: int,
) -> dict[str, float]:
    """Runs the eval step over up to `num_batches` batches and reduces the metrics.

    Args:
      eval_fn: the jitted eval step (params, global batch) -> metric sums.
      params: model parameters.
      batches: a fresh iterator over the eval set.
      num_batches: the most batches to use (train.eval_steps); 0 = the whole eval set.
      mesh: the device mesh.
      step: the train step the metrics belong to.

    Returns:
      `step`, `validation_loss`, `lm_example_loss`, `masked_lm_accuracy` (and next-sentence
      metrics), plus `eval_examples`.
    """
    device_logs = []
    examples = 0
    for index, batch in enumerate(batches):
        if num_batches and index >= num_batches:
            break
        examples += len(batch["input_word_ids"])
        device_logs.append(eval_fn(params, parallel.global_batch(batch, mesh)))
    aggregated = None
    for logs in jax.device_get(device_logs):
        aggregated = task.aggregate_logs(aggregated, logs)
    metrics = task.reduce_aggregated_logs(aggregated or {}, step)
    metrics["eval_examples"] = examples * jax.process_count()
    return metrics


def check_inputs(inputs: Inputs, local_batch_size: int) -> None:
    """Reads one train and one eval batch, so bad data fails before any checkpoint is touched.

    Args:
      inputs: the datasets of this process.
      local_batch_size: rows per batch on this process, for the error message.

    Raises:
      DataError: a dataset cannot fill one batch or its data is bad (corrupt, ids out of range).
    """
    if inputs.train is not None:
        first_batch(inputs.train, inputs.source, local_batch_size)
    if inputs.eval is not None:
        first_batch(inputs.eval, f"{inputs.source} (eval)", local_batch_size)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, mode: str = "train_and_eval"
) -> dict[str, dict[str, float]]:
    """Pretrains (and evaluates) a masked LM, resuming from the workdir's latest checkpoint.

    The workdir is locked for the whole run (see `mlm.workdir`): a second run in it stops at
    once with a one-line error.

    Args:
      config: a config from `configs/` (validated here).
      workdir: where config.json, vocab.txt, metrics, TensorBoard events and checkpoints go.
      mode: `train`, `eval` (evaluate the latest checkpoint), `train_and_eval`, or
        `continuous_eval` (evaluate each checkpoint as a training job saves it, without the lock;
        see `mlm.continuous_eval`).

    Returns:
      {'train': last logged train metrics, 'eval': last eval metrics} (empty dicts when absent),
      and 'preempted': {'step': N} when a SIGTERM / SIGINT stopped the run after saving step N.
    """
    if mode not in config_lib.MODES:
        raise ConfigError(f"--mode must be one of {', '.join(config_lib.MODES)}, got '{mode}'")
    config = config_lib.validate(config)
    if mode == "continuous_eval":  # A reader next to the training job: no lock, no run files.
        from mlm import continuous_eval  # Here: it imports this module.

        return continuous_eval.run(config, workdir)
    privacy.require_accountant(config)
    metrics_lib.require_wandb(config)
    if mode != "eval":
        for line in config_lib.warnings_for(config):
            _report(f"warning: {line}")
    workdir_lib.check_path(workdir)
    if mode == "eval" and not checkpoint.has_checkpoint(workdir):
        raise WorkdirError(
            f"--mode eval: workdir '{workdir}' has no checkpoint; train first, or pass the "
            "workdir of a trained run"
        )
    workdir_lib.create(workdir)
    with workdir_lib.locked(workdir):
        return _run(config, workdir, mode)


def _run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> dict[str, dict[str, float]]:
    """`train_and_evaluate` in a created, locked workdir."""
    previous_config = workdir_lib.check_consistent(config, workdir, mode)
    if config.train.init_checkpoint and not checkpoint.has_checkpoint(workdir):
        initialize.resolve_checkpoint(config.train.init_checkpoint)  # Fail before the data.
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(
        config.train.global_batch_size, config.optimizer.grad_accum_steps, mesh
    )
    _report(f"preparing the input data in {workdir} (the vocab is built on first use)...")
    inputs: Inputs = build_inputs(
        config,
        workdir,
        need_train=mode != "eval",
        need_eval=mode != "train",
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    if mode == "eval" and inputs.eval is None:
        raise ConfigError(
            f"--mode eval: {inputs.source} has no eval data; set the eval data of the source "
            "(data.eval_files, data.tfds_eval_split, data.hf_eval_split or "
            "data.eval_tfrecord_files)"
        )
    check_inputs(inputs, config.train.global_batch_size // jax.process_count())
    experiment = Experiment.build(config, mesh)
    train_fn, eval_fn = experiment.train_step, experiment.eval_step
    _report(
        f"kernels: {experiment.model.kernels.name} (model.kernels={config.model.kernels}, "
        f"{kernels.mesh_platform(mesh)} mesh {dict(mesh.shape)})"
    )
    directory = checkpoint.checkpoint_dir(workdir)
    if mode == "eval":  # A reader: nothing under checkpoints/ is written or moved.
        manager = checkpoint.open_reader(directory)
    else:
        manager = checkpoint.make_manager(directory, config.train.keep_checkpoints)
    best_manager, writer, progress = None, None, None
    pending: BaseException | None = None
    try:
        train_iter = None
        if inputs.train is not None:
            train_iter = iter(
                prefetch(inputs.train, config.data.num_workers, config.data.prefetch_batches)
            )
        state, latest = _restore_or_start(
            experiment, workdir, manager, train_iter, mode, previous_config
        )
        if config.train.best_metric and inputs.eval is not None and mode != "eval":
            best_manager = checkpoint.make_best_manager(
                os.path.join(workdir, paths.BEST_DIRNAME),
                config.train.best_metric,
                config.train.best_metric_comp,
            )
        # A reader appends; a run drops what an earlier attempt logged after its start step.
        writer = MetricWriter(
            workdir,
            start_step=None if mode == "eval" else latest,
            wandb_run=None if mode == "eval" else metrics_lib.start_wandb(config, workdir),
        )
        if mode != "eval":  # An evaluation leaves the run's config.json as it is.
            workdir_lib.write_config(config, workdir)
        results: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        if inputs.eval is None and mode != "train" and jax.process_index() == 0:
            print(f"{inputs.source} has no eval data: evaluation is skipped", file=sys.stderr)

        def run_eval(step: int) -> None:
            if inputs.eval is None:
                return
            metrics = evaluate(
                eval_fn, eval_params(state), iter(inputs.eval), config.train.eval_steps, mesh, step
            )
            if mode == "eval" and _logged_eval(writer, step) is not None:
                _report(f"eval step {step} is already in eval_metrics.jsonl; printed, not logged")
            else:
                writer.write("eval_metrics", metrics)
            results["eval"] = metrics
            if best_manager is not None:
                checkpoint.save_best(best_manager, step, state, metrics)
            shown = {k: round(v, 4) for k, v in metrics.items() if k != "step"}
            which = " (EMA params)" if state.ema_params is not None else ""
            message = f"eval step {step}{which}: {shown}"
            if progress is not None:
                progress.write(message)  # Above the bar, never on its line.
            else:
                _report(message)

        if mode == "eval":
            run_eval(int(state.step))
            return results
        start = int(state.step)
        last = config.train.num_steps
        every = config.train.eval_every
        if mode == "train_and_eval" and start and (start == last or (every and start % every == 0)):
            # The step's eval was due; a stop signal or a kill after its save may have cut it.
            logged = _logged_eval(writer, start)
            if logged is None:
                run_eval(start)
            else:
                results["eval"] = logged
                if best_manager is not None and jax.process_count() == 1:
                    # A kill between the eval's log line and its best-checkpoint offer.
                    checkpoint.save_best(best_manager, start, state, logged)
        if start >= last and jax.process_index() == 0:
            print(
                f"checkpoint step {start} >= train.num_steps {last}: nothing to train",
                file=sys.stderr,
            )
        progress = ConsoleProgress(start, last)
        if start < last:
            progress.write(f"compiling the train step; training steps {start + 1} to {last}...")
        recovery = RecoveryPolicy.from_config(config)
        logger = _TrainLogger(
            writer,
            config.train.log_every,
            last,
            progress,
            config.train.max_consecutive_skips,
            manager.latest_step,
            functools.partial(_privacy_metrics, config),
            recovery,
        )
        # Where a recovery without any checkpoint goes back to: the run's first batch.
        first_position = train_iter.get_state() if recovery.enabled and not start else None
        with PreemptionWatcher(manager.reached_preemption) as watcher:
            step = start
            while step < last:
                step += 1
                batch = next(train_iter)
                num_tokens = int(batch["input_mask"].sum()) * jax.process_count()
                state, logs = train_fn(state, parallel.global_batch(batch, mesh))
                stop = watcher.should_stop(step)
                save_now = stop or step % config.train.checkpoint_every == 0 or step == last
                eval_now = (
                    not stop
                    and mode == "train_and_eval"
                    and (step == last or (every and step % every == 0))
                )
                try:
                    logger.add(step, logs, num_tokens)
                    if save_now or eval_now:
                        logger.flush()
                except LossBlowUpError as blow_up:
                    state, step = _recover(
                        experiment, workdir, manager, train_iter, blow_up, recovery, first_position
                    )
                    progress.write(recovery.report(blow_up, step))
                    logger.reset()
                    continue
                if save_now:
                    checkpoint.save(manager, step, state, train_iter, config.to_dict())
                if eval_now:
                    run_eval(step)
                if stop:
                    progress.close()
                    _report(
                        f"{watcher.signal_name}: saved a checkpoint at step {step} and stopped; "
                        "run the same command to resume"
                    )
                    results["train"] = logger.last_metrics
                    results["preempted"] = {"step": step}
                    return results
        logger.flush()
        progress.close()
        results["train"] = logger.last_metrics
        if config.privacy.enabled:
            results["train"].update(_privacy_metrics(config, last))
            _report(_privacy_summary(config, last, results["train"]["privacy_epsilon"]))
        return results
    except BaseException as error:
        pending = error
        raise
    finally:
        if progress is not None:
            progress.close()  # So an error message starts on its own line.
        _close(manager, best_manager, writer, pending)


def _restore_or_start(
    experiment: Experiment,
    workdir: str,
    manager: Any,
    train_iter: Iterator | None,
    mode: str,
    previous_config: ml_collections.ConfigDict | None,
) -> tuple[task.TaskState, int]:
    """The state to go on from: the latest intact checkpoint, else a new (or initialized) one.

    Returns:
      (state, the step it was saved at, or 0 for a new run).
    """
    config = experiment.config
    try:
        restored = checkpoint.restore_latest_intact(
            manager,
            experiment.restore_target(),
            train_iter,
            report=_report,
            move_damaged=mode != "eval",
        )
    except checkpoint.StateMismatchError as error:
        raise workdir_lib.state_mismatch(error, previous_config, config) from None
    if restored is not None:
        state, latest = restored
        _report(f"resumed from {workdir}/checkpoints step {latest}")
        return state, latest
    moved = workdir_lib.set_aside_previous_run(workdir)
    if moved:
        _report(f"new run from step 0: the earlier run's files moved to {moved}")
    state = experiment.init_state()
    if config.train.init_checkpoint:
        state = _initialize_from(config, workdir, state, experiment.shardings)
    return state, 0


def _recover(
    experiment: Experiment,
    workdir: str,
    manager: Any,
    train_iter: Iterator,
    blow_up: LossBlowUpError,
    recovery: RecoveryPolicy,
    first_position: Any,
) -> tuple[task.TaskState, int]:
    """Rolls back after a loss blow-up: the latest intact checkpoint, past the bad batches.

    Restores the latest intact checkpoint (the train state and the iterator position), or the
    run's start when there is none, then reads and drops the batches of the steps up to and
    including `blow_up.step`, so the bad batch is not trained on again.

    Returns:
      (the restored state, its step).

    Raises:
      DivergenceError: `train.recovery_max_trials` recoveries were made already.
    """
    manager.wait_until_finished()
    restored = checkpoint.restore_latest_intact(
        manager, experiment.restore_target(), train_iter, report=_report, move_damaged=True
    )
    if restored is None:  # No checkpoint yet: back to the run's first step.
        state, step = experiment.init_state(), 0
        if experiment.config.train.init_checkpoint:
            state = _initialize_from(experiment.config, workdir, state, experiment.shardings)
        train_iter.set_state(first_position)
    else:
        state, step = restored
    recovery.start_trial(blow_up, step)
    for _ in range(blow_up.step - step):
        next(train_iter)
    return state, step


def _privacy_summary(config: ml_collections.ConfigDict, steps: int, epsilon: float) -> str:
    """The line that reports a private run's privacy guarantee."""
    return (
        f"privacy: epsilon {epsilon:.4g} at delta {config.privacy.delta:g} after {steps} steps "
        f"(sampling rate {privacy.sampling_rate(config):.4g}, noise multiplier "
        f"{config.privacy.noise_multiplier:g}, RDP accountant)"
    )


def _close(
    manager: Any, best_manager: Any, writer: MetricWriter | None, pending: BaseException | None
) -> None:
    """Finishes the background saves and closes the writers.

    A failed save raises its one-line WorkdirError, unless another error (`pending`) is
    already on its way out: then the save's error is printed and the other one goes on.
    """
    try:
        for open_manager in (manager, best_manager):
            if open_manager is not None:
                checkpoint.finish(open_manager)
    except WorkdirError as failure:
        if pending is None:
            raise
        if not isinstance(pending, WorkdirError):
            _report(f"error: {failure}")
    finally:
        if writer is not None:
            writer.close()


def _logged_eval(writer: MetricWriter, step: int) -> dict | None:
    """The eval record of `step` if process 0 logged one (every process gets the same answer)."""
    logged = writer.logged("eval_metrics", step) if jax.process_index() == 0 else None
    if jax.process_count() == 1:
        return logged
    from jax.experimental import multihost_utils

    found = multihost_utils.broadcast_one_to_all(np.int32(logged is not None))
    return (logged or {"step": step}) if int(found) else None


def eval_params(state: task.TaskState) -> Any:
    """The params evaluation and prediction use: the EMA params when kept, else the params."""
    return state.params if state.ema_params is None else state.ema_params


def _privacy_metrics(config: ml_collections.ConfigDict, step: int) -> dict[str, float]:
    """`privacy_epsilon` after `step` steps (host side, cached per step count), or nothing."""
    if not config.privacy.enabled:
        return {}
    return {"privacy_epsilon": privacy.epsilon_for_config(config, step)}


def _initialize_from(
    config: ml_collections.ConfigDict, workdir: str, state: Any, shardings: Any
) -> Any:
    """Loads `train.init_checkpoint` into a new run's state (every process) and reports it."""
    source_dir, _ = initialize.resolve_checkpoint(config.train.init_checkpoint)
    initialize.check_vocab(source_dir, workdir)
    state, report = initialize.load_initial_state(
        state, config.train.init_checkpoint, init_optimizer=config.train.init_optimizer
    )
    if state.ema_params is not None:
        # The average starts at the loaded params, as it starts at the initial ones.
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.ema_params)
        state = state.replace(ema_params=copy(state.params))
    if jax.process_index() == 0:
        print(report.format_report(), end="", file=sys.stderr)
        initialize.write_report(report, workdir)
    return state


def _report(message: str) -> None:
    """Prints one line to stderr on process 0."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr)


def run() -> None:
    """The command line: parses flags and runs; user mistakes exit 2 with a one-line error."""
    from absl import flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    workdir_flag = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
    mode_flag = flags.DEFINE_enum("mode", "train_and_eval", list(config_lib.MODES), "What to run.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv: list[str]) -> None:
        del argv
        if not flags.FLAGS["verbosity"].present:
            # Orbax logs every save step at INFO; keep the console to the progress bar.
            logging.set_verbosity(logging.WARNING)
            checkpoint.quiet_background_failures()  # A failed save is one `error:` line.
        kernels.skip_absent_tpu()
        distributed.initialize_from_environment()  # Multi-host: from the launcher's variables.
        kernels.tune_host(jax.devices()[0].platform)  # Only the CLI changes the process.
        train_and_evaluate(config_flag.value, workdir_flag.value, mode_flag.value)

    config_file_lib.run_with_config(main)


if __name__ == "__main__":
    run()
