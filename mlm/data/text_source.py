"""Documents of text files, read lazily: each input shard scans and tokenizes only its bytes.

The text files of a split, taken in order, are one stream of bytes. Input shard ``i`` of ``k``
owns the documents that start in the ``i``-th ``k``-th of those bytes, with the cut points moved
forward to document boundaries (`mlm.data.corpus.document_boundary`), so the shards partition
the documents. Opening a shard reads only its own bytes once, to find where each document starts
(an array of file offsets: 12 bytes per document); after that, a document is read from its file
and tokenized only when the pipeline asks for it. Memory therefore does not grow with the corpus
beyond those offsets, and every host of a multi-host run reads and tokenizes only its share.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import grain
import numpy as np

from mlm.data.corpus import document_boundary, iter_file_documents, iter_located_documents
from mlm.data.instances import Document
from mlm.data.tokenizer import Vocab, encode_sentences
from mlm.errors import DataError


@dataclasses.dataclass(frozen=True)
class ByteRange:
    """A byte range of one text file whose ends are document boundaries.

    Attributes:
      path: the file.
      start: first byte.
      end: one past the last byte.
      whole_file: whether the range is the whole file.
    """

    path: str
    start: int
    end: int
    whole_file: bool


def shard_ranges(files: Sequence[str], shard_index: int, shard_count: int) -> list[ByteRange]:
    """Returns the byte ranges of input shard ``shard_index`` of ``shard_count``.

    Args:
      files: the split's text files, in order.
      shard_index: the shard.
      shard_count: how many shards share the files.

    Returns:
      The shard's non-empty ranges, in file order; the ranges of all shards partition the files
      at document boundaries.
    """
    sizes = [_file_size(path) for path in files]
    for path, size in zip(files, sizes, strict=True):
        if not size:
            raise DataError(
                f"{path}: holds no sentences; write one sentence per line with a blank line "
                "between documents"
            )
    total = sum(sizes)
    low = _boundary(files, sizes, total * shard_index // shard_count)
    high = _boundary(files, sizes, total * (shard_index + 1) // shard_count)
    ranges = []
    for number, (path, size) in enumerate(zip(files, sizes, strict=True)):
        start = low[1] if number == low[0] else (0 if number > low[0] else size)
        end = high[1] if number == high[0] else (size if number < high[0] else 0)
        if start < end:
            ranges.append(ByteRange(path, start, end, whole_file=start == 0 and end == size))
    return ranges


def _boundary(files: Sequence[str], sizes: Sequence[int], offset: int) -> tuple[int, int]:
    """The first document boundary at or after a byte of the files' stream: (file, offset)."""
    for number, (path, size) in enumerate(zip(files, sizes, strict=True)):
        if offset < size:
            return number, document_boundary(path, offset)
        offset -= size
    return len(files), 0


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as error:
        raise DataError(
            f"{path}: cannot read ({error.strerror or error}); check the path and its permissions"
        ) from None


class TextDocuments:
    """The documents of some byte ranges, by index: a grain random-access source of sentences.

    Building it reads the ranges once (checking UTF-8) to record where each document starts;
    `__getitem__` reads one document from its file. Picklable (no open files are kept), so it
    also serves grain worker processes.
    """

    def __init__(self, ranges: Sequence[ByteRange]):
        self._paths = [text_range.path for text_range in ranges]
        file_numbers, offsets = [], []
        for number, text_range in enumerate(ranges):
            starts = [
                start
                for start, _ in iter_located_documents(
                    text_range.path, text_range.start, text_range.end
                )
            ]
            if not starts and text_range.whole_file:
                raise DataError(
                    f"{text_range.path}: holds no sentences; write one sentence per line "
                    "with a blank line between documents"
                )
            file_numbers.append(np.full(len(starts), number, np.int32))
            offsets.append(np.asarray(starts, np.int64))
        self._file_numbers = np.concatenate(file_numbers) if ranges else np.zeros(0, np.int32)
        self._offsets = np.concatenate(offsets) if ranges else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> list[str]:
        path = self._paths[self._file_numbers[index]]
        documents = iter_file_documents(path, int(self._offsets[index]))
        try:
            return next(documents)
        finally:
            documents.close()

    def __repr__(self) -> str:
        return f"TextDocuments({len(self._paths)} ranges, {len(self)} documents)"


class _EncodeDocument:
    """Turns a document's sentences into WordPiece ids; a picklable grain map function."""

    def __init__(self, vocab: Vocab):
        self._vocab = vocab

    def __call__(self, sentences: list[str]) -> Document:
        return [ids for ids in encode_sentences(self._vocab, sentences) if ids.size]


def text_shard_documents(
    files: Sequence[str],
    vocab: Vocab,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    field: str = "data.train_files",
) -> grain.MapDataset:
    """The tokenized documents of one input shard of text files, read and tokenized lazily.

    Args:
      files: the split's text files, in order.
      vocab: the vocabulary to tokenize with.
      shard_index: the input shard.
      shard_count: how many input shards share the files.
      field: the config field of the files, for errors.

    Returns:
      A MapDataset of documents (lists of int32 sentence ids; a document whose sentences all
      tokenize to nothing is empty), in file order.

    Raises:
      DataError: a whole file in the shard holds no sentences, a file is not UTF-8, or the shard
        holds no document.
    """
    if not files:
        raise DataError(f"{field}: no text files given; set it to globs of text files")
    source = TextDocuments(shard_ranges(files, shard_index, shard_count))
    if not len(source):
        raise DataError(
            f"{field}: input shard {shard_index} of {shard_count} holds no documents; add more "
            "text or use fewer processes (or data.input_shards)"
        )
    return grain.MapDataset.source(source).map(_EncodeDocument(vocab))
