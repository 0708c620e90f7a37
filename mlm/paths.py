"""The workdir layout: the name of every file and directory a run writes, and atomic writes.

A workdir holds:
  config.json          the run's config (`mlm.workdir.write_config`)
  vocab.txt            the WordPiece vocab, and vocab_settings.json, how it was made
  metrics.jsonl, eval_metrics.jsonl, tensorboard/   the logs (`mlm.metrics.MetricWriter`)
  tensorboard_eval/    the eval events of `--mode continuous_eval` (`mlm.continuous_eval`)
  checkpoints/STEP     the state, the iterator position and the config of each saved step;
                       checkpoints/damaged/ holds steps a resume could not read
  checkpoints_best/    the best step by `train.best_metric`
  init_report.txt      what `train.init_checkpoint` copied
  lock                 held by the run that writes the workdir (`mlm.workdir.locked`)
  previous_runs/N/     what a new run in a used workdir set aside
  wandb_run_id, wandb/ the Weights & Biases run a resumed run continues (train.wandb_project)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

from mlm.errors import WorkdirError

CONFIG_FILENAME = "config.json"
VOCAB_FILENAME = "vocab.txt"
VOCAB_SETTINGS_FILENAME = "vocab_settings.json"
TENSORBOARD_DIRNAME = "tensorboard"
CONTINUOUS_EVAL_TENSORBOARD_DIRNAME = "tensorboard_eval"
CHECKPOINT_DIRNAME = "checkpoints"
BEST_DIRNAME = "checkpoints_best"
DAMAGED_DIRNAME = "damaged"
INIT_REPORT_FILENAME = "init_report.txt"
LOCK_FILENAME = "lock"
PREVIOUS_DIRNAME = "previous_runs"
WANDB_ID_FILENAME = "wandb_run_id"


def metrics_path(workdir: str, name: str) -> str:
    """The JSON-lines file of one metrics stream (`metrics`, `eval_metrics`) in a workdir."""
    return os.path.join(workdir, f"{name}.jsonl")


def write_text_atomically(path: str, text: str | Iterable[str]) -> None:
    """Writes UTF-8 text to ``path`` through a temporary file and ``os.replace``.

    Args:
      path: the file to write; its directory must exist.
      text: the content, written with ``\\n`` line ends; or an iterable of pieces, written as
        they come (for text too big to hold). An error while iterating leaves ``path`` as it was.
    """
    directory = os.path.dirname(path) or "."
    try:
        file_descriptor, temporary_path = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
        )
    except OSError as error:
        raise WorkdirError(
            f"{directory}: cannot write {os.path.basename(path)} ({error.strerror or error}); "
            "choose a writable workdir"
        ) from None
    try:
        with os.fdopen(file_descriptor, "w", encoding="utf-8", newline="\n") as file:
            file.writelines([text] if isinstance(text, str) else text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_path, 0o666 & ~umask)  # mkstemp's 0600 would hide it from others.
        os.replace(temporary_path, path)
    except BaseException as error:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        if isinstance(error, OSError):
            raise WorkdirError(
                f"{path}: cannot write ({error.strerror or error}); choose a writable workdir"
            ) from None
        raise
