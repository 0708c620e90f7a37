"""Tests for mlm.data.prepare: byte ranges, tokenizing into shards, determinism and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlm.data import prepare as prepare_lib
from mlm.data.corpus import iter_file_documents, read_documents
from mlm.data.prepared import load_prepared, prepared_documents
from mlm.data.tokenizer import encode_documents, load_vocab
from mlm.errors import ConfigError, DataError, WorkdirError

# fmt: off
WORDS = ["the", "a", "list", "of", "values", "returns", "string", "number", "name", "file",
         "path", "object", "method", "class", "module", "function", "argument", "error", "key"]
# fmt: on


def write(path, text, mode="w"):
    with open(path, mode) as file:
        file.write(text)
    return str(path)


def sentence(rng):
    words = rng.choice(WORDS, size=rng.integers(3, 12))
    return " ".join(words).capitalize() + "."


def document(rng):
    return "\n".join(sentence(rng) for _ in range(rng.integers(1, 6)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three small train files (with a BOM, CRLF, blank-ish lines, a document of only a NUL)
    and an eval file."""
    directory = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    first = "\ufeff" + "\n\n".join(document(rng) for _ in range(30)) + "\n"
    second = (
        "\n \t\n"
        + "\r\n\r\n".join(document(rng).replace("\n", "\r\n") for _ in range(20))
        + "\n\n\x00\n\n"
        + "\n\n\n".join(document(rng) for _ in range(20))
    )
    third = document(rng)  # one document, no blank line, no final newline
    files = [
        write(directory / "a.txt", first),
        write(directory / "b.txt", second),
        write(directory / "c.txt", third),
    ]
    eval_files = [write(directory / "eval.txt", "\n\n".join(document(rng) for _ in range(8)))]
    return files, eval_files


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """A preparation of `corpus` with a vocab the tool trains, small shards and small tasks."""
    files, eval_files = corpus
    output = str(tmp_path_factory.mktemp("prepared"))
    metadata = prepare_lib.prepare(
        files,
        output,
        eval_files=eval_files,
        vocab_size=200,
        documents_per_shard=7,
        task_bytes=300,
        progress=False,
    )
    return output, metadata


def expected_documents(directory, files):
    return encode_documents(
        load_vocab(os.path.join(directory, "vocab.txt"), True), read_documents(files)
    )


def assert_same_documents(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert len(got) == len(want)
        for got_sentence, want_sentence in zip(got, want, strict=True):
            assert got_sentence.dtype == np.int32
            np.testing.assert_array_equal(got_sentence, want_sentence)


def shard_bytes(directory):
    """The contents of the shard files of a directory, by name."""
    contents = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".array_record"):
            with open(os.path.join(directory, name), "rb") as file:
                contents[name] = file.read()
    return contents


# --------------------------------------------------------------------------- reading ranges


@pytest.mark.parametrize("target_bytes", [1, 7, 40, 333, 10**6])
def test_split_file_ranges_cover_the_file_and_read_as_the_whole_file(corpus, target_bytes):
    for path in corpus[0]:
        ranges = prepare_lib.split_file(path, target_bytes)
        size = os.path.getsize(path)
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert [end for _, end in ranges[:-1]] == [start for start, _ in ranges[1:]]
        documents = [
            document for start, end in ranges for document in iter_file_documents(path, start, end)
        ]
        assert documents == read_documents([path])


def test_split_file_cuts_a_big_file_and_keeps_one_without_blank_lines_whole(corpus, tmp_path):
    assert len(prepare_lib.split_file(corpus[0][0], 300)) > 5
    assert prepare_lib.split_file(corpus[0][2], 10) == [(0, os.path.getsize(corpus[0][2]))]
    empty = write(tmp_path / "empty.txt", "")
    assert prepare_lib.split_file(empty, 10) == [(0, 0)]


def test_a_later_byte_range_names_the_file_line_of_bad_utf8(tmp_path):
    path = write(tmp_path / "bad.txt", b"One.\nTwo.\n\nThree.\n\nFour \xff.\n", "wb")
    (start, end) = prepare_lib.split_file(path, 12)[-1]
    assert start > 0
    with pytest.raises(DataError, match=r"bad\.txt:6: not valid UTF-8"):
        list(iter_file_documents(path, start, end))


# -------------------------------------------------------------------------------- prepare


def test_prepare_writes_the_documents_of_read_and_encode_in_order(corpus, prepared):
    files, eval_files = corpus
    output, metadata = prepared
    for split, split_files in (("train", files), ("eval", eval_files)):
        expected = expected_documents(output, split_files)
        info = metadata["splits"][split]
        assert info["input_files"] == split_files
        assert info["num_documents"] == len(expected)
        assert info["num_sentences"] == sum(len(document) for document in expected)
        assert info["num_tokens"] == sum(len(s) for document in expected for s in document)
        assert info["input_bytes"] == sum(os.path.getsize(path) for path in split_files)
        assert [shard["num_documents"] for shard in info["shards"]][:-1] == [7] * (
            len(info["shards"]) - 1
        )
        documents = prepared_documents(load_prepared(output), split, vocab_size=200)
        assert_same_documents(list(documents), expected)
    # The NUL-only document tokenizes to nothing and is dropped.
    assert metadata["splits"]["train"]["num_documents"] == 72 - 1
    with open(os.path.join(output, "metadata.json")) as file:
        assert json.load(file) == metadata
    assert metadata["format"] == "mlm.prepared" and metadata["format_version"] == 1
    assert metadata["vocab_size"] == load_vocab(os.path.join(output, "vocab.txt"), True).size
    assert metadata["vocab_size"] <= 200 and metadata["token_dtype"] == "<u2"
    assert metadata["lowercase"] is True


def test_worker_count_and_task_size_do_not_change_the_shards(corpus, prepared, tmp_path):
    files, eval_files = corpus
    output, metadata = prepared
    options = dict(
        eval_files=eval_files,
        vocab_file=os.path.join(output, "vocab.txt"),
        documents_per_shard=7,
        progress=False,
    )
    one = prepare_lib.prepare(files, str(tmp_path / "one"), num_workers=1, **options)
    two = prepare_lib.prepare(
        files, str(tmp_path / "two"), num_workers=2, task_bytes=100, **options
    )
    assert one == two == metadata
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two") == shard_bytes(output)
    assert len(shard_bytes(output)) > 4


def test_prepare_copies_a_given_vocab_and_refuses_to_overwrite_a_finished_output(
    corpus, prepared, tmp_path
):
    files = corpus[0][:1]
    vocab_file = os.path.join(prepared[0], "vocab.txt")
    output = str(tmp_path / "out")
    prepare_lib.prepare(files, output, vocab_file=vocab_file, documents_per_shard=1, progress=False)
    with open(vocab_file, "rb") as want, open(os.path.join(output, "vocab.txt"), "rb") as got:
        assert got.read() == want.read()
    assert len(shard_bytes(output)) == 30
    with pytest.raises(WorkdirError, match="already holds a finished preparation.*--overwrite"):
        prepare_lib.prepare(files, output, vocab_file=vocab_file, progress=False)
    # --overwrite, tokenizing with the output's own vocab.txt: old shards are removed.
    own_vocab = os.path.join(output, "vocab.txt")
    metadata = prepare_lib.prepare(
        files, output, vocab_file=own_vocab, overwrite=True, progress=False
    )
    assert list(shard_bytes(output)) == ["train-00000.array_record"]
    assert metadata["splits"]["train"]["num_documents"] == 30
    assert "eval" not in metadata["splits"]


def test_prepare_continues_an_unfinished_output(corpus, prepared, tmp_path):
    output = tmp_path / "out"
    os.makedirs(output)
    write(output / "train-00009.array_record", "stale")
    write(output / "notes.txt", "kept")
    vocab_file = os.path.join(prepared[0], "vocab.txt")
    prepare_lib.prepare(corpus[0][:1], str(output), vocab_file=vocab_file, progress=False)
    assert sorted(os.listdir(output)) == [
        "metadata.json",
        "notes.txt",
        "train-00000.array_record",
        "vocab.txt",
    ]


def test_prepare_rejects_a_file_without_sentences_and_bad_arguments(corpus, prepared, tmp_path):
    vocab_file = os.path.join(prepared[0], "vocab.txt")
    blank = write(tmp_path / "blank.txt", "\n \n\n")
    output = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"blank\.txt: holds no sentences"):
        prepare_lib.prepare([corpus[0][0], blank], output, vocab_file=vocab_file, progress=False)
    assert not os.path.exists(os.path.join(output, "metadata.json"))
    with pytest.raises(ConfigError, match="--vocab_file and --vocab_size both given"):
        prepare_lib.prepare(corpus[0], output, vocab_file=vocab_file, vocab_size=100)
    with pytest.raises(ConfigError, match="--num_workers=0"):
        prepare_lib.prepare(corpus[0], output, vocab_file=vocab_file, num_workers=0)
    with pytest.raises(ConfigError, match="--documents_per_shard=0"):
        prepare_lib.prepare(corpus[0], output, vocab_file=vocab_file, documents_per_shard=0)
    with pytest.raises(DataError, match="does not exist"):
        prepare_lib.prepare(corpus[0], output, vocab_file=str(tmp_path / "none.txt"))


# ------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlm.data.prepare", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in last_line


def test_cli_prepares_with_two_workers_and_prints_a_summary(corpus, prepared, tmp_path):
    files, eval_files = corpus
    output = str(tmp_path / "out")
    result = run_cli(
        "--input",
        f"{os.path.dirname(files[0])}/[abc].txt",
        "--eval_input",
        eval_files[0],
        "--output",
        output,
        "--vocab_size=200",
        "--num_workers=2",
        "--documents_per_shard=7",
    )
    assert result.returncode == 0, result.stderr
    assert "train: 3 files, 71 documents" in result.stdout
    assert "eval: 1 files, 8 documents" in result.stdout
    assert f"wrote {output}/metadata.json" in result.stdout
    assert "train (3 files)" in result.stderr  # the progress bar
    assert shard_bytes(output) == shard_bytes(prepared[0])


def test_cli_errors_are_one_line(corpus, tmp_path):
    files = corpus[0]
    result = run_cli("--input", f"{tmp_path}/nothing*.txt", "--output", str(tmp_path / "o"))
    assert_one_line_error(result, "--input: no file matches", "nothing*.txt")

    bad = write(tmp_path / "bad.txt", b"Fine.\n\nNot \xfe fine.\n", "wb")
    result = run_cli("--input", files[0], "--eval_input", bad, "--output", str(tmp_path / "o"))
    assert_one_line_error(result, "bad.txt:3: not valid UTF-8")
    assert not os.path.exists(tmp_path / "o" / "metadata.json")

    output = tmp_path / "done"
    os.makedirs(output)
    write(output / "metadata.json", "{}")
    result = run_cli("--input", files[0], "--output", str(output))
    assert_one_line_error(result, "already holds a finished preparation", "--overwrite")
