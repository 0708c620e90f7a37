"""Orbax checkpoints of the train state together with the input iterator's position.

One `CheckpointManager` under `WORKDIR/checkpoints`: each step directory holds the `state` item
(TaskState, restored already sharded) and the `data` item (grain iterator state, one file per
process), so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mlm.errors import ConfigError, WorkdirError

CHECKPOINT_DIRNAME = "checkpoints"
BEST_DIRNAME = "checkpoints_best"
DAMAGED_DIRNAME = "damaged"
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


def make_best_manager(directory: str, metric: str) -> ocp.CheckpointManager:
    """Opens the manager that keeps the single best step by an eval metric.

    Args:
      directory: where the best step goes (`WORKDIR/checkpoints_best`).
      metric: an eval metric name; names containing `loss` are better lower, others higher.

    Returns:
      A CheckpointManager keeping one step: the best so far.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda metrics: metrics[metric],
        best_mode="min" if "loss" in metric else "max",
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
    """
    items = {STATE_ITEM: ocp.args.StandardSave(state_item(state))}
    if data_iterator is not None:
        items[DATA_ITEM] = grain.checkpoint.CheckpointSave(IteratorSnapshot(data_iterator))
    if config is not None:
        items[CONFIG_ITEM] = ocp.args.JsonSave(config)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


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
) -> tuple[Any, int] | None:
    """Restores the newest step that reads back whole, moving damaged steps aside.

    A step that fails to restore (truncated or corrupt files, a missing item) is reported, moved
    to `checkpoints/damaged/STEP` (process 0; never deleted) and the previous step is tried.

    Args:
      manager: from `make_manager`.
      abstract_state: the restore target (see `restore`).
      data_iterator: the train input iterator to move to the saved position, or None.
      report: prints one line (e.g. to stderr).

    Returns:
      (state, step), or None when the directory holds no step.

    Raises:
      WorkdirError: every step is damaged.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore(manager, step, abstract_state, data_iterator), step
        except Exception as error:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
            reason = " ".join(str(error).split())[:200]
            if any(sign in reason for sign in _STRUCTURE_MISMATCH):
                # Not damage: this config builds another state (e.g. another optimizer).
                raise ConfigError(
                    f"checkpoint step {step} holds a train state of another structure than "
                    f"this config builds ({reason[:120]}...); resume with the config the run "
                    "was started with (WORKDIR/config.json: optimizer.name, clip_norm, ...) "
                    "or use a new --workdir"
                ) from None
            report(
                f"checkpoint step {step} is incomplete or damaged ({type(error).__name__}: "
                f"{reason}); moved to {DAMAGED_DIRNAME}/{step}, trying the previous step"
            )
            _move_aside(manager, step)
    if steps:
        raise WorkdirError(
            f"no intact checkpoint in '{manager.directory}' (damaged steps moved to "
            f"{DAMAGED_DIRNAME}/); use a new --workdir or restore the files"
        )
    return None


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


def remove_unfinished(directory: str) -> None:
    """Deletes the temporary directories of saves that did not finish (process 0 only).

    Args:
      directory: a checkpoint directory (`WORKDIR/checkpoints`).
    """
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.endswith(".orbax-checkpoint-tmp") or ".orbax-checkpoint-tmp-" in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attaches shardings to a pytree of ShapeDtypeStructs (the restore target)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        shardings,
    )
