"""Pretraining documents from text files in the BERT pretraining layout.

The layout (the one BERT's ``create_pretraining_data.py`` reads): one sentence per line and a
blank line between documents. ``read_documents`` turns such files into ``list[list[str]]``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence

from mlm.errors import DataError


def expand_globs(
    patterns: str,
    field: str = "data.train_files",
    alternative: str = " or leave it empty for the built-in corpus",
) -> list[str]:
    """Expands comma-separated globs into the sorted list of matching files.

    Args:
      patterns: comma-separated globs, e.g. ``"corpus/*.txt,extra/**/*.txt"``.
      field: the config field or flag the globs come from, named in error messages.
      alternative: appended to the fix the error messages suggest (command-line tools, which
        have no built-in corpus, pass "").

    Returns:
      The sorted, de-duplicated paths of the matching files.
    """
    globs = [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]
    if not globs:
        raise DataError(
            f"{field}: no glob given; set comma-separated globs of text files{alternative}"
        )
    files: set[str] = set()
    for pattern in globs:
        matches = [
            path
            for path in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(path)
        ]
        if not matches:
            raise DataError(f"{field}: no file matches {pattern!r}; check the glob{alternative}")
        files.update(matches)
    return sorted(files)


def read_documents(files: Sequence[str]) -> list[list[str]]:
    """Reads documents in the BERT pretraining layout from text files.

    One sentence per line, a blank line between documents; lines are stripped, empty documents
    dropped, and a file boundary always ends a document. Files are streamed line by line.

    Args:
      files: paths of UTF-8 text files.

    Returns:
      The documents, each a list of sentences.
    """
    if not files:
        raise DataError("no text files given; set data.train_files to globs of text files")
    documents: list[list[str]] = []
    for path in files:
        file_documents = list(iter_file_documents(path))
        if not file_documents:
            raise DataError(
                f"{path}: holds no sentences; write one sentence per line "
                "with a blank line between documents"
            )
        documents.extend(file_documents)
    return documents


def iter_file_documents(path: str, start: int = 0, end: int | None = None) -> Iterator[list[str]]:
    """Yields the non-empty documents of a text file, or of a byte range of it, streaming.

    Args:
      path: a UTF-8 text file in the BERT layout.
      start: a line start (0, or right after a blank line) to read from.
      end: where the range ends (a line start or the file size); None: the end of the file.

    Yields:
      Documents: lists of stripped, non-empty sentences.
    """
    for _, sentences in iter_located_documents(path, start, end):
        yield sentences


def iter_located_documents(
    path: str, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, list[str]]]:
    """Yields ``(offset, sentences)`` per non-empty document of a file or a byte range of it.

    ``offset`` is the byte where the document's first line starts, so that reading from it
    (``iter_file_documents(path, offset)``) gives that document first.

    Args:
      path: a UTF-8 text file in the BERT layout.
      start: a line start (0, or right after a blank line) to read from.
      end: where the range ends (a line start or the file size); None: the end of the file.

    Yields:
      The documents' first-line offsets and their stripped, non-empty sentences.
    """
    try:
        with open(path, "rb") as file:
            file.seek(start)
            position = start
            document_start = start
            sentences: list[str] = []
            lines_read = 0
            while (end is None or position < end) and (raw_line := file.readline()):
                lines_read += 1
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as error:
                    line_number = _line_number(path, start) + lines_read - 1
                    raise DataError(
                        f"{path}:{line_number}: not valid UTF-8 ({error.reason} at byte "
                        f"{error.start} of the line); re-encode the file as UTF-8"
                    ) from None
                if position == 0:
                    line = line.removeprefix("\ufeff")
                line_start = position
                position += len(raw_line)
                line = line.strip()
                if line:
                    if not sentences:
                        document_start = line_start
                    sentences.append(line)
                elif sentences:
                    yield document_start, sentences
                    sentences = []
            if sentences:
                yield document_start, sentences
    except OSError as error:
        raise DataError(
            f"{path}: cannot read ({error.strerror or error}); check the path and its permissions"
        ) from None


def document_boundary(path: str, offset: int) -> int:
    """The first byte-range boundary of a text file at or after ``offset``.

    A boundary is the file start, the start of a line after a blank line, or the file end, so
    byte ranges between boundaries hold whole documents. Only the text between ``offset`` and
    the next blank line is read.

    Args:
      path: a text file in the BERT layout.
      offset: a byte offset into the file.

    Returns:
      0 for ``offset <= 0``; otherwise the start of the line after the first blank line that
      ends at or after ``offset``, or the file size when none does.
    """
    if offset <= 0:
        return 0
    try:
        with open(path, "rb") as file:
            file.seek(offset - 1)
            file.readline()  # to the next line start
            while (raw_line := file.readline()) and raw_line.decode("utf-8", "replace").strip():
                pass
            return file.tell()
    except OSError as error:
        raise DataError(
            f"{path}: cannot read ({error.strerror or error}); check the path and its permissions"
        ) from None


def _line_number(path: str, offset: int) -> int:
    """Returns the 1-based number of the line starting at byte ``offset`` of a file."""
    newlines = 0
    with open(path, "rb") as file:
        while offset > 0 and (block := file.read(min(offset, 1 << 20))):
            newlines += block.count(b"\n")
            offset -= len(block)
    return newlines + 1
