"""The grain input pipeline: tokenized documents in, batches in the contract's format out.

NSP off: document -> its `[CLS] ... [SEP]` chunks -> shard -> (train: shuffle, repeat) -> grain
first-fit packing into rows of `seq_length` -> dynamic masking -> batches.
NSP on: document -> its padded `[CLS] A [SEP] B [SEP]` pairs -> shard -> (train: shuffle, repeat)
-> dynamic masking -> batches.
Ready rows (Model Garden TFRecords, masked once when written): shard -> (train: shuffle, repeat)
-> batches.

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
    document_pairs,
    pack_chunks,
    pair_instances,
)
from mlm.data.masking import mask_sequence
from mlm.errors import ConfigError, DataError

# Rows the first-fit packer fills at once.
NUM_PACKING_BINS = 128
# Training chunks are shuffled in windows of this many before packing.
CHUNK_SHUFFLE_WINDOW = 1024
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
    documents: grain.MapDataset | Sequence[Document],
    vocab: VocabIds,
    *,
    seq_length: int,
    max_predictions: int,
    masking_rate: float,
    whole_word_masking: bool,
    use_next_sentence_label: bool,
    short_seq_prob: float,
    batch_size: int,
    sentence_order: bool = False,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Builds the dataset of masked-LM batches for one host, streaming over random-access documents.

    Documents are read one at a time (a list in memory, prepared ArrayRecord shards or a TFDS
    split alike), so the corpus never has to fit in memory. Each document becomes its chunks (or
    NSP pairs, whose random next segments come from any document of the corpus); the host keeps
    every `shard_count`-th document.

    Args:
      documents: tokenized documents (lists of int32 sentence arrays without special tokens), as
        a grain MapDataset or a sequence.
      vocab: special token ids, vocabulary size and continuation flags.
      seq_length: S, tokens per row.
      max_predictions: P, predicted slots per row.
      masking_rate: fraction of the real tokens of a row to predict.
      whole_word_masking: choose whole words (a token and its `##` pieces) for prediction.
      use_next_sentence_label: rows are NSP sentence pairs instead of packed chunks.
      short_seq_prob: NSP only: probability of a shorter target length (BERT's 0.1).
      sentence_order: with use_next_sentence_label, ALBERT's sentence-order pairs (B swapped
        with A, label 1) instead of next-sentence pairs (`instances.document_pairs`).
      batch_size: rows per batch; the last incomplete batch is dropped.
      seed: seeds NSP pairing, shuffling, packing and masking; equal seeds give equal batches.
      train: shuffle the documents and repeat forever with a new order and new masks every
        epoch; otherwise one pass in order with masks fixed by `seed`, the same on every `iter()`.
      shard_index: which shard this host reads.
      shard_count: how many hosts share the data; shards hold disjoint documents.

    Returns:
      An IterDataset of dicts with the nine batch keys of the contract (int32 [B, S] token
      features, int32 / float32 [B, P] masked-LM features, int32 [B] `next_sentence_labels`).

    Raises:
      ConfigError: invalid sizes or shard.
      DataError: this shard holds no document (and, while iterating, no text at all).
    """
    _check_arguments(seq_length, max_predictions, batch_size, seed, shard_index, shard_count)
    if seq_length < (5 if use_next_sentence_label else 3):
        # Checked here, not on the first document, so a bad config fails before any reading.
        chunk_documents([], seq_length, vocab.cls_id, vocab.sep_id)
        pair_instances([], seq_length, short_seq_prob, np.random.default_rng(0), cls_id=0, sep_id=0)
    docs = (
        documents if isinstance(documents, grain.MapDataset) else grain.MapDataset.source(documents)
    )
    indices = grain.MapDataset.range(len(docs))
    if use_next_sentence_label:
        pad = functools.partial(_pad_pair, seq_length=seq_length, pad_id=vocab.pad_id)
        instances = indices.random_map(
            functools.partial(
                _document_rows,
                docs=docs,
                seq_length=seq_length,
                short_seq_prob=short_seq_prob,
                cls_id=vocab.cls_id,
                sep_id=vocab.sep_id,
                pad=pad,
                sentence_order=sentence_order,
            ),
            seed=seed,
        )
    else:
        instances = indices.map(
            functools.partial(
                _document_chunks,
                docs=docs,
                seq_length=seq_length,
                cls_id=vocab.cls_id,
                sep_id=vocab.sep_id,
            )
        )
    instances = _shard(instances, shard_index, shard_count)
    flat = grain.experimental.FlatMapIterDataset(
        _epochs(instances, seed, train).to_iter_dataset(_READ_OPTIONS),
        _Flatten(len(instances), shard_index, shard_count),
    )
    if not use_next_sentence_label:
        if train:
            # A long document's chunks arrive together: mix them with other documents' chunks,
            # which also gives the packer short chunks to fill gaps with.
            flat = grain.experimental.WindowShuffleIterDataset(
                flat, window_size=CHUNK_SHUFFLE_WINDOW, seed=seed
            )
        flat = pack_chunks(
            flat,
            seq_length,
            vocab.pad_id,
            num_packing_bins=NUM_PACKING_BINS,
            seed=seed,
            shuffle_bins=train,
        )
    mask_row = functools.partial(
        _mask_row,
        masking_rate=masking_rate,
        max_predictions=max_predictions,
        mask_id=vocab.mask_id,
        special_ids=np.asarray(vocab.special_ids),
        vocab_size=vocab.size,
        is_continuation=np.asarray(vocab.is_continuation) if whole_word_masking else None,
    )
    return flat.random_map(mask_row, seed=seed).batch(batch_size, drop_remainder=True)


def build_row_dataset(
    rows: grain.MapDataset,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Batches ready rows (already masked, e.g. Model Garden TFRecords) for one host.

    Args:
      rows: dicts with the nine keys of the batch format, one example each.
      batch_size: rows per batch; the last incomplete batch is dropped.
      seed: seeds the shuffle.
      train: shuffle and repeat forever (new order every epoch); otherwise one pass in order.
      shard_index: which shard this host reads.
      shard_count: how many hosts share the data; shards hold disjoint rows.

    Returns:
      An IterDataset of batches.
    """
    _check_arguments(1, 1, batch_size, seed, shard_index, shard_count)
    rows = _shard(rows, shard_index, shard_count)
    iterable = _epochs(rows, seed, train).to_iter_dataset(_READ_OPTIONS)
    return iterable.batch(batch_size, drop_remainder=True)


def prefetch(
    dataset: grain.IterDataset, num_workers: int = 0, prefetch_batches: int = 0
) -> grain.IterDataset:
    """Runs the pipeline in worker processes and / or keeps batches ready in a thread.

    Args:
      dataset: the batches.
      num_workers: worker processes (`mp_prefetch`); each runs the whole pipeline on every
        `num_workers`-th element of the shuffled stream and their batches are interleaved.
        0: none. One worker yields the in-process batches; two or more yield other (still
        deterministic) batches, since packing and batching then happen per worker.
      prefetch_batches: batches a background thread keeps ready; 0: none. Either way the
        iterator's get_state() / set_state() resume batch-exactly.

    Returns:
      The wrapped dataset (the same object when both are 0).
    """
    if num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads an absl flag when it starts workers and raises outside
            # `absl.app` (google/grain#1355, fixed after 0.2.18); the defaults are what we want.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    if prefetch_batches:
        dataset = grain.experimental.ThreadPrefetchIterDataset(
            dataset, prefetch_buffer_size=prefetch_batches
        )
    return dataset


def first_batch(dataset: grain.IterDataset, what: str, batch_size: int) -> dict[str, np.ndarray]:
    """Reads one batch, so bad data fails before training starts.

    Args:
      dataset: a dataset from `build_dataset` or `build_row_dataset`.
      what: names the data in the error (e.g. "data.eval_files").
      batch_size: the batch size, for the error.

    Returns:
      The first batch.

    Raises:
      DataError: the dataset cannot fill one batch (or reading it fails).
    """
    for batch in dataset:
        return batch
    raise DataError(
        f"{what}: fewer examples than one batch of {batch_size} on this host; add more data or "
        "lower train.global_batch_size"
    )


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


def _shard(items: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
    """Returns every `shard_count`-th item from `shard_index`: disjoint parts covering all."""
    shard = items[shard_index::shard_count]
    if not len(shard):
        raise DataError(
            f"shard {shard_index} of {shard_count} holds no documents (the data has "
            f"{len(items)}); add more data or use fewer hosts"
        )
    return shard


def _epochs(instances: grain.MapDataset, seed: int, train: bool) -> grain.MapDataset:
    """Training: a new shuffle every epoch, forever. Evaluation: one pass in order."""
    if not train:
        return instances
    return instances.shuffle(seed).repeat(None)


def _document_chunks(
    index: int, *, docs: grain.MapDataset, seq_length: int, cls_id: int, sep_id: int
) -> list[np.ndarray]:
    """The `[CLS] ... [SEP]` chunks of document `index`."""
    return chunk_documents([docs[index]], seq_length, cls_id, sep_id)


def _document_rows(
    index: int,
    rng: np.random.Generator,
    *,
    docs: grain.MapDataset,
    seq_length: int,
    short_seq_prob: float,
    cls_id: int,
    sep_id: int,
    pad: functools.partial,
    sentence_order: bool = False,
) -> list[dict[str, np.ndarray]]:
    """The padded NSP (or sentence-order) pairs of document `index`."""
    pairs = document_pairs(
        docs,
        index,
        seq_length,
        short_seq_prob,
        rng,
        cls_id=cls_id,
        sep_id=sep_id,
        sentence_order=sentence_order,
    )
    return [pad(pair) for pair in pairs]


class _Flatten(grain.experimental.FlatMapTransform):
    """Emits the items of each document's list; raises once a whole epoch of documents is empty."""

    max_fan_out = 1  # Only used by MapDataset flat maps; these are IterDataset flat maps.

    def __init__(self, num_documents: int, shard_index: int, shard_count: int):
        self._num_documents = num_documents
        self._shard = f"shard {shard_index} of {shard_count}"
        self._empty_in_a_row = 0

    def flat_map(self, items: list) -> list:
        if items:
            self._empty_in_a_row = 0
            return items
        self._empty_in_a_row += 1
        if self._empty_in_a_row > self._num_documents:
            raise DataError(
                f"{self._shard}: all {self._num_documents} documents hold no text; check the "
                "input data and that the tokenizer produces ids"
            )
        return items


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
