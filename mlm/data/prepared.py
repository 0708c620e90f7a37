"""Corpora tokenized once by `python -m mlm.data.prepare`: the record format and the reader.

A prepared directory holds ``vocab.txt``, the ArrayRecord shards of each split
(``train-00000.array_record``, ..., ``eval-00000.array_record``, ...) and ``metadata.json``,
written last: a directory without it is an unfinished preparation.

Record format ``mlm.prepared`` version 1: one ArrayRecord record per document (ArrayRecord
``group_size:1``, so every record is read on its own; records in shard order are the documents
in input order), all integers little-endian::

    uint32  n                number of sentences (>= 1)
    uint32  lengths[n]       tokens per sentence (each >= 1)
    ids[sum(lengths)]        WordPiece ids without special tokens, of the corpus's
                             ``token_dtype``: uint16 when the vocab has at most 65536 tokens,
                             else int32

`prepared_documents` turns a split back into a `grain.MapDataset` of documents (lists of int32
arrays, one per sentence), the shape `mlm.data.pipeline` consumes.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, SupportsIndex

import numpy as np

from mlm.errors import DataError

if TYPE_CHECKING:
    import grain

FORMAT_NAME = "mlm.prepared"
FORMAT_VERSION = 1
METADATA_FILENAME = "metadata.json"
VOCAB_FILENAME = "vocab.txt"
SHARD_SUFFIX = ".array_record"
# One record per group, so a random read decompresses one document only (what grain expects).
WRITER_OPTIONS = "group_size:1"
_UINT32 = np.dtype("<u4")
_PREPARE_HINT = "run python -m mlm.data.prepare --input GLOB --output DIR"


def shard_filename(split: str, index: int) -> str:
    """Returns the file name of a split's shard, e.g. ``train-00003.array_record``."""
    return f"{split}-{index:05d}{SHARD_SUFFIX}"


def token_dtype(vocab_size: int) -> np.dtype:
    """Returns the stored dtype of token ids: uint16 when every id fits, else int32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def encode_document(sentences: Sequence[np.ndarray], dtype: np.dtype) -> bytes:
    """Serializes one document into a record (see the module docstring).

    Args:
      sentences: the document's non-empty sentences, integer token ids.
      dtype: the corpus's token dtype (`token_dtype`).

    Returns:
      The record.
    """
    lengths = np.asarray([len(sentence) for sentence in sentences], _UINT32)
    header = np.concatenate([np.asarray([len(lengths)], _UINT32), lengths])
    ids = np.concatenate(sentences).astype(dtype, copy=False)
    return header.tobytes() + ids.tobytes()


def decode_document(record: bytes, dtype: np.dtype) -> list[np.ndarray]:
    """Parses a record back into a document.

    Args:
      record: bytes written by `encode_document`.
      dtype: the corpus's token dtype.

    Returns:
      One int32 array per sentence.

    Raises:
      ValueError: the record is malformed (says how).
    """
    ids, lengths = _parse_record(record, dtype)
    return _split_sentences(ids, lengths)


def _parse_record(record: bytes, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Returns (int32 ids, uint32 sentence lengths) of a record; ValueError if malformed."""
    size = len(record)
    if size < _UINT32.itemsize:
        raise ValueError(f"{size} bytes, too short for a header")
    count = int(np.frombuffer(record, _UINT32, count=1)[0])
    ids_start = _UINT32.itemsize * (count + 1)
    if count == 0 or ids_start > size:
        raise ValueError(f"the header claims {count} sentences in {size} bytes")
    lengths = np.frombuffer(record, _UINT32, count=count, offset=_UINT32.itemsize)
    num_ids = int(lengths.sum(dtype=np.int64))
    if not lengths.all() or size - ids_start != num_ids * dtype.itemsize:
        raise ValueError(f"the sentence lengths do not match the {size - ids_start} bytes of ids")
    return np.frombuffer(record, dtype, offset=ids_start).astype(np.int32), lengths


def _split_sentences(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Cuts a document's ids into its sentences."""
    return np.split(ids, np.cumsum(lengths[:-1], dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
    """A finished `mlm.data.prepare` directory.

    Attributes:
      directory: the directory.
      vocab_path: its ``vocab.txt``.
      vocab_size: the number of tokens in the vocab.
      lowercase: whether the text was lowercased (and accents stripped) before tokenization.
      token_dtype: the stored dtype of token ids.
      splits: per split name, its metadata: ``input_files``, ``shards`` (``file``,
        ``num_documents``), ``num_documents``, ``num_sentences``, ``num_tokens``,
        ``input_bytes``.
    """

    directory: str
    vocab_path: str
    vocab_size: int
    lowercase: bool
    token_dtype: np.dtype
    splits: dict[str, dict[str, Any]]


def load_prepared(directory: str) -> PreparedCorpus:
    """Reads and checks the metadata of a prepared directory.

    Args:
      directory: an output directory of `python -m mlm.data.prepare`.

    Returns:
      The PreparedCorpus.

    Raises:
      DataError: no metadata.json (unfinished or not a preparation), another format or version,
        or a listed file (vocab, shard) is missing.
    """
    metadata = _read_metadata(directory)
    try:
        corpus = PreparedCorpus(
            directory=directory,
            vocab_path=os.path.join(directory, VOCAB_FILENAME),
            vocab_size=int(metadata["vocab_size"]),
            lowercase=bool(metadata["lowercase"]),
            token_dtype=np.dtype(metadata["token_dtype"]),
            splits=dict(metadata["splits"]),
        )
        shard_files = [
            shard["file"] for split in corpus.splits.values() for shard in split["shards"]
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(
            f"{directory}/{METADATA_FILENAME}: malformed ({type(error).__name__}: {error}); "
            f"{_PREPARE_HINT} --overwrite"
        ) from None
    for name in (VOCAB_FILENAME, *shard_files):
        if not os.path.isfile(os.path.join(directory, name)):
            raise DataError(
                f"{directory}: {name} listed in {METADATA_FILENAME} is missing; copy the whole "
                f"directory or {_PREPARE_HINT} --overwrite"
            )
    return corpus


def _read_metadata(directory: str) -> dict[str, Any]:
    """Reads metadata.json; DataError if it is missing, unreadable or of another format."""
    path = os.path.join(directory, METADATA_FILENAME)
    if not os.path.isfile(path):
        raise DataError(
            f"{directory}: no {METADATA_FILENAME}, so not a finished mlm.data.prepare output; "
            f"{_PREPARE_HINT} (again, with --overwrite, if it was interrupted)"
        )
    try:
        with open(path, encoding="utf-8") as file:
            metadata = json.load(file)
        found = (metadata.get("format"), metadata.get("format_version"))
    except (OSError, ValueError, AttributeError) as error:
        raise DataError(f"{path}: unreadable ({error}); {_PREPARE_HINT} --overwrite") from None
    if found != (FORMAT_NAME, FORMAT_VERSION):
        raise DataError(
            f"{path}: format {found[0]!r} version {found[1]!r}, but this mlm reads "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}; {_PREPARE_HINT} --overwrite with this mlm"
        )
    return metadata


def split_num_tokens(corpus: PreparedCorpus, split: str) -> int:
    """Returns the number of tokens (special tokens excluded) of a split, from the metadata."""
    return int(_split(corpus, split)["num_tokens"])


def prepared_documents(corpus: PreparedCorpus, split: str, vocab_size: int) -> grain.MapDataset:
    """The documents of a split, in input order, as a random-access grain dataset.

    Args:
      corpus: from `load_prepared`.
      split: ``"train"`` or ``"eval"`` (the splits the directory has).
      vocab_size: the model's ``model.vocab_size``; every id must be below it.

    Returns:
      A `grain.MapDataset` whose elements are documents: lists of int32 arrays, one per
      sentence. Reading an element raises DataError for an unreadable or corrupt record or an
      id >= vocab_size.
    """
    import grain  # here, not at the top: `mlm.data.prepare` workers import this module

    shards = _split(corpus, split)["shards"]
    source = _ShardSource(
        [os.path.join(corpus.directory, shard["file"]) for shard in shards],
        [int(shard["num_documents"]) for shard in shards],
    )
    decoder = _Decoder(source, corpus, split, vocab_size)
    return grain.MapDataset.source(source).map_with_index(decoder)


def _split(corpus: PreparedCorpus, split: str) -> dict[str, Any]:
    """Returns a split's metadata, or raises DataError listing the splits there are."""
    if split not in corpus.splits:
        raise DataError(
            f"{corpus.directory}: has no {split!r} split, only {sorted(corpus.splits)}; prepare "
            f"it (python -m mlm.data.prepare --eval_input GLOB for 'eval') or use another split"
        )
    return corpus.splits[split]


class _ShardSource:
    """The records of a split's shards; read errors become DataErrors naming shard and record.

    Wraps `grain.sources.ArrayRecordDataSource`, opened lazily with the record counts of the
    metadata (``path[0:n]``), so building it touches no file.
    """

    def __init__(self, paths: list[str], counts: list[int]):
        import grain

        self.paths = paths
        self._ends = list(itertools.accumulate(counts))
        self._source = grain.sources.ArrayRecordDataSource(
            [f"{path}[0:{count}]" for path, count in zip(paths, counts, strict=True) if count]
        )

    def __len__(self) -> int:
        return len(self._source)

    def locate(self, index: int) -> tuple[str, int]:
        """Returns (shard path, record number within it) of a record index."""
        shard = bisect.bisect_right(self._ends, index)
        return self.paths[shard], index - (self._ends[shard - 1] if shard else 0)

    def __getitem__(self, index: SupportsIndex) -> bytes:
        try:
            return self._source[index]
        except RuntimeError as error:  # what riegeli raises for damaged or truncated files
            path, position = self.locate(index.__index__())
            raise DataError(
                f"{path}: record {position} cannot be read ({str(error).splitlines()[0]}); the "
                f"shard is damaged: copy it again or {_PREPARE_HINT} --overwrite"
            ) from None

    def __repr__(self) -> str:
        return f"_ShardSource({len(self.paths)} shards, {len(self)} records)"


@dataclasses.dataclass(frozen=True)
class _Decoder:
    """Decodes record ``index`` of a split and checks its ids against the model's vocab size."""

    source: _ShardSource
    corpus: PreparedCorpus
    split: str
    vocab_size: int

    def __call__(self, index: int, record: bytes) -> list[np.ndarray]:
        try:
            ids, lengths = _parse_record(record, self.corpus.token_dtype)
        except ValueError as error:
            path, position = self.source.locate(index)
            raise DataError(
                f"{path}: record {position} is corrupt ({error}); copy the shard again or "
                f"{_PREPARE_HINT} --overwrite"
            ) from None
        largest = int(ids.max())
        if largest >= self.vocab_size:
            raise DataError(
                f"{self.corpus.directory}: {self.split} document {index} holds token id "
                f"{largest}, not below model.vocab_size={self.vocab_size}; set model.vocab_size to "
                f"at least {self.corpus.vocab_size} (the size of its {VOCAB_FILENAME}) or prepare "
                "the corpus with a smaller vocab"
            )
        return _split_sentences(ids, lengths)
