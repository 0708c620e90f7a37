"""The synthetic data source (`data.synthetic=True`): random batches of the configured shapes.

No vocab and no files: each batch is drawn from its own generator, seeded with `train.seed`,
the split, the input shard and the batch's index, so the stream is deterministic, each shard's
rows differ, and a grain iterator resumes batch-exactly from its `get_state()` for free (the
state is the next index). Training on it measures the whole path, input included, on a new
machine; `mlm.bench step` times the step on the first batches of the same stream
(`synthetic_batches`), so the benchmark and training share one source (Model Garden's
`input_path='dummy'`, MaxText's `dataset_type=synthetic`).
"""

from __future__ import annotations

import itertools
import math
import sys

import grain
import ml_collections
import numpy as np

from mlm import heads
from mlm.errors import ConfigError

# Fraction of real (non-pad) tokens in a synthetic row: what the packer achieves on the
# built-in corpus at seq 128 (docs/concepts.md); `mlm.bench step --real_fraction` changes it.
DEFAULT_REAL_FRACTION = 0.94
# Eval batches when train.eval_steps is 0 ("the whole eval set", which synthetic data lacks).
DEFAULT_EVAL_BATCHES = 10
# Lowest random token id: ids 0-4 are BERT's special tokens ([PAD], [UNK], [CLS], [SEP], [MASK]).
FIRST_RANDOM_ID = 5
# The [CLS]-like id every row starts with.
CLS_ID = 2
# Batches are computed when read, in the calling process.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Seed words that keep the train and eval streams apart.
_STREAMS = {True: 0, False: 1}


def synthetic_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_length: int,
    max_predictions: int,
    vocab_size: int,
    real_fraction: float,
    masking_rate: float = 0.15,
    next_sentence: bool = True,
) -> dict[str, np.ndarray]:
    """A batch of the contract's format with random ids, padding and masked slots.

    Row r holds n_r real tokens, n_r uniform in [S * (2 f - 1), S] (mean f * S, f =
    `real_fraction`), one segment each: [CLS]-like id 2 first, random ids in [5, V) after.
    min(P, n_r - 1, max(1, round(masking_rate * n_r))) distinct real positions other than the
    first are masked, with random target ids and weight 1.

    Args:
      rng: numpy random generator.
      batch_size, seq_length, max_predictions: B, S, P.
      vocab_size: V, more than 5.
      real_fraction: mean fraction of non-pad tokens per row, in (0.5, 1].
      masking_rate: fraction of a row's real tokens that are masked.
      next_sentence: two token types split at the middle of each row and random 0 / 1
        next-sentence labels; False: type 0 and label 0 everywhere, as packed documents have.

    Returns:
      numpy arrays: `input_word_ids`, `input_mask`, `input_type_ids`, `packed_segment_ids`,
      `position_ids` int32 [B, S]; `masked_lm_positions`, `masked_lm_ids` int32 [B, P];
      `masked_lm_weights` float32 [B, P]; `next_sentence_labels` int32 [B].
    """
    low = max(2, math.ceil(seq_length * (2 * real_fraction - 1)))
    lengths = rng.integers(low, seq_length + 1, size=batch_size)
    positions = np.arange(seq_length, dtype=np.int32)
    real = (positions[None, :] < lengths[:, None]).astype(np.int32)
    word_ids = rng.integers(FIRST_RANDOM_ID, vocab_size, size=(batch_size, seq_length))
    word_ids = (word_ids * real).astype(np.int32)
    word_ids[:, 0] = CLS_ID
    type_ids = np.zeros_like(real)
    if next_sentence:
        type_ids = ((positions[None, :] >= lengths[:, None] // 2) * real).astype(np.int32)
    # Distinct masked positions per row: the smallest random keys among positions 1..n_r-1.
    keys = rng.random((batch_size, seq_length))
    keys[(positions[None, :] < 1) | (real == 0)] = 2.0
    candidates = np.argsort(keys, axis=1)[:, :max_predictions]
    counts = np.maximum(1, np.round(masking_rate * lengths)).astype(np.int64)
    counts = np.minimum(counts, np.minimum(max_predictions, lengths - 1))
    slots = np.arange(max_predictions)[None, :] < counts[:, None]
    masked_positions = np.sort(np.where(slots, candidates, seq_length), axis=1)
    masked_positions = np.where(slots, masked_positions, 0).astype(np.int32)
    masked_ids = rng.integers(FIRST_RANDOM_ID, vocab_size, size=(batch_size, max_predictions))
    labels = rng.integers(0, 2, size=batch_size)
    return {
        "input_word_ids": word_ids,
        "input_mask": real,
        "input_type_ids": type_ids,
        "packed_segment_ids": real.copy(),
        "position_ids": np.broadcast_to(positions, (batch_size, seq_length)).copy(),
        "masked_lm_positions": masked_positions,
        "masked_lm_ids": (masked_ids * slots).astype(np.int32),
        "masked_lm_weights": slots.astype(np.float32),
        "next_sentence_labels": (labels * next_sentence).astype(np.int32),
    }


def eval_batches(config: ml_collections.ConfigDict) -> int:
    """Batches in the synthetic eval set: train.eval_steps, or DEFAULT_EVAL_BATCHES for 0."""
    return config.train.eval_steps or DEFAULT_EVAL_BATCHES


def synthetic_dataset(
    config: ml_collections.ConfigDict,
    *,
    train: bool,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    real_fraction: float = DEFAULT_REAL_FRACTION,
) -> grain.IterDataset:
    """One input shard's synthetic batches (`synthetic_batch`) for a config.

    Batch i of a shard is drawn from `np.random.default_rng((train.seed, split, shard_index,
    i))`: the same batches on every `iter()` and after any restart, other rows on every shard
    (with a fixed `data.input_shards`, global batches that do not depend on the process count).

    Args:
      config: a validated config: data shapes, `data.masking_rate`,
        `data.use_next_sentence_label`, `model.vocab_size`, `train.seed`, `train.eval_steps`.
      train: the train stream (endless) or the eval set (`eval_batches(config)` batches).
      batch_size: rows per batch of this shard.
      shard_index, shard_count: this shard, of how many (`mlm.data.inputs.InputShards`).
      real_fraction: mean non-pad fraction of a row, in (0.5, 1].

    Returns:
      An IterDataset of batches; its iterators' `get_state()` / `set_state()` resume exactly.
    """
    if not 0 <= shard_index < shard_count:
        raise ConfigError(
            f"shard_index={shard_index} must be in [0, shard_count={shard_count}); "
            "pass jax.process_index() and jax.process_count()"
        )
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    data = config.data
    seed = (config.train.seed, _STREAMS[train], shard_index)

    labels = heads.record_labels(config.model.cls_heads)

    def batch(index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((*seed, int(index)))
        drawn = synthetic_batch(
            rng,
            batch_size,
            data.seq_length,
            data.max_predictions_per_seq,
            config.model.vocab_size,
            real_fraction,
            data.masking_rate,
            data.use_next_sentence_label,
        )
        for key, num_classes in labels:  # Classification heads' labels (model.cls_heads).
            drawn[key] = rng.integers(0, num_classes, batch_size).astype(np.int32)
        return drawn

    length = sys.maxsize if train else eval_batches(config)
    return grain.MapDataset.range(length).map(batch).to_iter_dataset(_READ_OPTIONS)


def synthetic_batches(
    config: ml_collections.ConfigDict, real_fraction: float, num_batches: int
) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` global train batches of the synthetic source, one shard.

    What `mlm.bench step` times (and hands to Model Garden's script): the same on every call.

    Args:
      config: a validated config (`synthetic_dataset`); batches of train.global_batch_size.
      real_fraction: as for `synthetic_batch`.
      num_batches: how many.

    Returns:
      The batches.
    """
    dataset = synthetic_dataset(
        config,
        train=True,
        batch_size=config.train.global_batch_size,
        real_fraction=real_fraction,
    )
    return list(itertools.islice(dataset, num_batches))
