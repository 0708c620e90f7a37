"""Pretraining documents from a prepared TensorFlow Datasets (TFDS) text dataset, by random access.

A TFDS record is a whole document (a Wikipedia article, a C4 page) stored as a serialized
`tf.train.Example`. The dataset must already be prepared in the data dir (`tfds build NAME
--data_dir DIR`); nothing is downloaded. Records are read by index so grain can shuffle, shard per
host and resume exactly:

- ArrayRecord datasets through TFDS's own random-access source (`builder.as_data_source`);
- TFRecord datasets (the TFDS default) through `mlm.data.tfrecord_source.TFRecordDataSource` over
  the split's shard files (local paths only), honouring TFDS split slicing (`train[:1%]`,
  `train[10:20]`, `train+validation`) via the split's file instructions.

Each record is decoded with the dataset's own feature spec in NumPy (`deserialize_example_np`,
no tf.data); the text field's UTF-8 bytes become a `str`, split into lines and sentences
(`mlm.data.sentences`, any script) and tokenized lazily in a grain `.map`.
`tensorflow_datasets` is imported only inside functions, so importing this module costs nothing
when no TFDS source is configured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mlm.data.sentences import TokenizeText, write_sentence_sample
from mlm.data.tfrecord_source import TFRecordDataSource
from mlm.data.tokenizer import Vocab
from mlm.errors import ConfigError, DataError

DEFAULT_TEXT_FIELD = "text"
_DEFAULT_DATA_DIR = "~/tensorflow_datasets"


# ------------------------------------------------------------------------------------ builder


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (TFDS messages run to many lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _prepared_builder(name: str, data_dir: str | None) -> Any:
    """Returns the TFDS builder of a dataset prepared in `data_dir`; never downloads.

    Raises:
      DataError: the dataset is unknown or not prepared there (with the `tfds build` hint).
      ConfigError: the name has an unknown config or version.
    """
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    where = data_dir or f"the default TFDS data dir ($TFDS_DATA_DIR or {_DEFAULT_DATA_DIR})"
    hint = (
        f"run `tfds build {name} --data_dir {data_dir or _DEFAULT_DATA_DIR}` (or "
        "download_and_prepare) on a machine with network first"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"data.tfds_name: TFDS dataset {name} is not registered and not prepared in {where}; "
            f"{hint}"
        ) from None
    except (ValueError, AssertionError) as error:
        raise ConfigError(
            f"data.tfds_name={name!r}: {_first_line(error)}; fix the config or version "
            "(NAME[/CONFIG][:VERSION])"
        ) from None
    if not builder.is_prepared():
        raise DataError(f"TFDS dataset {name} is not prepared in {where}; {hint}")
    return builder


def _split_info(builder: Any, name: str, split: str) -> Any:
    """Returns the (possibly sliced) split info; ConfigError for an unknown or empty split."""
    splits = ", ".join(sorted(builder.info.splits.keys()))
    try:
        info = builder.info.splits[split]
    except (ValueError, KeyError, AssertionError) as error:
        raise ConfigError(
            f"data.tfds_split={split!r}: {_first_line(error)}; use one of the splits of {name} "
            f"({splits}), optionally sliced like 'train[:1%]'"
        ) from None
    if info.num_examples <= 0:
        raise ConfigError(
            f"data.tfds_split={split!r} selects no examples of {name}; widen the slice "
            f"(splits: {splits})"
        )
    return info


def _text_fields(features: Any) -> list[str]:
    """The names of the top-level scalar string features (TFDS `Text` or string `Tensor`)."""
    import tensorflow_datasets as tfds

    if not isinstance(features, tfds.features.FeaturesDict):
        return []
    return sorted(
        key
        for key, feature in features.items()
        if isinstance(feature, tfds.features.Tensor)
        and feature.shape == ()
        and np.dtype(feature.np_dtype) == np.object_
    )


def _check_text_field(features: Any, name: str, text_field: str) -> None:
    """Raises ConfigError unless `text_field` is a text feature of the dataset."""
    available = _text_fields(features)
    if text_field not in available:
        raise ConfigError(
            f"data.text_field={text_field!r} is not a text feature of TFDS dataset {name}; "
            f"set it to one of: {', '.join(available) or '(none: the dataset has no text)'}"
        )


# ------------------------------------------------------------------------------------ records


class _SlicedRecords:
    """Random access to the serialized examples a TFDS split (slice) selects from TFRecord shards.

    Each TFDS file instruction reads `take` records after `skip` in one shard; instruction `k`
    holds the source's indices `[ends[k-1], ends[k])`. Picklable, like `TFRecordDataSource`.
    """

    def __init__(self, instructions: Sequence[Any], description: str):
        """Indexes the shard files the instructions name.

        Args:
          instructions: TFDS `FileInstruction`s (filename, skip, take, examples_in_shard).
          description: names the dataset and split in error messages.

        Raises:
          DataError: a shard is damaged or holds a different number of records than the
            dataset info says.
        """
        paths = list(dict.fromkeys(instruction.filename for instruction in instructions))
        self._records = TFRecordDataSource(paths)
        counts = dict(zip(paths, self._records.records_per_file(), strict=True))
        file_starts = dict(zip(paths, np.cumsum([0, *counts.values()])[:-1].tolist(), strict=True))
        for instruction in instructions:
            if counts[instruction.filename] != instruction.examples_in_shard:
                raise DataError(
                    f"{instruction.filename}: holds {counts[instruction.filename]} records but "
                    f"the dataset info of {description} says {instruction.examples_in_shard}; "
                    "the shard is incomplete or was replaced: rebuild the dataset"
                )
        self._starts = np.asarray(
            [file_starts[i.filename] + i.skip for i in instructions], np.int64
        )
        self._ends = np.cumsum([i.take for i in instructions], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends.size else 0

    def __getitem__(self, index: int) -> bytes:
        segment = int(np.searchsorted(self._ends, index, side="right"))
        first = int(self._ends[segment - 1]) if segment else 0
        return self._records[int(self._starts[segment]) + index - first]


def _split_records(builder: Any, split: str, split_info: Any, description: str) -> Any:
    """Returns random access to the serialized examples of the split: ArrayRecord or TFRecord."""
    import tensorflow_datasets as tfds

    file_format = tfds.core.file_adapters.FileFormat
    available = builder.info.available_file_formats()
    if file_format.ARRAY_RECORD in available:
        return builder.as_data_source(
            split,
            file_format=file_format.ARRAY_RECORD,
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        )
    if file_format.TFRECORD in available:
        return _SlicedRecords(split_info.file_instructions, description)
    formats = ", ".join(sorted(str(f.value) for f in available)) or "unknown"
    raise DataError(
        f"TFDS dataset {description} is stored as {formats}, which has no random access here; "
        f"convert it with `tfds convert_format --dataset_version_dir {builder.data_dir} "
        "--out_file_format array_record`"
    )


class TFDSTextSource:
    """A grain random-access data source of the texts (str) of one field of a TFDS split.

    Picklable (for grain worker processes) when its record source is.
    """

    def __init__(self, records: Any, features: Any, text_field: str, description: str):
        """Wraps serialized examples.

        Args:
          records: random access (`len`, `[i]`) to serialized `tf.train.Example` bytes.
          features: the dataset's TFDS `FeaturesDict`, used to decode a record in NumPy.
          text_field: the feature holding the document text.
          description: names the dataset and split in error messages and the repr.
        """
        self._records = records
        self._features = features
        self._text_field = text_field
        self._description = description

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range [0, {len(self)}) of {self}")
        example = self._features.deserialize_example_np(self._records[index])
        value = example[self._text_field]
        if isinstance(value, np.ndarray):
            value = value.item()
        if isinstance(value, str):
            return value
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"TFDS dataset {self._description}, example {index}: {self._text_field!r} is not "
                f"valid UTF-8 ({error.reason} at byte {error.start}); fix or rebuild the dataset"
            ) from None

    def __repr__(self) -> str:
        return f"TFDSTextSource({self._description}, {self._text_field!r}, {len(self)} examples)"


def tfds_text_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> TFDSTextSource:
    """Opens the texts of a prepared TFDS dataset for random access.

    Args:
      name: the TFDS name, `NAME[/CONFIG][:VERSION]`, e.g. `wikipedia/20230601.en` or `c4/en`.
      split: a split or TFDS split expression, e.g. `train`, `train[:1%]`, `train+validation`.
      data_dir: the TFDS data dir holding the prepared dataset (None: TFDS's default).
      text_field: the text feature to read (`text` for Wikipedia and C4).

    Returns:
      A grain random-access source: `len()` examples, `source[i]` the i-th text as `str`, in
      TFDS's (hash-shuffled) example order; wrap it with `grain.MapDataset.source`.

    Raises:
      DataError: the dataset is not prepared in `data_dir`, a shard is damaged, or the format
        has no random access.
      ConfigError: unknown config/version, split, or text field.
    """
    builder = _prepared_builder(name, data_dir)
    description = f"{name}[{split}] in {builder.data_dir}"
    _check_text_field(builder.info.features, name, text_field)
    split_info = _split_info(builder, name, split)
    records = _split_records(builder, split, split_info, description)
    return TFDSTextSource(records, builder.info.features, text_field, f"{name} split {split!r}")


def num_examples(name: str, split: str, *, data_dir: str | None = None) -> int:
    """Returns how many examples a split (expression) of a prepared TFDS dataset selects.

    Read from the dataset info; no shard is opened.

    Args:
      name: the TFDS name, see `tfds_text_source`.
      split: a split or split expression.
      data_dir: the TFDS data dir (None: TFDS's default).

    Returns:
      The number of examples.
    """
    return int(_split_info(_prepared_builder(name, data_dir), name, split).num_examples)


# ------------------------------------------------------------------------------------ documents


def tfds_documents(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    vocab: Vocab,
) -> grain.MapDataset:
    """Returns the tokenized documents of a prepared TFDS dataset, tokenized lazily on access.

    Args:
      name, split, data_dir, text_field: see `tfds_text_source`.
      vocab: the WordPiece vocabulary.

    Returns:
      A grain MapDataset whose element `i` is document `i`: one int32 id array per sentence,
      without special tokens; sentences that encode to nothing are dropped, so a document of
      no text is an empty list (the pipeline must skip it).
    """
    source = tfds_text_source(name, split, data_dir=data_dir, text_field=text_field)
    return grain.MapDataset.source(source).map(TokenizeText(vocab))


def write_vocab_sample(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    out_path: str,
    max_documents: int,
) -> str:
    """Writes the first documents of a TFDS split as a text file to train a vocabulary on.

    TFDS stores a split in hash-shuffled order, so the first documents are a random sample.
    The layout is the BERT one (`mlm.data.corpus.read_documents`): one sentence per line and a
    blank line between documents; documents without sentences are skipped. The file is
    written through a temporary file in the same directory and renamed. Documents that did not
    split into sentences (`mlm.data.sentences.SplitStats`) are counted and reported as one
    `warning:` line on stderr.

    Args:
      name, split, data_dir, text_field: see `tfds_text_source`.
      out_path: the text file to write; its directory must exist.
      max_documents: the most documents to write (fewer if the split is smaller).

    Returns:
      `out_path`.

    Raises:
      DataError: the documents hold no sentences.
      WorkdirError: `out_path` cannot be written.
    """
    if max_documents < 1:
        raise ConfigError(f"max_documents={max_documents}: must be at least 1")
    source = tfds_text_source(name, split, data_dir=data_dir, text_field=text_field)
    return write_sentence_sample(
        (source[index] for index in range(min(max_documents, len(source)))),
        out_path,
        source=f"data.tfds_name={name} split {split!r}",
        no_sentences=(
            f"TFDS dataset {name} split {split!r}: the first {max_documents} documents hold "
            f"no sentences in {text_field!r}; check data.text_field"
        ),
    )
