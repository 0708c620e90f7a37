"""Tests for mlm.data.text_source: byte-range shards of text files, read and tokenized lazily."""

import pickle

import grain
import numpy as np
import pytest

from mlm.data import text_source
from mlm.data.corpus import read_documents
from mlm.data.pipeline import build_dataset
from mlm.data.tokenizer import encode_documents, vocab_from_tokens
from mlm.errors import DataError

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "runs",
    "far",
    "away",
]


def write_files(tmp_path, documents_per_file=(7, 1, 12, 5)) -> list[str]:
    """Text files with documents of 1-4 sentences, extra blank lines and a BOM in the first."""
    paths = []
    number = 0
    for file_number, count in enumerate(documents_per_file):
        lines = ["\ufeff"] if file_number == 0 else []
        for _ in range(count):
            lines += [
                " ".join(WORDS[(number + k + j) % len(WORDS)] for j in range(3 + k)) + "."
                for k in range(1 + number % 4)
            ]
            lines += [""] * (1 + number % 2)
            number += 1
        path = tmp_path / f"part{file_number}.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        paths.append(str(path))
    return paths


def vocab():
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + WORDS
    return vocab_from_tokens(tokens, lowercase=True)


@pytest.mark.parametrize("shard_count", [1, 2, 3, 5, 40])
def test_shards_partition_the_documents_in_order(tmp_path, shard_count):
    files = write_files(tmp_path)
    want = read_documents(files)
    got = []
    for index in range(shard_count):
        source = text_source.TextDocuments(text_source.shard_ranges(files, index, shard_count))
        got += [source[i] for i in range(len(source))]
    assert got == want


def test_documents_read_by_index_survive_pickling(tmp_path):
    files = write_files(tmp_path)
    source = text_source.TextDocuments(text_source.shard_ranges(files, 1, 2))
    copy = pickle.loads(pickle.dumps(source))
    assert len(copy) == len(source) > 0
    assert [copy[i] for i in reversed(range(len(copy)))] == [
        source[i] for i in reversed(range(len(source)))
    ]


def test_one_shard_gives_the_batches_of_the_whole_corpus_in_memory(tmp_path):
    """The lazy reader feeds the pipeline exactly what the tokenized corpus in memory did."""
    files = write_files(tmp_path)
    ids = vocab()
    options = dict(
        seq_length=24,
        max_predictions=4,
        masking_rate=0.15,
        whole_word_masking=False,
        short_seq_prob=0.1,
        batch_size=3,
        seed=5,
        train=True,
    )
    in_memory = grain.MapDataset.source(encode_documents(ids, read_documents(files)))
    lazy = text_source.text_shard_documents(files, ids)
    for nsp in (False, True):
        want = iter(build_dataset(in_memory, ids, use_next_sentence_label=nsp, **options))
        got = iter(build_dataset(lazy, ids, use_next_sentence_label=nsp, **options))
        for _ in range(6):
            expected, actual = next(want), next(got)
            for key in expected:
                np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_a_shard_reads_only_its_own_bytes(tmp_path):
    """Invalid UTF-8 in the second half fails the shard that owns it, and only that one."""
    first = tmp_path / "a.txt"
    first.write_text("\n\n".join(f"{word} one.\n{word} two." for word in WORDS * 4) + "\n\n")
    second = tmp_path / "b.txt"
    second.write_bytes(b"fine line.\n\n" * 10 + b"bad \xff byte.\n\nlast one.\n")
    files = [str(first), str(second)]
    ranges = text_source.shard_ranges(files, 0, 2)
    assert [text_range.path for text_range in ranges] == [str(first)]
    assert 0 < len(text_source.TextDocuments(ranges)) < len(WORDS) * 4
    with pytest.raises(DataError, match=r"b.txt:21: not valid UTF-8"):
        text_source.TextDocuments(text_source.shard_ranges(files, 1, 2))


def test_empty_files_and_empty_shards_are_one_line_errors(tmp_path):
    files = write_files(tmp_path, (3,))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: holds no sentences"):
        text_source.text_shard_documents([files[0], str(empty)], vocab())
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\t\n")
    with pytest.raises(DataError, match="blank.txt: holds no sentences"):
        text_source.text_shard_documents([files[0], str(blank)], vocab())
    with pytest.raises(DataError, match="input shard 7 of 8 holds no documents; .*fewer"):
        text_source.text_shard_documents(files, vocab(), shard_index=7, shard_count=8)
