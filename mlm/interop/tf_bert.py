"""Checkpoints of the original google-research/bert release (TF1 variable names such as
`bert/embeddings/word_embeddings`), read with `tf.train.load_checkpoint`.

A release directory holds `bert_model.ckpt.{index,data-*}`, `bert_config.json` and `vocab.txt`.
TensorFlow comes with `pip install 'mlm[tf]'`.
"""

from __future__ import annotations

import os

import numpy as np

from mlm.errors import DataError

CONFIG_FILENAME = "bert_config.json"
VOCAB_FILENAME = "vocab.txt"
_OPTIMIZER_SLOTS = ("/adam_m", "/adam_v")


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """Reads every variable of a TF checkpoint except Adam's slots.

    Args:
      prefix: the checkpoint prefix, e.g. `uncased_L-12_H-768_A-12/bert_model.ckpt`.

    Returns:
      variable name -> numpy array.

    Raises:
      DataError: TensorFlow is missing, or the prefix names no readable checkpoint.
    """
    try:
        import tensorflow as tf
    except ImportError:
        raise DataError("reading a TF checkpoint needs TensorFlow: pip install 'mlm[tf]'") from None
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = reader.get_variable_to_shape_map()
        return {
            name: np.asarray(reader.get_tensor(name))
            for name in names
            if not name.endswith(_OPTIMIZER_SLOTS)
        }
    except (tf.errors.OpError, ValueError) as error:
        reason = " ".join(str(error).split())[:160]
        raise DataError(
            f"'{prefix}' is not a readable TF checkpoint ({reason}); give the prefix, e.g. "
            "uncased_L-12_H-768_A-12/bert_model.ckpt"
        ) from None


def release_file(prefix: str, given: str, filename: str) -> str:
    """Returns `given`, or `filename` next to the checkpoint prefix (the release's layout)."""
    return given or os.path.join(os.path.dirname(os.path.abspath(prefix)), filename)
