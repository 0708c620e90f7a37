"""Model Garden's `build_inputs`: from the `data` config to train / eval datasets and a vocab.

One data source feeds a run (the `data.*` field that is set):
- text files (`train_files`) or the built-in corpus written into the workdir: each input shard
  reads and tokenizes only its own byte range of the files, lazily (`mlm.data.text_source`),
  with the workdir's `vocab.txt` (trained on the train text, or copied from `data.vocab_file`);
- `prepared_dir`: token ids written once by `python -m mlm.data.prepare`, with its vocab;
- `tfds_name`: a prepared TFDS dataset, tokenized as it is read;
- `hf_dataset`: a local Hugging Face `datasets` dataset (Arrow, memory-mapped), tokenized as it
  is read (`mlm.data.hf_source`);
- `tfrecord_files`: Model Garden / BERT pretraining TFRecords, masked already;
- `synthetic`: random batches of the configured shapes (`mlm.data.synthetic`), no vocab.
The first four stream documents through `mlm.data.pipeline.build_dataset` (chunking or NSP
pairing, packing and masking on the fly); records are batched as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Callable

import grain
import ml_collections
import numpy as np

from mlm import heads
from mlm.config import DATA_SOURCE_FIELDS
from mlm.data.builtin_corpus import write_builtin_corpus
from mlm.data.corpus import expand_globs
from mlm.data.pipeline import build_dataset, build_row_dataset
from mlm.data.synthetic import synthetic_dataset
from mlm.data.text_source import text_shard_documents
from mlm.data.tokenizer import (
    Vocab,
    load_vocab,
    read_vocab_text,
    train_wordpiece,
    vocab_from_tokens,
    vocab_tokens,
)
from mlm.errors import ConfigError, DataError
from mlm.paths import VOCAB_FILENAME, VOCAB_SETTINGS_FILENAME, write_text_atomically

# What WORKDIR/vocab.txt was trained with, so that a rerun knows whether it may reuse it.
# The data fields a trained vocab depends on (with data.lowercase and model.vocab_size).
_VOCAB_DATA_FIELDS = ("train_files", "tfds_name", "tfds_split", "tfds_data_dir", "text_field")
# Recorded only for data.hf_dataset runs, so that other runs' records (and vocabs) stay valid.
_HF_VOCAB_DATA_FIELDS = ("hf_dataset", "hf_split")
# TFDS / Hugging Face documents a vocab is trained on when no data.vocab_file is given.
VOCAB_SAMPLE_DOCUMENTS = 100_000


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the driver feeds on.

    Attributes:
      train: batches for training (infinite, resumable), or None when not needed.
      eval: batches for evaluation (one pass, the same on every `iter()`), or None without eval
        files or when not needed.
      vocab: the vocabulary (also saved as WORKDIR/vocab.txt); None for TFRecords without
        data.vocab_file (their ids are used as they are) and for data.synthetic.
      source: the config field of the data source, for messages (`data.builtin` when none).
    """

    train: grain.IterDataset | None
    eval: grain.IterDataset | None
    vocab: Vocab | None
    source: str


def corpus_files(data: ml_collections.ConfigDict, workdir: str) -> tuple[list[str], list[str]]:
    """Returns (train files, eval files): the configured globs or the built-in corpus.

    Args:
      data: the `data` config section.
      workdir: where the built-in corpus is written (`WORKDIR/corpus`) when no files are given.

    Returns:
      Train files and eval files (eval may be empty when only train files are configured).
    """
    if not data.train_files:
        if data.eval_files:
            raise ConfigError(
                "data.eval_files is set but data.train_files is empty; set both, or neither to "
                "use the built-in corpus"
            )
        train_path, eval_path = write_builtin_corpus(os.path.join(workdir, "corpus"))
        return [train_path], [eval_path]
    train_files = expand_globs(data.train_files, "data.train_files")
    eval_files = expand_globs(data.eval_files, "data.eval_files") if data.eval_files else []
    return train_files, eval_files


def workdir_vocab(
    config: ml_collections.ConfigDict,
    workdir: str,
    train_files: Callable[[], list[str]],
    *,
    copy_from: str = "",
) -> Vocab:
    """Returns the run's vocab, WORKDIR/vocab.txt, writing it first when it is not this command's.

    Which vocab a workdir holds:
    - With a finished checkpoint, WORKDIR/vocab.txt is the vocab the checkpoints were trained
      with and is kept: a given vocab must hold the same tokens (else DataError naming both
      files), and without one the workdir's is used as it is.
    - Without one (a new run, or one that stopped before its first checkpoint), the vocab of
      this command wins. A given vocab is checked first (UTF-8, the special tokens, no
      duplicates, at most `model.vocab_size` tokens) and only then copied in, atomically,
      replacing any other; a rejected vocab is never written. Without one, a WordPiece vocab is
      trained, unless WORKDIR/vocab.txt was trained with the same settings (train data,
      `model.vocab_size`, `data.lowercase`; recorded in WORKDIR/vocab_settings.json), which a
      rerun then reuses as it is. A vocab copied in, or one from before that record existed,
      is trained again.

    Args:
      config: the full config (`data` and `model.vocab_size` are read).
      workdir: the run directory.
      train_files: gives the text to train a vocab on; called only when one is trained.
      copy_from: a vocab to copy (the prepared data's); else `data.vocab_file`, if set.

    Returns:
      The vocab.

    Raises:
      DataError: the given vocab is missing, not a BERT vocab.txt, has more tokens than
        `model.vocab_size`, or differs from the vocab of the workdir's checkpoints.
    """
    from mlm.checkpoint import has_checkpoint  # Here: importing mlm.checkpoint loads orbax.

    path = os.path.join(workdir, VOCAB_FILENAME)
    settings_path = os.path.join(workdir, VOCAB_SETTINGS_FILENAME)
    exists, trained = os.path.exists(path), has_checkpoint(workdir)
    source = copy_from or config.data.vocab_file
    if source:
        field = "data.vocab_file" if source == config.data.vocab_file else "data.prepared_dir"
        given, text = _given_vocab(config, source, field)
        if exists and trained:
            current = load_vocab(path, config.data.lowercase)  # Its errors name the file.
            if current.tokens != given.tokens:
                raise DataError(
                    f"{field}: the vocab '{source}' differs from '{path}', the vocab the "
                    "workdir's checkpoints were trained with; give that vocab (the same tokens) "
                    "or use a new --workdir"
                )
            return current
        if not exists or _tokens_or_none(path) != given.tokens:
            _remove(settings_path)  # The settings describe a trained vocab.
            write_text_atomically(path, text)
        return given
    settings = _vocab_settings(config)
    if not exists or not (trained or _read_json(settings_path) == settings):
        _remove(settings_path)
        train_wordpiece(train_files(), config.model.vocab_size, config.data.lowercase, path)
        write_text_atomically(settings_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    vocab = load_vocab(path, config.data.lowercase)
    if vocab.size > config.model.vocab_size:
        raise DataError(
            f"'{path}' has {vocab.size} tokens but model.vocab_size is "
            f"{config.model.vocab_size}; set --config.model.vocab_size={vocab.size} (the run's "
            "value) or use a new --workdir"
        )
    return vocab


def _given_vocab(config: ml_collections.ConfigDict, source: str, field: str) -> tuple[Vocab, str]:
    """Loads and checks a vocab to copy into the workdir: (the vocab, its text).

    Raises:
      DataError: naming `field` and the file: missing, not a BERT vocab.txt, or larger than
        `model.vocab_size`.
    """
    if not os.path.isfile(source):
        raise DataError(
            f"vocab file '{source}' does not exist; give a BERT vocab.txt in "
            "data.vocab_file (or leave it empty to train one)"
        )
    text = read_vocab_text(source)
    vocab = vocab_from_tokens(vocab_tokens(text, source), config.data.lowercase)
    if vocab.size > config.model.vocab_size:
        raise DataError(
            f"{field} '{source}' has {vocab.size} tokens but model.vocab_size is "
            f"{config.model.vocab_size}; set --config.model.vocab_size={vocab.size} or use a "
            "smaller vocab"
        )
    return vocab, text


def _vocab_settings(config: ml_collections.ConfigDict) -> dict:
    """What a trained vocab depends on (besides the content of the files)."""
    data = config.data
    fields = _VOCAB_DATA_FIELDS + (_HF_VOCAB_DATA_FIELDS if data.hf_dataset else ())
    settings = {f"data.{name}": data[name] for name in fields}
    settings.update({"data.lowercase": data.lowercase, "model.vocab_size": config.model.vocab_size})
    return json.loads(json.dumps(settings))  # As read back from the file.


def _tokens_or_none(path: str) -> list[str] | None:
    """The tokens of a vocab file, or None when it cannot be read as one."""
    try:
        return vocab_tokens(read_vocab_text(path), path)
    except DataError:
        return None


def _read_json(path: str) -> object:
    """The content of a JSON file, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def data_source(data: ml_collections.ConfigDict) -> str:
    """Returns the data source the `data` config selects: the set source field, or `builtin`."""
    for name in DATA_SOURCE_FIELDS:
        if data[name]:
            return name
    return "builtin"


def build_inputs(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    need_train: bool = True,
    need_eval: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Inputs:
    """Builds the train and eval datasets for this process from the configured data source.

    Args:
      config: the full validated config.
      workdir: the run directory (vocab.txt, built-in corpus).
      need_train: build the train dataset (False for `--mode eval`).
      need_eval: build the eval dataset when the source has eval data (False for `--mode train`).
      shard_index: this process's index; each process reads a disjoint shard.
      shard_count: number of processes.

    Returns:
      The Inputs; each batch holds global_batch_size / shard_count rows.
    """
    data = config.data
    source = data_source(data)
    shards = input_shards(
        data.input_shards, config.train.global_batch_size, shard_index, shard_count
    )
    if source == "tfrecord_files":
        return _record_inputs(config, workdir, need_train, need_eval, shards)
    if source == "synthetic":
        return _synthetic_inputs(config, need_train, need_eval, shards)
    options = dict(
        seq_length=data.seq_length,
        max_predictions=data.max_predictions_per_seq,
        masking_rate=data.masking_rate,
        whole_word_masking=data.whole_word_masking,
        use_next_sentence_label=data.use_next_sentence_label,
        short_seq_prob=data.short_seq_prob,
        # ALBERT's pair task is sentence order (its paper, Model Garden), BERT's next sentence.
        sentence_order=config.model.encoder == "albert",
        seed=config.train.seed,
    )
    documents = {
        "builtin": _text_documents,
        "train_files": _text_documents,
        "prepared_dir": _prepared_documents,
        "tfds_name": _tfds_documents,
        "hf_dataset": _hf_documents,
    }[source]
    vocab, train_docs, eval_docs = documents(config, workdir, need_train, need_eval)

    def dataset(docs, train):
        if docs is None:
            return None
        if callable(docs):  # Sharded by the source itself (text files: by byte range).
            return shards.combine(
                lambda *, batch_size, shard_index, shard_count: build_dataset(
                    docs(shard_index, shard_count),
                    vocab,
                    train=train,
                    batch_size=batch_size,
                    **options,
                )
            )
        return shards.combine(
            lambda **part: build_dataset(docs, vocab, train=train, **options, **part)
        )

    return Inputs(
        train=dataset(train_docs, True),
        eval=dataset(eval_docs, False),
        vocab=vocab,
        source=f"data.{source}",
    )


@dataclasses.dataclass(frozen=True)
class InputShards:
    """The input shards one process reads, and how many there are in all.

    Attributes:
      indices: this process's shards, in order.
      count: the number of shards over all processes.
      batch_size: rows each shard contributes to a global batch.
    """

    indices: tuple[int, ...]
    count: int
    batch_size: int

    def combine(self, build: Callable[..., grain.IterDataset]) -> grain.IterDataset:
        """Builds one dataset per shard and concatenates their batches in shard order.

        Args:
          build: called with `batch_size`, `shard_index` and `shard_count`.

        Returns:
          This process's dataset of local batches.
        """
        parts = [
            build(batch_size=self.batch_size, shard_index=index, shard_count=self.count)
            for index in self.indices
        ]
        if len(parts) == 1:
            return parts[0]
        return grain.experimental.ZipIterDataset(parts, strict=False).map(_concatenate_batches)


def _concatenate_batches(batches: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def input_shards(
    num_shards: int, global_batch_size: int, process_index: int, process_count: int
) -> InputShards:
    """Splits `num_shards` input shards (0: one per process) between the processes.

    Args:
      num_shards: `data.input_shards`.
      global_batch_size: rows of a global batch.
      process_index: this process.
      process_count: all processes.

    Returns:
      This process's shards.

    Raises:
      ConfigError: the shards cannot be split evenly between processes or batch rows.
    """
    count = num_shards or process_count
    if count % process_count:
        raise ConfigError(
            f"data.input_shards={count} must be a multiple of the {process_count} processes; "
            "set it to a multiple (or 0: one per process)"
        )
    if global_batch_size % count:
        raise ConfigError(
            f"train.global_batch_size ({global_batch_size}) must be divisible by "
            f"data.input_shards ({count}); change one of them"
        )
    per_process = count // process_count
    first = process_index * per_process
    return InputShards(
        indices=tuple(range(first, first + per_process)),
        count=count,
        batch_size=global_batch_size // count,
    )


# Each returns (vocab, train documents or None, eval documents or None).
def _text_documents(config, workdir, need_train, need_eval):
    """Text files: each input shard reads and tokenizes its own byte range, lazily."""
    train_files, eval_files = corpus_files(config.data, workdir)
    vocab = workdir_vocab(config, workdir, lambda: train_files)
    field = "data.train_files" if config.data.train_files else "data.builtin"

    def shard(files, files_field):
        return functools.partial(_text_shard, files=files, vocab=vocab, field=files_field)

    train = shard(train_files, field) if need_train else None
    evaluation = shard(eval_files, "data.eval_files") if need_eval and eval_files else None
    return vocab, train, evaluation


def _text_shard(shard_index, shard_count, *, files, vocab, field):
    return text_shard_documents(
        files, vocab, shard_index=shard_index, shard_count=shard_count, field=field
    )


def _prepared_documents(config, workdir, need_train, need_eval):
    from mlm.data.prepared import load_prepared, prepared_documents

    corpus = load_prepared(config.data.prepared_dir)
    if config.data.vocab_file:
        raise ConfigError(
            "data.vocab_file is set but data.prepared_dir brings its own vocab.txt; clear "
            "data.vocab_file (the ids in the prepared files were made with the prepared vocab)"
        )
    if bool(corpus.lowercase) != bool(config.data.lowercase):
        raise ConfigError(
            f"data.prepared_dir was tokenized with lowercase={corpus.lowercase} but "
            f"data.lowercase is {config.data.lowercase}; set --config.data.lowercase="
            f"{corpus.lowercase}"
        )
    vocab = workdir_vocab(config, workdir, list, copy_from=corpus.vocab_path)
    size = config.model.vocab_size
    train = prepared_documents(corpus, "train", size) if need_train else None
    evaluation = None
    if need_eval and "eval" in corpus.splits:
        evaluation = prepared_documents(corpus, "eval", size)
    return vocab, train, evaluation


def _require_module(module: str, field: str) -> None:
    """Raises ConfigError naming the install command when an optional reader is missing."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{field} needs {module}, which is not installed; pip install 'mlm[tf]' "
            "(tensorflow-cpu and tensorflow-datasets, used for reading only)"
        )


def _tfds_documents(config, workdir, need_train, need_eval):
    _require_module("tensorflow_datasets", "data.tfds_name")
    from mlm.data.tfds_source import tfds_documents, write_vocab_sample

    data = config.data
    where = dict(data_dir=data.tfds_data_dir or None, text_field=data.text_field)

    def sample() -> list[str]:  # The documents a vocab is trained on, when one is.
        sample_path = os.path.join(workdir, "vocab_sample.txt")
        write_vocab_sample(
            data.tfds_name,
            data.tfds_split,
            out_path=sample_path,
            max_documents=VOCAB_SAMPLE_DOCUMENTS,
            **where,
        )
        return [sample_path]

    vocab = workdir_vocab(config, workdir, sample)
    train = (
        tfds_documents(data.tfds_name, data.tfds_split, vocab=vocab, **where)
        if need_train
        else None
    )
    evaluation = None
    if need_eval and data.tfds_eval_split:
        evaluation = tfds_documents(data.tfds_name, data.tfds_eval_split, vocab=vocab, **where)
    return vocab, train, evaluation


def _hf_documents(config, workdir, need_train, need_eval):
    from mlm.data.hf_source import hf_documents, write_vocab_sample

    data = config.data

    def sample() -> list[str]:  # The documents a vocab is trained on, when one is.
        sample_path = os.path.join(workdir, "vocab_sample.txt")
        write_vocab_sample(
            data.hf_dataset,
            data.hf_split,
            text_field=data.text_field,
            out_path=sample_path,
            max_documents=VOCAB_SAMPLE_DOCUMENTS,
        )
        return [sample_path]

    def documents(split_field: str) -> grain.MapDataset:
        return hf_documents(
            data.hf_dataset,
            data[split_field],
            text_field=data.text_field,
            split_field=f"data.{split_field}",
            vocab=vocab,
        )

    vocab = workdir_vocab(config, workdir, sample)
    train = documents("hf_split") if need_train else None
    evaluation = documents("hf_eval_split") if need_eval and data.hf_eval_split else None
    return vocab, train, evaluation


def _record_inputs(config, workdir, need_train, need_eval, shards: InputShards) -> Inputs:
    """Model Garden / BERT pretraining TFRecords: rows masked already, batched as they are."""
    _require_module("tensorflow", "data.tfrecord_files")
    from mlm.data.pretraining_records import check_records_match, inspect_records, record_rows
    from mlm.data.tfrecord_source import TFRecordDataSource

    data = config.data
    vocab = workdir_vocab(config, workdir, list) if data.vocab_file else None
    head_labels = heads.record_labels(config.model.cls_heads)

    def rows(field: str):
        source = TFRecordDataSource(expand_globs(data[field], f"data.{field}"))
        check_records_match(
            inspect_records(source),
            seq_length=data.seq_length,
            max_predictions=data.max_predictions_per_seq,
            files_desc=f"data.{field}",
            use_next_sentence_label=data.use_next_sentence_label,
            use_position_id=data.use_position_id,
            labels=[feature for feature, _ in head_labels],
        )
        return record_rows(
            source,
            seq_length=data.seq_length,
            max_predictions=data.max_predictions_per_seq,
            vocab_size=config.model.vocab_size,
            max_positions=(config.model.max_position_embeddings if data.use_position_id else None),
            labels=head_labels,
        )

    train = None
    if need_train:
        train_rows = rows("tfrecord_files")
        train = shards.combine(
            lambda **part: build_row_dataset(train_rows, train=True, seed=config.train.seed, **part)
        )
    evaluation = None
    if need_eval and data.eval_tfrecord_files:
        eval_rows = rows("eval_tfrecord_files")
        evaluation = shards.combine(
            lambda **part: build_row_dataset(eval_rows, train=False, seed=config.train.seed, **part)
        )
    return Inputs(train=train, eval=evaluation, vocab=vocab, source="data.tfrecord_files")


def _synthetic_inputs(config, need_train, need_eval, shards: InputShards) -> Inputs:
    """`data.synthetic`: random batches of the configured shapes, no vocab, nothing read."""

    def dataset(train: bool):
        return shards.combine(lambda **part: synthetic_dataset(config, train=train, **part))

    return Inputs(
        train=dataset(True) if need_train else None,
        eval=dataset(False) if need_eval else None,
        vocab=None,
        source="data.synthetic",
    )
