"""BERT pretraining TFRecords (google-research/bert, TF Model Garden): write, inspect, read.

Each record is a serialized `tf.train.Example` with int64 features `input_ids` [S], `input_mask`
[S], `segment_ids` [S], `masked_lm_positions` [P], `masked_lm_ids` [P], `next_sentence_labels`
[1] and the float feature `masked_lm_weights` [P]; padding holds 0. Model Garden's
`--use_v2_feature_names` renames `input_ids` to `input_word_ids` and `segment_ids` to
`input_type_ids`; both spellings are read, and records without `next_sentence_labels` read as
label 0. `record_rows` turns a `TFRecordDataSource` into a grain `MapDataset` of batch rows, so
grain can shuffle, shard and resume over the records.

TensorFlow (for the `Example` proto and `TFRecordWriter`) is imported only inside the functions
that need it: importing it takes seconds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from mlm.data.tfrecord_source import TFRecordDataSource
from mlm.errors import ConfigError, DataError

# Canonical (original BERT) feature names, with Model Garden's v2 spelling where it differs.
WORD_IDS, TYPE_IDS, INPUT_MASK = "input_ids", "segment_ids", "input_mask"
POSITIONS, MASKED_IDS, WEIGHTS = "masked_lm_positions", "masked_lm_ids", "masked_lm_weights"
NSP_LABELS = "next_sentence_labels"
POSITION_IDS = "position_ids"  # Optional; read with data.use_position_id (Model Garden's name).
V2_NAMES = {WORD_IDS: "input_word_ids", TYPE_IDS: "input_type_ids"}
_SEQUENCE_FEATURES = (WORD_IDS, INPUT_MASK, TYPE_IDS)
_PREDICTION_FEATURES = (POSITIONS, MASKED_IDS, WEIGHTS)
_NOT_BERT = "is not a BERT pretraining TFRecord (a tf.train.Example from create_pretraining_data)"


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """The shapes and names of a set of pretraining TFRecord files.

    Attributes:
      seq_length: S, the length of `input_ids`.
      max_predictions: P, the length of `masked_lm_positions`.
      v2_feature_names: the records use `input_word_ids` / `input_type_ids`.
      has_next_sentence_labels: the records hold `next_sentence_labels`.
      feature_names: the features of the first record, sorted.
    """

    seq_length: int
    max_predictions: int
    v2_feature_names: bool
    has_next_sentence_labels: bool
    feature_names: tuple[str, ...]


# ------------------------------------------------------------------------------ the proto


def _example_proto() -> Any:
    """Returns the `tf.train.Example` class (imports TensorFlow on first use)."""
    from tensorflow.core.example import example_pb2

    return example_pb2.Example


def serialize_example(
    row: Mapping[str, Any],
    *,
    v2_feature_names: bool = False,
    position_ids: bool = False,
    labels: Sequence[str] = (),
) -> bytes:
    """Serializes one instance as a BERT pretraining `tf.train.Example`.

    Args:
      row: a batch row (`input_word_ids`, `input_mask`, `input_type_ids`, `masked_lm_positions`,
        `masked_lm_ids`, `masked_lm_weights`, optional `next_sentence_labels`); the original
        names `input_ids` / `segment_ids` are accepted too. Other keys are ignored.
      v2_feature_names: write `input_word_ids` / `input_type_ids` instead of `input_ids` /
        `segment_ids`.
      position_ids: also write the row's `position_ids` (read with data.use_position_id).
      labels: row keys written as one int64 each, e.g. `NAME_labels` of a classification
        head (`model.cls_heads`).

    Returns:
      The serialized proto (map keys sorted, so equal rows give equal bytes).
    """
    example = _example_proto()()
    features = example.features.feature
    for name, aliases in (
        (WORD_IDS, ("input_word_ids", WORD_IDS)),
        (INPUT_MASK, (INPUT_MASK,)),
        (TYPE_IDS, ("input_type_ids", TYPE_IDS)),
        (POSITIONS, (POSITIONS,)),
        (MASKED_IDS, (MASKED_IDS,)),
        (NSP_LABELS, (NSP_LABELS,)),
    ):
        value = next((row[alias] for alias in aliases if alias in row), None)
        if value is None:
            if name == NSP_LABELS:
                continue
            raise KeyError(f"row has none of {aliases}")
        key = V2_NAMES.get(name, name) if v2_feature_names else name
        features[key].int64_list.value.extend(np.asarray(value, np.int64).reshape(-1).tolist())
    if position_ids:
        values = np.asarray(row[POSITION_IDS], np.int64).reshape(-1).tolist()
        features[POSITION_IDS].int64_list.value.extend(values)
    for name in labels:
        features[name].int64_list.value.append(int(np.asarray(row[name])))
    weights = np.asarray(row[WEIGHTS], np.float32).reshape(-1).tolist()
    features[WEIGHTS].float_list.value.extend(weights)
    return example.SerializeToString(deterministic=True)


class _BadRecordError(ValueError):
    """A record is not what it should be; the message lacks the record's location."""


def _decode_features(data: bytes) -> dict[str, np.ndarray]:
    """Returns every feature of a serialized Example as an array, under the record's names."""
    from google.protobuf.message import DecodeError

    try:
        example = _example_proto().FromString(data)
    except DecodeError:
        raise _BadRecordError(f"cannot be parsed as tf.train.Example; {_NOT_BERT}") from None
    features = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "int64_list":
            features[name] = np.asarray(feature.int64_list.value, np.int64)
        elif kind == "float_list":
            features[name] = np.asarray(feature.float_list.value, np.float32)
        else:
            features[name] = np.asarray(feature.bytes_list.value if kind else [], object)
    return features


def _canonical(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames v2 features to the original names, checks presence, kinds and lengths."""
    result = {}
    for name in (*_SEQUENCE_FEATURES, *_PREDICTION_FEATURES):
        spellings = [name, V2_NAMES[name]] if name in V2_NAMES else [name]
        found = next((features[s] for s in spellings if s in features), None)
        if found is None:
            present = ", ".join(sorted(features)) or "none"
            raise _BadRecordError(
                f"has no {' / '.join(spellings)} feature (features: {present}); "
                f"the file {_NOT_BERT}"
            )
        expected = np.float32 if name == WEIGHTS else np.int64
        if found.dtype != expected:
            raise _BadRecordError(
                f"feature {name} holds {found.dtype} values, not "
                f"{np.dtype(expected).name}; the file {_NOT_BERT}"
            )
        result[name] = found
    labels = features.get(NSP_LABELS, np.zeros(1, np.int64))
    if labels.dtype != np.int64 or labels.shape != (1,):
        raise _BadRecordError(
            f"next_sentence_labels must be one int64, got {labels.shape[0]} "
            f"{labels.dtype} values; the file {_NOT_BERT}"
        )
    result[NSP_LABELS] = labels
    for group in (_SEQUENCE_FEATURES, _PREDICTION_FEATURES):
        lengths = {name: len(result[name]) for name in group}
        if len(set(lengths.values())) > 1:
            described = ", ".join(f"{name} {length}" for name, length in lengths.items())
            raise _BadRecordError(
                f"features of one record differ in length ({described}); the file {_NOT_BERT}"
            )
    return result


def parse_example(data: bytes, *, where: str = "record") -> dict[str, np.ndarray]:
    """Parses one BERT pretraining record, with either feature spelling.

    Args:
      data: a serialized `tf.train.Example`.
      where: what the record is, for error messages (e.g. "FILE record 3").

    Returns:
      int64 `input_ids`, `input_mask`, `segment_ids` [S], `masked_lm_positions`,
      `masked_lm_ids` [P], `next_sentence_labels` [1] (0 when the record has none) and float32
      `masked_lm_weights` [P].

    Raises:
      DataError: the bytes are not such a record.
    """
    try:
        return _canonical(_decode_features(data))
    except _BadRecordError as error:
        raise DataError(f"{where}: {error}") from None


# ---------------------------------------------------------------------------- inspection


def _spec_of(data: bytes, where: str) -> RecordSpec:
    try:
        features = _decode_features(data)
        record = _canonical(features)
    except _BadRecordError as error:
        raise DataError(f"{where}: {error}") from None
    return RecordSpec(
        seq_length=len(record[WORD_IDS]),
        max_predictions=len(record[POSITIONS]),
        v2_feature_names=V2_NAMES[WORD_IDS] in features,
        has_next_sentence_labels=NSP_LABELS in features,
        feature_names=tuple(sorted(features)),
    )


def inspect_records(source: TFRecordDataSource) -> RecordSpec:
    """Reads the first record of every file and checks that all files agree.

    Args:
      source: the files.

    Returns:
      The spec of the files (feature names from the first non-empty file).

    Raises:
      DataError: no file holds a record, a first record is not a BERT pretraining record, or
        two files differ in seq_length, max_predictions or the presence of
        next_sentence_labels.
    """
    spec, spec_path = None, ""
    first_index = 0
    for path, count in zip(source.paths, source.records_per_file(), strict=True):
        if count:
            file_spec = _spec_of(source[first_index], f"{path} record 0")
            if spec is None:
                spec, spec_path = file_spec, path
            else:
                _check_files_agree(spec, spec_path, file_spec, path)
        first_index += count
    if spec is None:
        raise DataError(
            f"{', '.join(source.paths)}: hold no records; point the glob at files written by "
            "create_pretraining_data"
        )
    return spec


def _check_files_agree(spec: RecordSpec, path: str, other: RecordSpec, other_path: str) -> None:
    for field in ("seq_length", "max_predictions", "has_next_sentence_labels"):
        value, other_value = getattr(spec, field), getattr(other, field)
        if value != other_value:
            raise DataError(
                f"{path} has {field} {value} but {other_path} has {other_value}; "
                "use files made with the same create_pretraining_data options"
            )


def check_records_match(
    spec: RecordSpec,
    *,
    seq_length: int,
    max_predictions: int,
    files_desc: str,
    use_next_sentence_label: bool | None = None,
    use_position_id: bool = False,
    labels: Sequence[str] = (),
) -> None:
    """Checks that records fit the configured shapes.

    Args:
      spec: from `inspect_records`.
      seq_length: data.seq_length.
      max_predictions: data.max_predictions_per_seq.
      files_desc: what the files are, leading the message (e.g. "data.tfrecord_files").
      use_next_sentence_label: data.use_next_sentence_label; when True the records must hold
        next_sentence_labels. None skips that check.
      use_position_id: data.use_position_id; when True the records must hold position_ids.
      labels: label features the records must hold (`NAME_labels` of `model.cls_heads`).

    Raises:
      ConfigError: a one-line message naming both values and the fix.
    """
    if spec.seq_length != seq_length:
        raise ConfigError(
            f"{files_desc}: the records have seq_length {spec.seq_length} but data.seq_length "
            f"is {seq_length}; set --config.data.seq_length={spec.seq_length} (and "
            f"--config.data.max_predictions_per_seq={spec.max_predictions}) or use records "
            f"made for {seq_length}"
        )
    if spec.max_predictions != max_predictions:
        raise ConfigError(
            f"{files_desc}: the records have max_predictions_per_seq {spec.max_predictions} "
            f"but data.max_predictions_per_seq is {max_predictions}; set "
            f"--config.data.max_predictions_per_seq={spec.max_predictions} or use records made "
            f"with --max_predictions_per_seq={max_predictions}"
        )
    if use_next_sentence_label and not spec.has_next_sentence_labels:
        raise ConfigError(
            f"{files_desc}: the records have no next_sentence_labels but "
            "data.use_next_sentence_label is True; set "
            "--config.data.use_next_sentence_label=False or use records with NSP labels"
        )
    if use_position_id and POSITION_IDS not in spec.feature_names:
        raise ConfigError(
            f"{files_desc}: the records have no position_ids feature but "
            "data.use_position_id is True; set --config.data.use_position_id=False (positions "
            "0..S-1) or use records that carry position_ids"
        )
    for name in labels:
        if name not in spec.feature_names:
            raise ConfigError(
                f"{files_desc}: the records have no {name} feature, which model.cls_heads "
                f"head '{name[: -len('_labels')]}' trains on; write it into the records or drop "
                "the head"
            )


# ------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _RecordToRow:
    """Turns (index, serialized record) into a batch row; picklable for grain workers."""

    paths: tuple[str, ...]
    starts: tuple[int, ...]  # Index of each file's first record.
    seq_length: int
    max_predictions: int
    vocab_size: int
    max_positions: int | None = None  # Read the records' position_ids, each below this.
    labels: tuple[tuple[str, int], ...] = ()  # (feature, num_classes) of model.cls_heads.

    def where(self, index: int) -> str:
        file_index = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.paths[file_index]} record {index - self.starts[file_index]}"

    def __call__(self, index: int, data: bytes) -> dict[str, np.ndarray]:
        try:
            features = _decode_features(data)
            record = _canonical(features)
            self._check(record)
            positions = self._positions(features)
            head_labels = {
                name: self._label(features, name, num_classes) for name, num_classes in self.labels
            }
        except _BadRecordError as error:
            raise DataError(f"{self.where(index)}: {error}") from None
        input_mask = record[INPUT_MASK].astype(np.int32)
        return {
            "input_word_ids": record[WORD_IDS].astype(np.int32),
            "input_mask": input_mask,
            "input_type_ids": record[TYPE_IDS].astype(np.int32),
            "packed_segment_ids": input_mask.copy(),
            "position_ids": positions,
            "masked_lm_positions": record[POSITIONS].astype(np.int32),
            "masked_lm_ids": record[MASKED_IDS].astype(np.int32),
            "masked_lm_weights": record[WEIGHTS],
            "next_sentence_labels": np.int32(record[NSP_LABELS][0]),
            **head_labels,
        }

    @staticmethod
    def _label(features: dict[str, np.ndarray], name: str, num_classes: int) -> np.int32:
        """A classification head's label: one int64 in [0, num_classes)."""
        value = features.get(name)
        if value is None or value.dtype != np.int64 or value.shape != (1,):
            got = "none" if value is None else f"{len(value)} {value.dtype} values"
            raise _BadRecordError(
                f"model.cls_heads needs one int64 {name}, got {got}; write it into every record"
            )
        if not 0 <= value[0] < num_classes:
            raise _BadRecordError(
                f"{name} {int(value[0])} is outside [0, num_classes={num_classes}); fix the "
                "records or the head's num_classes"
            )
        return np.int32(value[0])

    def _positions(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """The row's position ids: the record's (data.use_position_id), else 0..S-1."""
        if self.max_positions is None:
            return np.arange(self.seq_length, dtype=np.int32)
        positions = features.get(POSITION_IDS)
        if positions is None or positions.dtype != np.int64 or len(positions) != self.seq_length:
            got = "none" if positions is None else f"{len(positions)} {positions.dtype} values"
            raise _BadRecordError(
                f"data.use_position_id needs {self.seq_length} int64 position_ids, got {got}; "
                "write position_ids into every record or set data.use_position_id=False"
            )
        if positions.size and (positions.min() < 0 or positions.max() >= self.max_positions):
            raise _BadRecordError(
                f"position id {int(positions.max() if positions.min() >= 0 else positions.min())}"
                f" is outside [0, model.max_position_embeddings={self.max_positions}); raise "
                "model.max_position_embeddings or fix the records"
            )
        return positions.astype(np.int32)

    def _check(self, record: dict[str, np.ndarray]) -> None:
        seq_length, max_predictions = len(record[WORD_IDS]), len(record[POSITIONS])
        if (seq_length, max_predictions) != (self.seq_length, self.max_predictions):
            raise _BadRecordError(
                f"has seq_length {seq_length} and max_predictions "
                f"{max_predictions}, but data.seq_length is {self.seq_length} and "
                f"data.max_predictions_per_seq {self.max_predictions}; the files mix records "
                "of different shapes: use files made with one --max_seq_length"
            )
        for name in (WORD_IDS, MASKED_IDS):
            ids = record[name]
            if ids.size and ids.max() >= self.vocab_size:
                raise _BadRecordError(
                    f"token id {int(ids.max())} >= model.vocab_size "
                    f"{self.vocab_size}; the records were made with a bigger vocab: set "
                    "--config.model.vocab_size / data.vocab_file to the vocab used to create them"
                )
            if ids.size and ids.min() < 0:
                raise _BadRecordError(
                    f"negative token id {int(ids.min())} in {name}; the file {_NOT_BERT}"
                )
        positions = record[POSITIONS]
        if positions.size and (positions.min() < 0 or positions.max() >= seq_length):
            raise _BadRecordError(
                f"masked_lm_positions {positions.tolist()} fall outside "
                f"[0, {seq_length}); the file {_NOT_BERT}"
            )


def record_rows(
    source: TFRecordDataSource,
    *,
    seq_length: int,
    max_predictions: int,
    vocab_size: int,
    max_positions: int | None = None,
    labels: Sequence[tuple[str, int]] = (),
) -> grain.MapDataset:
    """Reads BERT pretraining records as batch rows.

    Args:
      source: the TFRecord files.
      seq_length: S, which every record must have (data.seq_length).
      max_predictions: P, which every record must have (data.max_predictions_per_seq).
      vocab_size: model.vocab_size; every id of input_ids and masked_lm_ids must be below it.
      max_positions: with data.use_position_id, model.max_position_embeddings: the records'
        own `position_ids` are read, and each must be below it. None: positions 0..S-1.
      labels: (feature, num_classes) of the `model.cls_heads` heads other than next_sentence
        (`mlm.heads.record_labels`): each record's one int64 label, read as an int32 scalar.

    Returns:
      A `grain.MapDataset` with one row per record: int32 `input_word_ids`, `input_mask`,
      `input_type_ids`, `packed_segment_ids` (= input_mask), `position_ids` [S],
      int32 `masked_lm_positions`, `masked_lm_ids` and float32 `masked_lm_weights` [P], int32
      scalar `next_sentence_labels`. Reading a bad record raises DataError naming its file and
      number.
    """
    starts = np.cumsum([0, *source.records_per_file()])[:-1]
    to_row = _RecordToRow(
        paths=tuple(source.paths),
        starts=tuple(int(start) for start in starts),
        seq_length=seq_length,
        max_predictions=max_predictions,
        vocab_size=vocab_size,
        max_positions=max_positions,
        labels=tuple(labels),
    )
    return grain.MapDataset.source(source).map_with_index(to_row)


# ------------------------------------------------------------------------------- writing


class RecordWriter:
    """Writes serialized records to `path + '.tmp'`; `commit` renames it to `path`.

    Use as a context manager: leaving the block by an exception deletes the temporary file.
    """

    def __init__(self, path: str):
        """Opens `path + '.tmp'` (creating the directory).

        Args:
          path: the final file.
        """
        import tensorflow as tf

        self.path = path
        self.temporary_path = path + ".tmp"
        self.count = 0
        self._committed = False
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._writer = tf.io.TFRecordWriter(self.temporary_path)
        except (OSError, tf.errors.OpError) as error:
            raise DataError(
                f"{path}: cannot write ({getattr(error, 'message', None) or error}); "
                "choose a writable output path"
            ) from None

    def write(self, record: bytes) -> None:
        """Appends one serialized record."""
        self._writer.write(record)
        self.count += 1

    def commit(self) -> None:
        """Closes the file and moves it to its final path."""
        self._writer.close()
        os.replace(self.temporary_path, self.path)
        self._committed = True

    def discard(self) -> None:
        """Closes and deletes the temporary file (nothing once committed)."""
        if self._committed:
            return
        self._writer.close()
        if os.path.exists(self.temporary_path):
            os.remove(self.temporary_path)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.discard()


def write_records(
    path: str,
    rows: Iterable[Mapping[str, Any]],
    *,
    v2_feature_names: bool = False,
    position_ids: bool = False,
    labels: Sequence[str] = (),
) -> int:
    """Writes rows as BERT pretraining records, atomically (via `path + '.tmp'`).

    Args:
      path: the TFRecord file to write.
      rows: batch rows (see `serialize_example`).
      v2_feature_names: use Model Garden's v2 feature names.
      position_ids: also write each row's `position_ids`.
      labels: row keys written as one int64 each (`serialize_example`).

    Returns:
      The number of records written.
    """
    with RecordWriter(path) as writer:
        for row in rows:
            writer.write(
                serialize_example(
                    row, v2_feature_names=v2_feature_names, position_ids=position_ids, labels=labels
                )
            )
        writer.commit()
    return writer.count
