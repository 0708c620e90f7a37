"""Tests for mlm.data.corpus: globs, the text layout and atomic writes."""

import os

import pytest

from mlm.data import corpus
from mlm.errors import DataError


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as file:
        file.write(text)
    return str(path)


# ----------------------------------------------------------------------------- expand_globs


def test_expand_globs_returns_sorted_unique_files(tmp_path):
    b = write(tmp_path / "b.txt", "x")
    a = write(tmp_path / "a.txt", "x")
    c = write(tmp_path / "sub" / "c.txt", "x")
    patterns = f"{tmp_path}/*.txt, {tmp_path}/sub/*.txt ,{tmp_path}/a.txt"
    assert corpus.expand_globs(patterns) == [a, b, c]
    assert corpus.expand_globs(f"{tmp_path}/**/*.txt") == [a, b, c]


def test_expand_globs_unmatched_glob_names_it_and_the_field(tmp_path):
    write(tmp_path / "a.txt", "x")
    missing = f"{tmp_path}/nothing*.txt"
    with pytest.raises(DataError, match="data.eval_files: no file matches") as error:
        corpus.expand_globs(f"{tmp_path}/a.txt,{missing}", "data.eval_files")
    assert repr(missing) in str(error.value)
    assert "built-in corpus" in str(error.value)


def test_expand_globs_ignores_directories_and_rejects_empty_lists(tmp_path):
    os.makedirs(tmp_path / "dir.txt")
    with pytest.raises(DataError, match="no file matches"):
        corpus.expand_globs(f"{tmp_path}/*.txt")
    with pytest.raises(DataError, match="data.train_files: no glob given"):
        corpus.expand_globs(" , ")


# --------------------------------------------------------------------------- read_documents


def test_read_documents_splits_on_blank_lines_and_files(tmp_path):
    first = write(
        tmp_path / "one.txt",
        "\ufeff\n\n  First sentence.  \nSecond one.\r\n\n\n \t\nNew document.\n",
    )
    second = write(tmp_path / "two.txt", "Next file starts a document.\nIts second line.")
    assert corpus.read_documents([first, second]) == [
        ["First sentence.", "Second one."],
        ["New document."],
        ["Next file starts a document.", "Its second line."],
    ]


def test_read_documents_reports_invalid_utf8_with_file_and_line(tmp_path):
    path = write(tmp_path / "bad.txt", b"Fine line.\n\nAlso fine.\nbroken \xff byte\n", "wb")
    with pytest.raises(DataError, match=r"bad\.txt:4: not valid UTF-8"):
        corpus.read_documents([path])


def test_read_documents_rejects_missing_empty_and_unreadable_inputs(tmp_path):
    with pytest.raises(DataError, match="missing.txt: cannot read"):
        corpus.read_documents([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="cannot read"):
        corpus.read_documents([str(tmp_path)])
    blank = write(tmp_path / "blank.txt", "\n \n\t\n")
    with pytest.raises(DataError, match="blank.txt: holds no sentences"):
        corpus.read_documents([blank])
    with pytest.raises(DataError, match="no text files"):
        corpus.read_documents([])
