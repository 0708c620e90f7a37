"""The grain input pipeline: tokenized documents in, batches in the contract's format out.

NSP off: documents -> `[CLS] ... [SEP]` chunks -> shard -> (train: shuffle, repeat) -> grain
first-fit packing into rows of `seq_length` -> dynamic masking -> batches.
NSP on: documents -> `[CLS] A [SEP] B [SEP]` pairs -> shard -> (train: shuffle, repeat) -> padding
and dynamic masking -> batches.

Everything runs in the calling process, is deterministic given the seed, and the iterator's
`get_state()` / `set_state()` resume exactly where it stopped (the state is a small JSON-able dict).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

import grain
import numpy as np

from mlm.data.instances import (
    Document,
    SentencePair,
    chunk_documents,
    pack_chunks,
    pair_instances,
)
from mlm.data.masking import mask_sequence
from mlm.errors import ConfigError, DataError

# Rows the first-fit packer fills at once: 98% non-padding tokens on short documents at seq 128.
NUM_PACKING_BINS = 128
# In-memory data: read synchronously, no thread pool.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class VocabIds(Protocol):
    """The token ids the pipeline needs; `mlm.data.tokenizer.Vocab` provides them."""

    @property
    def size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def cls_id(self) -> int: ...
    @property
    def sep_id(self) -> int: ...
    @property
    def mask_id(self) -> int: ...
    @property
    def special_ids(self) -> np.ndarray: ...
    @property
    def is_continuation(self) -> np.ndarray: ...


def build_dataset(
    docs: Sequence[Document],
    vocab: VocabIds,
    *,
    seq_length: int,
    max_predictions: int,
    masking_rate: float,
    whole_word_masking: bool,
    use_next_sentence_label: bool,
    short_seq_prob: float,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Builds the dataset of masked-LM batches for one host.

    Args:
      docs: tokenized documents (lists of int32 sentence arrays without special tokens).
      vocab: special token ids, vocabulary size and continuation flags.
      seq_length: S, tokens per row.
      max_predictions: P, predicted slots per row.
      masking_rate: fraction of the real tokens of a row to predict.
      whole_word_masking: choose whole words (a token and its `##` pieces) for prediction.
      use_next_sentence_label: rows are NSP sentence pairs instead of packed chunks.
      short_seq_prob: NSP only: probability of a shorter target length (BERT's 0.1).
      batch_size: rows per batch; the last incomplete batch is dropped.
      seed: seeds NSP pairing, shuffling, packing and masking; equal seeds give equal batches.
      train: shuffle and repeat forever with a new order and new masks every epoch; otherwise
        one pass in order with masks fixed by `seed`, the same on every `iter()`.
      shard_index: which shard this host reads.
      shard_count: how many hosts share the data; shards hold disjoint chunks / pairs.

    Returns:
      An IterDataset of dicts with the nine batch keys of the contract (int32 [B, S] token
      features, int32 / float32 [B, P] masked-LM features, int32 [B] `next_sentence_labels`).

    Raises:
      ConfigError: invalid sizes or shard.
      DataError: this shard's data cannot fill one batch.
    """
    _check_arguments(seq_length, max_predictions, batch_size, seed, shard_index, shard_count)
    mask_row = functools.partial(
        _mask_row,
        masking_rate=masking_rate,
        max_predictions=max_predictions,
        mask_id=vocab.mask_id,
        special_ids=np.asarray(vocab.special_ids),
        vocab_size=vocab.size,
        is_continuation=np.asarray(vocab.is_continuation) if whole_word_masking else None,
    )
    if use_next_sentence_label:
        pairs = pair_instances(
            docs,
            seq_length,
            short_seq_prob,
            np.random.default_rng(seed),
            cls_id=vocab.cls_id,
            sep_id=vocab.sep_id,
        )
        pairs = _shard(pairs, shard_index, shard_count, "sentence pairs")
        _check_enough_rows(len(pairs), batch_size, "sentence pairs", shard_index, shard_count)
        instances = _epochs(grain.MapDataset.source(pairs), seed, train)
        rows = instances.map(
            functools.partial(_pad_pair, seq_length=seq_length, pad_id=vocab.pad_id)
        )
        rows = rows.random_map(mask_row, seed=seed).to_iter_dataset(_READ_OPTIONS)
    else:
        chunks = chunk_documents(docs, seq_length, vocab.cls_id, vocab.sep_id)
        chunks = _shard(chunks, shard_index, shard_count, "chunks")
        _check_enough_packed_rows(chunks, seq_length, batch_size, shard_index, shard_count)
        packed = pack_chunks(
            _epochs(grain.MapDataset.source(chunks), seed, train).to_iter_dataset(_READ_OPTIONS),
            seq_length,
            vocab.pad_id,
            num_packing_bins=NUM_PACKING_BINS,
            seed=seed,
            shuffle_bins=train,
        )
        rows = packed.random_map(mask_row, seed=seed)
    return rows.batch(batch_size, drop_remainder=True)


def _check_arguments(
    seq_length: int,
    max_predictions: int,
    batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
) -> None:
    if max_predictions < 1 or max_predictions > seq_length:
        raise ConfigError(
            f"data.max_predictions_per_seq={max_predictions} must be in [1, seq_length="
            f"{seq_length}]; BERT uses about seq_length * masking_rate (20 for 128)"
        )
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"train.seed={seed} must be in [0, 2**32) for grain's shuffle")
    if not 0 <= shard_index < shard_count:
        raise ConfigError(
            f"shard_index={shard_index} must be in [0, shard_count={shard_count}); "
            "pass jax.process_index() and jax.process_count()"
        )


def _shard(items: list, shard_index: int, shard_count: int, what: str) -> list:
    """Returns every `shard_count`-th item from `shard_index`: disjoint parts covering all."""
    if not items:
        raise DataError(
            f"the documents yield no {what}: every document is empty; "
            "check the input files and that the tokenizer produces ids"
        )
    return items[shard_index::shard_count]


def _epochs(instances: grain.MapDataset, seed: int, train: bool) -> grain.MapDataset:
    """Training: a new shuffle every epoch, forever. Evaluation: one pass in order."""
    if not train:
        return instances
    return instances.shuffle(seed).repeat(None)


def _check_enough_rows(
    num_rows: int, batch_size: int, what: str, shard_index: int, shard_count: int
) -> None:
    if num_rows < batch_size:
        raise DataError(
            f"shard {shard_index} of {shard_count} holds {num_rows} {what}, fewer than one "
            f"batch of {batch_size}; add more text or lower the batch size (or the shard count)"
        )


def _check_enough_packed_rows(
    chunks: list[np.ndarray], seq_length: int, batch_size: int, shard_index: int, shard_count: int
) -> None:
    """Raises DataError when one in-order pass of packing gives less than one batch of rows."""
    num_tokens = sum(len(chunk) for chunk in chunks)
    if -(-num_tokens // seq_length) >= batch_size:
        return  # Even perfect packing needs at least a batch of rows.
    num_rows = len(chunks)
    if num_rows >= batch_size:  # Few tokens in many chunks: count the rows of a real packing.
        source = grain.MapDataset.source(chunks).to_iter_dataset(_READ_OPTIONS)
        packed = pack_chunks(
            source, seq_length, 0, num_packing_bins=NUM_PACKING_BINS, seed=0, shuffle_bins=False
        )
        num_rows = sum(1 for _ in packed)
    _check_enough_rows(
        num_rows, batch_size, f"packed rows ({num_tokens} tokens)", shard_index, shard_count
    )


def _pad_pair(pair: SentencePair, *, seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pads one NSP pair to `seq_length`: a single packed sequence per row."""
    length = len(pair.input_word_ids)
    input_word_ids = np.full(seq_length, pad_id, np.int32)
    input_word_ids[:length] = pair.input_word_ids
    input_type_ids = np.zeros(seq_length, np.int32)
    input_type_ids[:length] = pair.input_type_ids
    input_mask = (np.arange(seq_length) < length).astype(np.int32)
    return {
        "input_word_ids": input_word_ids,
        "input_type_ids": input_type_ids,
        "packed_segment_ids": input_mask,
        "position_ids": np.arange(seq_length, dtype=np.int32),
        "next_sentence_labels": np.int32(pair.next_sentence_label),
    }


def _mask_row(
    row: dict[str, np.ndarray], rng: np.random.Generator, **masking
) -> dict[str, np.ndarray]:
    """Completes a row to the batch format with fresh masks drawn from `rng`."""
    input_mask = (row["packed_segment_ids"] > 0).astype(np.int32)
    masked = mask_sequence(row["input_word_ids"], input_mask, rng, **masking)
    zeros = np.zeros_like(input_mask)
    return {
        "input_word_ids": masked["input_word_ids"],
        "input_mask": input_mask,
        "input_type_ids": row.get("input_type_ids", zeros),
        "packed_segment_ids": row["packed_segment_ids"],
        "position_ids": row["position_ids"],
        "masked_lm_positions": masked["masked_lm_positions"],
        "masked_lm_ids": masked["masked_lm_ids"],
        "masked_lm_weights": masked["masked_lm_weights"],
        "next_sentence_labels": row.get("next_sentence_labels", np.int32(0)),
    }
