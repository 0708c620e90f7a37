"""Model Garden's `task.initialize`: start a new run from the parameters of an existing checkpoint.

`train.init_checkpoint` names an mlm workdir (its latest checkpoint), a checkpoint directory, or
one step `.../checkpoints/STEP`. `load_initial_state` reads that step's `state` item by name, not
by structure, so the source may be a model with or without the next-sentence head: every
parameter present in both with the same shape is copied, parameters only the new model has keep
their fresh initialization, and parameters only the checkpoint has are reported as unused. A
parameter present in both with a different shape means a different model size and is refused.

The new run starts at step 0 with its own rng. With `train.init_optimizer` the optimizer state
(moments, Adam's bias-correction count) is copied too when it has exactly this run's structure;
the learning-rate schedule's count and the divergence guard's counters keep the new run's values
(0), so the schedule is the new run's, as logged, and no skipped steps are inherited.
"""

from __future__ import annotations

import dataclasses
import filecmp
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from mlm import checkpoint
from mlm.errors import ConfigError, WorkdirError
from mlm.paths import INIT_REPORT_FILENAME, VOCAB_FILENAME, write_text_atomically
from mlm.task import TaskState

LOADED, INITIALIZED, UNUSED = "loaded", "initialized", "unused"
_FIX = (
    "set train.init_checkpoint to an mlm workdir, its checkpoints/ directory or a "
    "checkpoints/STEP directory"
)


@dataclasses.dataclass
class InitReport:
    """What `load_initial_state` did with each parameter.

    Attributes:
      source: the checkpoint directory read.
      step: the step read from it.
      loaded: names ('/'-joined) of the new model's parameters copied from the checkpoint.
      initialized: names of the new model's parameters the checkpoint lacks (fresh init kept).
      unused: names of checkpoint parameters the new model does not have.
      shapes: every name above -> its shape.
      optimizer: `loaded` or `initialized`, for the optimizer state.
    """

    source: str
    step: int
    loaded: list[str]
    initialized: list[str]
    unused: list[str]
    shapes: dict[str, tuple[int, ...]]
    optimizer: str

    def format_report(self) -> str:
        """Returns a header line and one table row (name, status, shape) per parameter name."""
        rows = [(name, LOADED) for name in self.loaded]
        rows += [(name, INITIALIZED) for name in self.initialized]
        rows += [(name, UNUSED) for name in self.unused]
        rows.sort()
        width = max([len("parameter")] + [len(name) for name, _ in rows])
        lines = [
            f"initialized from {self.source} step {self.step}: {len(self.loaded)} loaded, "
            f"{len(self.initialized)} initialized, {len(self.unused)} unused parameters; "
            f"optimizer state {self.optimizer}",
            f"{'parameter':<{width}}  {'status':<11}  shape",
        ]
        for name, status in rows:
            lines.append(f"{name:<{width}}  {status:<11}  {self.shapes[name]}")
        return "\n".join(lines) + "\n"


def _finished_steps(directory: str) -> list[int]:
    """The finished steps of another run's checkpoint directory (read only), oldest first."""
    manager = checkpoint.open_reader(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """Finds the checkpoint directory and step that `train.init_checkpoint` names.

    Args:
      path: an mlm workdir (its latest step), a checkpoints directory (its latest step), or a
        step directory `.../checkpoints/STEP`.

    Returns:
      (checkpoints directory, step); only finished steps count.

    Raises:
      ConfigError: the path is a URL or does not exist.
      WorkdirError: it holds no finished checkpoint step.
    """
    if not path:
        raise ConfigError(f"train.init_checkpoint is empty; {_FIX}")
    if "://" in path:
        raise ConfigError(
            f"train.init_checkpoint '{path}' is a URL; mount the bucket (e.g. gcsfuse) and pass "
            "the mounted path"
        )
    path = os.path.normpath(path)
    name = os.path.basename(path)
    step_dir = name.isdigit() and os.path.isdir(os.path.dirname(path))
    if not os.path.isdir(path) and not step_dir:
        raise ConfigError(f"train.init_checkpoint '{path}' does not exist; {_FIX}")
    step = None
    if os.path.isdir(checkpoint.checkpoint_dir(path)):
        directory = checkpoint.checkpoint_dir(path)
    elif step_dir:
        directory, step = os.path.dirname(path), int(name)
    else:
        directory = path
    steps = sorted(_finished_steps(directory))
    if step is not None and step not in steps:
        raise WorkdirError(
            f"train.init_checkpoint '{path}': step {step} is not a finished checkpoint of "
            f"'{directory}' (finished: {steps or 'none'}); name one of those, or the workdir "
            "for the latest"
        )
    if step is None:
        if not steps:
            raise WorkdirError(
                f"train.init_checkpoint '{path}' holds no finished checkpoint step; train the "
                f"source run first or {_FIX}"
            )
        step = steps[-1]
    return directory, step


def check_vocab(checkpoints_dir: str, workdir: str) -> None:
    """Refuses a source run whose `vocab.txt` differs from this run's: its embeddings would not fit.

    Args:
      checkpoints_dir: from `resolve_checkpoint`; its parent is the source workdir.
      workdir: this run's directory, after `build_inputs` wrote its `vocab.txt`.

    Raises:
      ConfigError: both vocab files exist and differ.
    """
    source = os.path.join(os.path.dirname(os.path.abspath(checkpoints_dir)), VOCAB_FILENAME)
    target = os.path.join(workdir, VOCAB_FILENAME)
    both = os.path.isfile(source) and os.path.isfile(target)
    if both and not filecmp.cmp(source, target, shallow=False):
        raise ConfigError(
            f"train.init_checkpoint's run used another vocab ('{source}' differs from "
            f"'{target}'); set data.vocab_file={source} in a new workdir"
        )


def _key_name(key: Any) -> str:
    for field in ("key", "name", "idx"):
        if hasattr(key, field):
            return str(getattr(key, field))
    return str(key)


def _path_name(path: tuple[Any, ...]) -> str:
    """The '/'-joined name of a `jax.tree_util` key path, e.g. 'encoder/layer_0/output/kernel'."""
    return "/".join(_key_name(key) for key in path)


def _flatten(tree: Any) -> dict[str, tuple[tuple[str, ...], Any]]:
    """{'/'-joined name: (key names, leaf)} of a pytree (state arrays or orbax metadata)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[_path_name(path)] = (tuple(_key_name(key) for key in path), leaf)
    return flat


def _restore_target(meta: Any, like: jax.Array) -> jax.ShapeDtypeStruct:
    """Reads a saved array straight into the sharding of the array it replaces."""
    return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=like.sharding)


def _restore_args(item: Any) -> Any:
    return jax.tree.map(
        lambda leaf: ocp.ArrayRestoreArgs(
            sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype
        ),
        item,
    )


def _match_params(
    source: Mapping[str, tuple[tuple[str, ...], Any]],
    target: Mapping[str, tuple[tuple[str, ...], Any]],
    where: str,
) -> tuple[list[str], list[str], list[str]]:
    """(loaded, initialized, unused) names; raises ConfigError on a shape or dtype mismatch."""
    for name in sorted(source.keys() & target.keys()):
        saved, new = source[name][1], target[name][1]
        if tuple(saved.shape) != tuple(new.shape):
            raise ConfigError(
                f"parameter '{name}' has shape {tuple(saved.shape)} in {where} but "
                f"{tuple(new.shape)} in this model: checkpoint from a different model size; "
                "set the model fields of the source run or another train.init_checkpoint"
            )
        if saved.dtype != new.dtype:
            raise ConfigError(
                f"parameter '{name}' has dtype {saved.dtype} in {where} but {new.dtype} in this "
                "model; use a checkpoint of an mlm run"
            )
    loaded = sorted(source.keys() & target.keys())
    return loaded, sorted(target.keys() - source.keys()), sorted(source.keys() - target.keys())


def _run_counters(opt_state: Any, prefix: str = "") -> set[str]:
    """Names (after `prefix`) of the optimizer-state counters of a run, not of its moments.

    The learning-rate schedule's count (optax ScaleByScheduleState) and the divergence guard's
    counters (optax ApplyIfFiniteState, all but its inner state) keep the new run's values.
    """
    kinds = (optax.ScaleByScheduleState, optax.ApplyIfFiniteState)
    is_counter_node = lambda node: isinstance(node, kinds)  # noqa: E731
    found: set[str] = set()
    for path, node in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_counter_node)[0]:
        if not is_counter_node(node):
            continue
        name = prefix + "".join(f"{_key_name(key)}/" for key in path)
        if isinstance(node, optax.ApplyIfFiniteState):
            found.update(name + field for field in _flatten(node._replace(inner_state=())))
            found |= _run_counters(node.inner_state, f"{name}inner_state/")
        else:
            found.update(name + field for field in _flatten(node))
    return found


def _check_optimizer(
    source: Mapping[str, tuple[tuple[str, ...], Any]],
    target: Mapping[str, tuple[tuple[str, ...], Any]],
    where: str,
) -> None:
    """Raises ConfigError unless both optimizer states have the same names, shapes and dtypes."""
    for name in sorted(source.keys() | target.keys()):
        saved = source.get(name, (None, None))[1]
        new = target.get(name, (None, None))[1]
        if saved is None or new is None:
            problem = f"'{name}' is only in {'this run' if saved is None else where}"
        elif tuple(saved.shape) != tuple(new.shape) or saved.dtype != new.dtype:
            problem = (
                f"'{name}' is {saved.dtype}{tuple(saved.shape)} in {where} but "
                f"{new.dtype}{tuple(new.shape)} here"
            )
        else:
            continue
        raise ConfigError(
            f"train.init_optimizer: the optimizer state of {where} does not match this run's "
            f"({problem}); set train.init_optimizer=False to load only the parameters"
        )


def _saved_tree(item_dir: epath.Path, where: str) -> Mapping[str, Any]:
    """The saved TaskState's structure as orbax metadata (shape and dtype per array), no data."""
    if not item_dir.is_dir():
        raise WorkdirError(f"{where} has no '{item_dir.name}' item; it is not an mlm checkpoint")
    saved = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), Mapping):
        raise WorkdirError(f"{where} holds no mlm train state (no params); it is not an mlm run")
    return saved


def load_initial_state(
    state: TaskState, path: str, *, init_optimizer: bool
) -> tuple[TaskState, InitReport]:
    """Copies the parameters (and optionally the optimizer state) of a checkpoint into `state`.

    Call it on every process (the arrays are read shard by shard into `state`'s shardings);
    print the report on process 0 only.

    Args:
      state: the new run's freshly initialized, sharded TaskState.
      path: `train.init_checkpoint` (see `resolve_checkpoint`).
      init_optimizer: also copy the optimizer state; it must have exactly this run's structure.

    Returns:
      (state with the loaded arrays, step and rng unchanged; the report).

    Raises:
      ConfigError / WorkdirError: bad path, not an mlm checkpoint, a parameter with another
        shape, or (with `init_optimizer`) another optimizer state structure.
    """
    directory, step = resolve_checkpoint(path)
    named_step = os.path.basename(os.path.normpath(path)).isdigit()
    steps = [step] if named_step else _finished_steps(directory)
    found = checkpoint.load_latest_intact(
        steps,
        lambda step: _load_step(state, directory, step, init_optimizer),
        where=f"train.init_checkpoint '{path}'",
        report=_report,
    )
    return found[0]


def _report(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr)


def _load_step(
    state: TaskState, directory: str, step: int, init_optimizer: bool
) -> tuple[TaskState, InitReport]:
    """`load_initial_state` from one step of a checkpoint directory."""
    where = f"checkpoint '{directory}' step {step}"
    item_dir = epath.Path(os.path.abspath(directory)) / str(step) / checkpoint.STATE_ITEM
    saved = _saved_tree(item_dir, where)
    source_params = _flatten(saved["params"])
    target_params = _flatten(state.params)
    loaded, initialized, unused = _match_params(source_params, target_params, where)
    if not loaded:
        raise ConfigError(
            f"{where} shares no parameter name with this model; point train.init_checkpoint "
            "at an mlm run"
        )
    item: dict[str, Any] = {
        "params": traverse_util.unflatten_dict(
            {
                source_params[name][0]: _restore_target(
                    source_params[name][1], target_params[name][1]
                )
                for name in loaded
            }
        )
    }
    target_opt = _flatten(state.opt_state)
    if init_optimizer:
        _check_optimizer(_flatten(saved.get("opt_state")), target_opt, where)
        item["opt_state"] = jax.tree_util.tree_map_with_path(
            lambda p, meta: _restore_target(meta, target_opt[_path_name(p)][1]),
            saved["opt_state"],
        )
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            item_dir,
            args=ocp.args.PyTreeRestore(
                item=item, restore_args=_restore_args(item), partial_restore=True
            ),
        )

    new_params = _flatten(restored["params"])
    params = jax.tree_util.tree_map_with_path(
        lambda p, leaf: new_params.get(_path_name(p), (None, leaf))[1], state.params
    )
    opt_state = state.opt_state
    if init_optimizer:
        new_opt = _flatten(restored["opt_state"])
        keep = _run_counters(state.opt_state)
        opt_state = jax.tree_util.tree_map_with_path(
            lambda p, leaf: leaf if _path_name(p) in keep else new_opt[_path_name(p)][1],
            state.opt_state,
        )
    shapes = {name: tuple(leaf.shape) for name, (_, leaf) in target_params.items()}
    shapes.update({name: tuple(source_params[name][1].shape) for name in unused})
    report = InitReport(
        source=directory,
        step=step,
        loaded=loaded,
        initialized=initialized,
        unused=unused,
        shapes=shapes,
        optimizer=LOADED if init_optimizer else INITIALIZED,
    )
    return state.replace(params=params, opt_state=opt_state), report


def write_report(report: InitReport, workdir: str) -> str:
    """Writes `format_report()` to WORKDIR/init_report.txt and returns the path."""
    path = os.path.join(workdir, INIT_REPORT_FILENAME)
    write_text_atomically(path, report.format_report())
    return path
