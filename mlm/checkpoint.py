"""Orbax checkpoints of the train state together with the input iterator's position.

One `CheckpointManager` under `WORKDIR/checkpoints`: each step directory holds the `state` item
(TaskState, restored already sharded) and the `data` item (grain iterator state, one file per
process), so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mlm.errors import ConfigError, DivergenceError, MlmError, WorkdirError
from mlm.paths import CHECKPOINT_DIRNAME, DAMAGED_DIRNAME

STATE_ITEM = "state"
DATA_ITEM = "data"
CONFIG_ITEM = "config"
# Orbax errors of a restore target with another tree structure than the saved state (e.g. a
# config that adds EMA params or another optimizer): a config mismatch, not damage.
_STRUCTURE_MISMATCH = ("tree structures do not match", "Structure mismatch")


def checkpoint_dir(workdir: str) -> str:
    """Returns the checkpoint directory of a workdir (`WORKDIR/checkpoints`)."""
    return os.path.join(workdir, CHECKPOINT_DIRNAME)


def has_checkpoint(workdir: str) -> bool:
    """Whether the workdir holds a finished checkpoint step (orbax names those by step)."""
    directory = checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


class IteratorSnapshot:
    """The state of a grain iterator, captured when a save starts.

    Orbax may write the `data` item after training has moved on; saving a snapshot instead of
    the live iterator keeps the saved position that of the saved step. grain's checkpoint
    handler calls `get_state()` on it and writes the bytes.
    """

    def __init__(self, iterator: grain.DatasetIterator):
        self._state = json.dumps(iterator.get_state(), indent=4).encode()

    def get_state(self) -> bytes:
        """Returns the captured state as JSON bytes."""
        return self._state


def state_item(state: Any) -> dict[str, Any]:
    """The TaskState as the checkpoint's `state` item: its fields, without those that are None.

    Optional fields (`ema_params`, `loss_scale`) are left out when off, so a checkpoint written
    before they existed and one written with them off have the same structure and restore alike.

    Args:
      state: a TaskState (of arrays, or of ShapeDtypeStructs as a restore target); any other
        pytree is returned as it is.

    Returns:
      {field name: value} of the fields that are not None.
    """
    if not dataclasses.is_dataclass(state):
        return state
    return {
        field.name: getattr(state, field.name)
        for field in dataclasses.fields(state)
        if getattr(state, field.name) is not None
    }


def make_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    """Opens (creating if needed) the checkpoint manager of a workdir.

    Args:
      directory: the checkpoint directory (`WORKDIR/checkpoints`).
      keep: how many of the latest steps to keep; 0 keeps all.

    Returns:
      A CheckpointManager with asynchronous saves.
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise WorkdirError(
            f"cannot create checkpoint directory '{directory}' ({error.strerror}); "
            "choose a writable --workdir"
        ) from error
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None,
        create=True,
        cleanup_tmp_directories=True,  # Unfinished steps of a killed or failed save.
        enable_async_checkpointing=True,
        # A FUSE-mounted bucket renames a directory object by object, not atomically: mark
        # finished steps with a commit file instead of the final rename.
        temporary_path_class=(
            ocp.path.atomicity.CommitFileTemporaryPath if on_fuse_mount(directory) else None
        ),
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


_SAVE_HAS_FAILED = threading.Event()  # Set once a failed save has been reported (`save_failed`).


class _BackgroundFailureFilter(logging.Filter):
    """Drops orbax's tracebacks of failed background saves: `save` / `finish` report them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


class _UnretrievedFailureFilter(logging.Filter):
    """Drops asyncio's echoes of a failed save's other writes, once the failure is reported.

    When one write of a save fails, orbax stops waiting for the others; each one that fails
    too is later logged by asyncio ('... exception was never retrieved') with its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        echo = str(record.msg).startswith(
            ("Task exception was never retrieved", "Future exception was never retrieved")
        )
        return not (echo and _SAVE_HAS_FAILED.is_set())


def quiet_background_failures() -> None:
    """Keeps orbax's background-save tracebacks off the console (command-line entry points).

    A failed save reaches the run as one WorkdirError line (`save_failed`); orbax, asyncio
    and tensorstore also report each failing write with a traceback, hundreds of lines for
    one full disk.
    """
    for name, kind in (("absl", _BackgroundFailureFilter), ("asyncio", _UnretrievedFailureFilter)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    if not isinstance(sys.unraisablehook, _LateWakeupFilter):
        sys.unraisablehook = _LateWakeupFilter(sys.unraisablehook)


class _LateWakeupFilter:
    """Drops tensorstore's late wake-ups of an event loop that orbax already closed.

    When a background save fails, orbax's event loop ends at the first error while other
    tensorstore writes are still failing; each of those then reports 'Event loop is closed'
    as an unraisable exception, a traceback each, from a tensorstore thread at any moment.
    Every other unraisable exception goes to the hook that was there before.
    """

    def __init__(self, previous: Callable[[Any], object]):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        error = unraisable.exc_value
        frames = [frame.name for frame in traceback.extract_tb(unraisable.exc_traceback)]
        late_wakeup = (
            isinstance(error, RuntimeError)
            and str(error) == "Event loop is closed"
            and "call_soon_threadsafe" in frames
        )
        if not late_wakeup:
            self.previous(unraisable)


def open_reader(directory: str) -> ocp.CheckpointManager:
    """Opens another run's (or this run's) checkpoints only to read them.

    Nothing under `directory` is created, cleaned up or written, so a reader may run while the
    run that owns the directory is saving.

    Args:
      directory: a checkpoint directory (`WORKDIR/checkpoints`).

    Returns:
      A read-only CheckpointManager (close it after use).
    """
    options = ocp.CheckpointManagerOptions(
        read_only=True,
        create=False,
        save_interval_steps=0,
        temporary_path_class=(
            ocp.path.atomicity.CommitFileTemporaryPath if on_fuse_mount(directory) else None
        ),
    )
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that a read-only manager is read only.
    try:
        return ocp.CheckpointManager(os.path.abspath(directory), options=options)
    finally:
        absl_logger.setLevel(level)


def saved_config(directory: str, step: int) -> dict | None:
    """The run config saved with a step (its `config` item), or None when absent or unreadable.

    Args:
      directory: a checkpoint directory.
      step: a finished step.

    Returns:
      The config as a dict (the run's config.json at that step).
    """
    path = epath.Path(os.path.abspath(directory)) / str(step) / CONFIG_ITEM
    if not path.is_dir():
        return None
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
            config = checkpointer.restore(path)
    except Exception:  # noqa: BLE001 (a damaged item is as good as none here)
        return None
    return config if isinstance(config, dict) else None


def latest_saved_config(directory: str, steps: list[int]) -> tuple[dict, int] | None:
    """The newest readable `config` item among `steps`, with its step, or None."""
    for step in sorted(steps, reverse=True):
        config = saved_config(directory, step)
        if config is not None:
            return config, step
    return None


def all_finite(state: Any) -> bool:
    """Whether the parameters (and EMA parameters) of a TaskState are finite (one device sync).

    Any other pytree: whether all its floating-point leaves are.
    """
    if hasattr(state, "params"):
        ema_params = getattr(state, "ema_params", None)
        state = [state.params] + ([ema_params] if ema_params is not None else [])
    leaves = [leaf for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def make_best_manager(directory: str, metric: str, comp: str = "") -> ocp.CheckpointManager:
    """Opens the manager that keeps the single best step by an eval metric.

    Args:
      directory: where the best step goes (`WORKDIR/checkpoints_best`).
      metric: an eval metric name.
      comp: `higher` or `lower` is better (`train.best_metric_comp`); empty: names containing
        `loss` are better lower, others higher.

    Returns:
      A CheckpointManager keeping one step: the best so far.
    """
    lower = comp == "lower" or (not comp and "loss" in metric)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda metrics: metrics[metric],
        best_mode="min" if lower else "max",
        keep_checkpoints_without_metrics=False,
        create=True,
        enable_async_checkpointing=True,
        temporary_path_class=(
            ocp.path.atomicity.CommitFileTemporaryPath if on_fuse_mount(directory) else None
        ),
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_best(
    manager: ocp.CheckpointManager, step: int, state: Any, metrics: dict[str, float]
) -> None:
    """Offers `state` at `step` with its eval metrics; the manager keeps it if it is the best.

    Args:
      manager: from `make_best_manager`.
      step: the train step.
      state: the TaskState.
      metrics: the eval metrics of that step.
    """
    if step in manager.all_steps():
        return  # Kept before a resume; the resumed run reproduces the same state exactly.
    numbers = [value for value in metrics.values() if isinstance(value, (int, float))]
    if len(numbers) < len(metrics) or not all(map(math.isfinite, numbers)):
        return  # A non-finite metric (logged as a string) never makes a step the best.
    if not all_finite(state):
        return
    items = {STATE_ITEM: ocp.args.StandardSave(state_item(state))}
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def on_fuse_mount(path: str, mounts_file: str = "/proc/mounts") -> bool:
    """Whether `path` lies on a FUSE file system (e.g. a bucket mounted with gcsfuse).

    Args:
      path: a local path.
      mounts_file: the mount table (Linux's /proc/mounts).

    Returns:
      True when the longest mount point containing `path` has a `fuse` file system type.
    """
    try:
        with open(mounts_file) as file:
            mounts = [line.split()[1:3] for line in file if len(line.split()) >= 3]
    except OSError:
        return False
    path = os.path.realpath(path)
    best, best_type = "", ""
    for mount_point, fs_type in mounts:
        mount_point = mount_point.replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fs_type
    return best_type.startswith("fuse")


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: grain.DatasetIterator | None,
    config: dict | None = None,
) -> None:
    """Starts an asynchronous save of `state` (and the iterator position) at `step`.

    The device-to-host copy happens before this returns, so `state` may be donated to the next
    step right away; the files are written in the background.

    Args:
      manager: from `make_manager`.
      step: the step number the checkpoint is for.
      state: the TaskState.
      data_iterator: the train input iterator, or None.
      config: the run's config as a dict, saved with the step (`config` item), or None.

    Raises:
      DivergenceError: the parameters are not finite (nothing is written).
      WorkdirError: this save, or the previous one still in the background, failed (e.g. disk
        full); unfinished step directories are removed.
    """
    if not all_finite(state):
        latest = manager.latest_step()
        resume = f"step {latest}" if latest is not None else "the start"
        raise DivergenceError(
            f"training diverged: the parameters at step {step} are not finite, so step {step} "
            f"was not saved; lower optimizer.learning_rate (or check the data) and run again "
            f"to resume from {resume}"
        )
    items = {STATE_ITEM: ocp.args.StandardSave(state_item(state))}
    if data_iterator is not None:
        items[DATA_ITEM] = grain.checkpoint.CheckpointSave(IteratorSnapshot(data_iterator))
    if config is not None:
        items[CONFIG_ITEM] = ocp.args.JsonSave(config)
    try:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as error:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
        raise save_failed(manager, error) from None


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for the background save and closes the manager.

    Raises:
      WorkdirError: the background save failed; unfinished step directories are removed.
    """
    try:
        manager.wait_until_finished()
        manager.close()
    except Exception as error:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
        raise save_failed(manager, error) from None


def save_failed(manager: ocp.CheckpointManager, error: BaseException) -> WorkdirError:
    """The one-line error of a failed save, after removing the unfinished step directories."""
    _SAVE_HAS_FAILED.set()
    if isinstance(error, WorkdirError):
        return error
    reason = " ".join(str(error).split())
    for known in ("No space left on device", "File too large", "Permission denied"):
        if known in reason:
            reason = known
            break
    else:
        reason = f"{type(error).__name__}: {reason[:160]}"
    directory = os.fspath(manager.directory)
    remove_unfinished(directory, settle_s=0.5)
    try:
        manager.reload()
        latest = manager.latest_step()
    except Exception:  # noqa: BLE001 (the directory itself may be unreadable now)
        latest = None
    resume = f"from step {latest}" if latest is not None else "from the start"
    return WorkdirError(
        f"saving a checkpoint in '{directory}' failed ({reason}); free space or fix the disk, "
        f"then run the same command again to resume {resume}"
    )


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    data_iterator: grain.DatasetIterator | None = None,
) -> Any:
    """Restores the state (sharded as `abstract_state` says) and, if given, the iterator position.

    Args:
      manager: from `make_manager`.
      step: the step to restore.
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings, e.g. from
        `jax.eval_shape` of the init function.
      data_iterator: the train input iterator to move to the saved position, or None.

    Returns:
      The restored TaskState.
    """
    items = {STATE_ITEM: ocp.args.StandardRestore(state_item(abstract_state))}
    if data_iterator is not None:
        items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if not dataclasses.is_dataclass(abstract_state):
        return restored[STATE_ITEM]
    return abstract_state.replace(**restored[STATE_ITEM])


def restore_latest_intact(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator: grain.DatasetIterator | None = None,
    *,
    report: Callable[[str], None],
    move_damaged: bool = False,
    steps: list[int] | None = None,
) -> tuple[Any, int] | None:
    """Restores the newest step that reads back whole, trying older steps past damaged ones.

    A step that fails to restore (truncated or corrupt files, a missing item) is reported and
    the previous step is tried; the run that owns the directory (`move_damaged`) moves it to
    `checkpoints/damaged/STEP` (process 0; never deleted) so the step can be written again,
    readers leave it in place. A step whose saved shapes or structure differ from
    `abstract_state` is a config mismatch, never damage.

    Args:
      manager: from `make_manager` (or `open_reader` for readers).
      abstract_state: the restore target (see `restore`).
      data_iterator: the train input iterator to move to the saved position, or None.
      report: prints one line (e.g. to stderr).
      move_damaged: move damaged steps aside (only the run that owns the workdir; readers
        leave them).
      steps: the steps to try; None: all of the manager's (`--mode continuous_eval` passes
        the one it evaluates).

    Returns:
      (state, step), or None when the directory holds no step.

    Raises:
      StateMismatchError: a step holds a state of other shapes or structure.
      WorkdirError: every step is damaged.
    """

    def mismatch(step: int, reason: str) -> str | None:
        if any(sign in reason for sign in _STRUCTURE_MISMATCH):
            return reason[:160]
        return params_mismatch(os.fspath(manager.directory), step, abstract_state)

    return load_latest_intact(
        list(manager.all_steps()) if steps is None else steps,
        lambda step: restore(manager, step, abstract_state, data_iterator),
        where=f"'{manager.directory}'",
        report=report,
        mismatch=mismatch,
        on_damaged=(lambda step: _move_aside(manager, step)) if move_damaged else None,
    )


class StateMismatchError(ConfigError):
    """A checkpoint step holds a train state of other shapes or structure than the config builds.

    Attributes:
      step: the step.
      difference: what differs, e.g. a parameter's saved and expected shapes.
    """

    def __init__(self, message: str, step: int, difference: str):
        super().__init__(message)
        self.step = step
        self.difference = difference


def load_latest_intact(
    steps: list[int],
    load: Callable[[int], Any],
    *,
    where: str,
    report: Callable[[str], None],
    mismatch: Callable[[int, str], str | None] = lambda step, reason: None,
    on_damaged: Callable[[int], None] | None = None,
) -> tuple[Any, int] | None:
    """Calls `load(step)` on the steps, newest first, until one reads back whole.

    Every reader of checkpoints (resume, `--mode eval`, fill_mask, convert, init_checkpoint)
    goes through this, so they agree on which step is the latest intact one.

    Args:
      steps: the finished steps.
      load: reads one step; raises on damage.
      where: the checkpoint directory, for messages.
      report: prints one line.
      mismatch: (step, error text) -> what differs when the step is intact but holds another
        state than the reader expects, else None (damage).
      on_damaged: called with each damaged step (e.g. to move it aside); None leaves it.

    Returns:
      (what `load` returned, step), or None when there is no step.

    Raises:
      StateMismatchError: `mismatch` named a difference.
      WorkdirError: every step is damaged.
    """
    for step in sorted(steps, reverse=True):
        try:
            return load(step), step
        except MlmError:
            raise
        except Exception as error:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
            reason = " ".join(str(error).split())[:200]
            difference = mismatch(step, reason)
            if difference is not None:
                raise StateMismatchError(
                    f"checkpoint step {step} holds a train state of another shape or structure "
                    f"than this config builds ({difference}); resume with the config the run "
                    "was started with (WORKDIR/config.json, or checkpoints/STEP/config) or use "
                    "a new --workdir",
                    step,
                    difference,
                ) from None
            action = (
                f"moved to {DAMAGED_DIRNAME}/{step}" if on_damaged is not None else "left in place"
            )
            report(
                f"checkpoint step {step} is incomplete or damaged ({type(error).__name__}: "
                f"{reason}); {action}, trying the previous step"
            )
            if on_damaged is not None:
                on_damaged(step)
    if steps:
        moved = f" (damaged steps moved to {DAMAGED_DIRNAME}/)" if on_damaged is not None else ""
        raise WorkdirError(
            f"no intact checkpoint in {where}{moved}; use a new --workdir or restore the files"
        )
    return None


def params_mismatch(directory: str, step: int, abstract_state: Any) -> str | None:
    """What differs between a step's saved parameters and those of `abstract_state`, if anything.

    Reads only the step's metadata (names and shapes). Unreadable metadata is damage, not a
    mismatch: None.

    Args:
      directory: the checkpoint directory.
      step: the step.
      abstract_state: the TaskState (of ShapeDtypeStructs) the reader expects.

    Returns:
      e.g. "params/bert/.../kernel is (32, 64) in the checkpoint, (64, 64) here", or None.
    """
    item = epath.Path(os.path.abspath(directory)) / str(step) / STATE_ITEM
    try:
        saved = ocp.PyTreeCheckpointHandler().metadata(item).tree["params"]
    except Exception:  # noqa: BLE001 (unreadable metadata: damage)
        return None
    expected = getattr(abstract_state, "params", None)
    if expected is None:
        return None
    saved_shapes = _shapes(saved)
    expected_shapes = _shapes(expected)
    only_saved = sorted(set(saved_shapes) - set(expected_shapes))
    only_expected = sorted(set(expected_shapes) - set(saved_shapes))
    if only_saved or only_expected:
        names = [f"params/{name} only in the checkpoint" for name in only_saved[:2]]
        names += [f"params/{name} only here" for name in only_expected[:2]]
        return "; ".join(names)
    for name, shape in sorted(saved_shapes.items()):
        if tuple(shape) != tuple(expected_shapes[name]):
            return (
                f"params/{name} is {tuple(shape)} in the checkpoint, "
                f"{tuple(expected_shapes[name])} here"
            )
    return None


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} of a nested mapping of arrays or array metadata."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
        flat[name] = tuple(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape)
    return flat


def _move_aside(manager: ocp.CheckpointManager, step: int) -> None:
    """Moves a damaged step directory to `damaged/STEP` so the step can be written again."""
    if jax.process_index() == 0:
        directory = os.fspath(manager.directory)
        target = os.path.join(directory, DAMAGED_DIRNAME, str(step))
        suffix = 0
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(directory, DAMAGED_DIRNAME, f"{step}.{suffix}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(directory, str(step)), target)
    manager.reload()


def remove_unfinished(directory: str, settle_s: float = 0.0, timeout_s: float = 10.0) -> None:
    """Deletes the temporary directories of saves that did not finish (process 0 only).

    Args:
      directory: a checkpoint directory (`WORKDIR/checkpoints`).
      settle_s: after a failed save, tensorstore writes of the same save may still be in
        flight and create their directories again; keep removing until none has appeared
        for this many seconds.
      timeout_s: stop trying after this many seconds (the next run's manager removes
        whatever is left).
    """
    if jax.process_index() != 0:
        return
    start = last_removal = time.monotonic()
    while True:
        if _remove_temporary_directories(directory):
            last_removal = time.monotonic()
        now = time.monotonic()
        if now - last_removal >= settle_s or now - start >= timeout_s:
            return
        time.sleep(0.05)


def _remove_temporary_directories(directory: str) -> bool:
    """Removes orbax's temporary step directories; returns whether there were any."""
    if not os.path.isdir(directory):
        return False
    names = [
        name
        for name in os.listdir(directory)
        if name.endswith(".orbax-checkpoint-tmp") or ".orbax-checkpoint-tmp-" in name
    ]
    for name in names:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return bool(names)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attaches shardings to a pytree of ShapeDtypeStructs (the restore target)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )
