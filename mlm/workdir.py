"""The run directory: its checks, its lock, and what a new run sets aside.

What a workdir holds, and every name in it, is `mlm.paths`.

One run at a time writes a workdir: an OS-level lock (`fcntl.flock`) on `WORKDIR/lock`, held
by process 0 for the whole run. The kernel releases it when the holder exits or dies (kill -9
included), so a dead run never leaves the workdir locked. The file names the holder (host,
pid, start time) for the message a second run prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

import jax
import ml_collections
from flax import traverse_util

from mlm import checkpoint
from mlm import config as config_lib
from mlm.errors import ConfigError, WorkdirError
from mlm.paths import (
    BEST_DIRNAME,
    CONFIG_FILENAME,
    INIT_REPORT_FILENAME,
    LOCK_FILENAME,
    PREVIOUS_DIRNAME,
    WANDB_ID_FILENAME,
    write_text_atomically,
)

# Sections of config.json a resumed run must share with the run that wrote the checkpoints,
# except fields that change neither the model nor the batches (every kernel set has the same
# parameters and computes the same function).
_FIXED_SECTIONS = ("model", "data")
FREE_FIELDS = ("data.prefetch_batches", "model.kernels")
# Evaluation may read other data; only the data fields that shape the model or its tokens stay.
_EVAL_FIXED_DATA = ("data.lowercase", "data.use_next_sentence_label")


def check_path(workdir: str) -> None:
    """Refuses a workdir that the local file system cannot hold (a URL)."""
    if "://" in workdir:
        raise WorkdirError(
            f"workdir '{workdir}' is a URL; mlm.train writes its workdir through the local "
            "filesystem: mount the bucket (e.g. gcsfuse, as launch/tpu_vm.sh does) and pass the "
            "mounted path"
        )


def create(workdir: str) -> None:
    """Creates the workdir and checks that it is writable.

    Raises:
      WorkdirError: it cannot be created or written.
    """
    check_path(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
        with open(probe, "w") as file:
            file.write("ok")
        os.remove(probe)
    except OSError as error:
        raise WorkdirError(
            f"workdir '{workdir}' is not writable ({error.strerror}); pass a writable --workdir"
        ) from error


def _is_fixed(name: str, mode: str) -> bool:
    if name.startswith("data.") and mode == "eval":
        return name in _EVAL_FIXED_DATA
    return name not in FREE_FIELDS


def run_config(workdir: str) -> tuple[dict, str] | None:
    """The config of the run that wrote the workdir's checkpoints, and where it was read.

    `config.json`, or when it is missing the `config` item of the newest step that has one.

    Returns:
      (config as a dict, its path), or None when the workdir holds no checkpoint step.

    Raises:
      WorkdirError: config.json exists but cannot be read as a JSON object.
    """
    if not checkpoint.has_checkpoint(workdir):
        return None
    path = os.path.join(workdir, CONFIG_FILENAME)
    if os.path.exists(path):
        return _read_config_json(path, workdir)[0], path
    directory = checkpoint.checkpoint_dir(workdir)
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    found = checkpoint.latest_saved_config(directory, steps)
    if found is None:
        return None
    config, step = found
    return config, os.path.join(directory, str(step), checkpoint.CONFIG_ITEM)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The validated config of a workdir's run, for readers (`--mode eval`, fill_mask, convert).

    `config.json`; when it is missing, the config saved with the newest checkpoint step (what a
    resumed run would check against).

    Args:
      workdir: a directory written by `mlm.train` (or `mlm.convert --from`).

    Returns:
      The run's config.

    Raises:
      WorkdirError: no config at all, or config.json is unreadable, not JSON, not a JSON object,
        or not a valid config; the message names the file and how to restore it.
    """
    path = os.path.join(workdir, CONFIG_FILENAME)
    if not os.path.exists(path):
        found = run_config(workdir)
        if found is None:
            raise WorkdirError(
                f"'{path}' not found; is '{workdir}' a workdir written by mlm.train?"
            )
        return _validated(json.dumps(found[0]), found[1], workdir)
    return _validated(_read_config_json(path, workdir)[1], path, workdir)


def _read_config_json(path: str, workdir: str) -> tuple[dict, str]:
    """A workdir's config.json as (JSON object, text).

    Raises:
      WorkdirError: unreadable, not JSON, or not a JSON object; names how to restore it.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        problem = f"cannot be read ({getattr(error, 'strerror', None) or error})"
        raise WorkdirError(f"{path} {problem}; {restore_config_hint(workdir, path)}") from None
    try:
        content = json.loads(text)
    except ValueError as error:
        raise WorkdirError(
            f"{path} is not valid JSON ({error}); {restore_config_hint(workdir, path)}"
        ) from None
    if not isinstance(content, dict):
        kind = _JSON_KINDS.get(type(content), "value")
        raise WorkdirError(
            f"{path} holds a JSON {kind}, not an object of config sections; "
            f"{restore_config_hint(workdir, path)}"
        )
    return content, text


# The JSON name of what json.loads returned, for messages.
_JSON_KINDS = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _validated(text: str, path: str, workdir: str) -> ml_collections.ConfigDict:
    try:
        return config_lib.from_json(text)
    except ConfigError as error:
        problem = str(error).split("; ")[0]  # Its fix is for config files, not this one.
        raise WorkdirError(
            f"{path} is not a valid run config ({problem}); {restore_config_hint(workdir, path)}"
        ) from None


def restore_config_hint(workdir: str, path: str) -> str:
    """How to get a damaged config.json back: the config saved with the newest step that has one."""
    directory = checkpoint.checkpoint_dir(workdir)
    steps = os.listdir(directory) if os.path.isdir(directory) else []
    for step in sorted((int(name) for name in steps if name.isdigit()), reverse=True):
        saved = os.path.join(directory, str(step), checkpoint.CONFIG_ITEM, "metadata")
        if os.path.isfile(saved):
            return f"restore it from the config saved with step {step}: cp {saved} {path}"
    return (
        "restore it from a checkpoint step's config item (checkpoints/STEP/config/metadata) "
        "or write the workdir again (mlm.train or mlm.convert)"
    )


def check_consistent(
    config: ml_collections.ConfigDict, workdir: str, mode: str = "train_and_eval"
) -> dict | None:
    """Checks that `config` may continue (or evaluate) the run whose checkpoints the workdir holds.

    Args:
      config: the validated config.
      workdir: the run directory.
      mode: `eval` lets the data fields differ, except those that shape the model or its tokens.

    Returns:
      The config of the run that wrote the checkpoints (see `run_config`), or None.

    Raises:
      WorkdirError: the run had other model/data fields.
    """
    found = run_config(workdir)
    if found is None:
        return None
    previous, where = found
    current = config.to_dict()
    # A field added to the schema after the run was written had its default there.
    defaults = config_lib.base_config().to_dict()
    for section in _FIXED_SECTIONS:
        saved = previous.get(section)
        if not isinstance(saved, dict):
            continue
        saved_fields = {**_dotted(defaults[section], section), **_dotted(saved, section)}
        for name, value in _dotted(current[section], section).items():
            if not _is_fixed(name, mode) or saved_fields.get(name, value) == value:
                continue
            source = "" if where.endswith(CONFIG_FILENAME) else f" ({where})"
            raise WorkdirError(
                f"workdir '{workdir}' holds a run with {name}={saved_fields[name]!r}{source}, "
                f"this config has {value!r}; use a new --workdir or the same config"
            )
    return previous


def _dotted(fields: dict, section: str) -> dict:
    """A config section's leaf fields by dotted name (`model.albert.num_hidden_groups`)."""
    return traverse_util.flatten_dict({section: fields}, sep=".")


def state_mismatch(
    error: checkpoint.StateMismatchError,
    previous: dict | None,
    config: ml_collections.ConfigDict,
) -> ConfigError:
    """Names the changed fields behind a checkpoint of another train state."""
    if previous is None:
        return error
    current = config.to_dict()
    changed = [
        f"{name}={value!r} in the run, {here[name]!r} here"
        for section in ("model", "optimizer")  # What the train state's shapes depend on.
        if isinstance(previous.get(section), dict)
        for here in [_dotted(current[section], section)]
        for name, value in _dotted(previous[section], section).items()
        if name in here and here[name] != value and name not in FREE_FIELDS
    ]
    if not changed:
        return error
    return ConfigError(
        f"checkpoint step {error.step} holds another train state than this config builds "
        f"({'; '.join(changed)}); resume with the run's config (WORKDIR/config.json) or use a "
        "new --workdir"
    )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the run's `config.json` (process 0)."""
    if jax.process_index() == 0:
        write_text_atomically(os.path.join(workdir, CONFIG_FILENAME), config_lib.to_json(config))


def set_aside_previous_run(workdir: str) -> str | None:
    """Moves what an earlier run with no checkpoint left that a new run would mix with its own.

    A new run in a workdir whose checkpoints are gone (deleted, or the first save never
    finished) starts from step 0; the earlier run's best checkpoint (`checkpoints_best/`),
    `init_report.txt` and `wandb_run_id` are moved to `previous_runs/N/` (never deleted). Its
    metric records are dropped by the new run's MetricWriter, as a resumed run drops those
    after its step.

    Returns:
      The directory they were moved to, or None (nothing to move, or not process 0).
    """
    names = [
        name
        for name in (BEST_DIRNAME, INIT_REPORT_FILENAME, WANDB_ID_FILENAME)
        if os.path.isfile(os.path.join(workdir, name))
        or (os.path.isdir(os.path.join(workdir, name)) and os.listdir(os.path.join(workdir, name)))
    ]
    if jax.process_index() != 0 or not names:
        return None
    number = 1
    while os.path.exists(os.path.join(workdir, PREVIOUS_DIRNAME, str(number))):
        number += 1
    target = os.path.join(workdir, PREVIOUS_DIRNAME, str(number))
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(workdir, name), os.path.join(target, name))
    return target


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock (process 0) while the body runs.

    Args:
      workdir: an existing, writable run directory.

    Raises:
      WorkdirError: another live process holds the lock.
    """
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, LOCK_FILENAME)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _try_lock(descriptor, workdir):
            holder = f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%c')}\n"
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, holder.encode(), 0)
        yield
    finally:
        os.close(descriptor)  # Releases the lock.


def _try_lock(descriptor: int, workdir: str) -> bool:
    """Takes the lock; False when the file system has no locks (a warning is printed)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkdirError(
                f"workdir '{workdir}' is in use by another run ({_holder(descriptor)}); wait "
                "for it to finish or stop it, or pass another --workdir"
            ) from None
        # e.g. a bucket mount without locks: run unlocked, and say so.
        print(
            f"warning: cannot lock workdir '{workdir}' ({error.strerror}); make sure no other "
            "run uses it",
            file=sys.stderr,
        )
        return False


def _holder(descriptor: int) -> str:
    """What the lock file says about its holder."""
    text = os.pread(descriptor, 512, 0).decode(errors="replace").strip()
    return text or "holder unknown"
