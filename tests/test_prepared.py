"""Tests for mlm.data.prepared: the record format and reading prepared splits with grain."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from mlm.data import prepared as prepared_lib
from mlm.data.corpus import read_documents
from mlm.data.prepare import prepare
from mlm.data.tokenizer import encode_documents, load_vocab
from mlm.errors import DataError

TEXT = (
    "The list returns a value.\nIts name is a string.\n\n"
    "A file holds lines of text.\n\n"
    "Each word has an index.\nThe module defines a class.\nA class has methods.\n\n"
)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """A finished preparation of 40 documents in 4 train shards and a 3-document eval split."""
    text_dir = tmp_path_factory.mktemp("text")
    train = text_dir / "train.txt"
    train.write_text("".join(TEXT.replace("The", f"The {i}") for i in range(14)))
    evaluation = text_dir / "eval.txt"
    evaluation.write_text(TEXT)
    output = str(tmp_path_factory.mktemp("prepared"))
    prepare(
        [str(train)],
        output,
        eval_files=[str(evaluation)],
        vocab_size=120,
        documents_per_shard=12,
        progress=False,
    )
    return output


@pytest.fixture
def copy_of(prepared_dir, tmp_path):
    """A private copy of the preparation, to damage."""
    return shutil.copytree(prepared_dir, tmp_path / "copy")


def expected(directory, split):
    """The documents of a split, read and encoded from its input files in memory."""
    corpus = prepared_lib.load_prepared(directory)
    vocab = load_vocab(corpus.vocab_path, corpus.lowercase)
    return encode_documents(vocab, read_documents(corpus.splits[split]["input_files"]))


def as_lists(documents):
    return [[sentence.tolist() for sentence in document] for document in documents]


def rewrite_metadata(directory, **changes):
    path = os.path.join(directory, "metadata.json")
    with open(path) as file:
        metadata = json.load(file)
    metadata.update(changes)
    with open(path, "w") as file:
        json.dump(metadata, file)
    return metadata


# ------------------------------------------------------------------------------ the format


@pytest.mark.parametrize("vocab_size, stored", [(30522, "<u2"), (1 << 16, "<u2"), (70000, "<i4")])
def test_records_round_trip_in_the_dtype_the_vocab_needs(vocab_size, stored):
    dtype = prepared_lib.token_dtype(vocab_size)
    assert dtype.str == stored
    document = [np.asarray([vocab_size - 1, 0, 7], np.int32), np.asarray([5], np.int32)]
    record = prepared_lib.encode_document(document, dtype)
    assert len(record) == 4 * 3 + 4 * dtype.itemsize
    decoded = prepared_lib.decode_document(record, dtype)
    assert as_lists(decoded) == as_lists(document)
    assert all(sentence.dtype == np.int32 for sentence in decoded)


@pytest.mark.parametrize(
    "record, reason",
    [
        (b"\x01", "too short"),
        (np.asarray([0], "<u4").tobytes(), "claims 0 sentences"),
        (np.asarray([5, 1], "<u4").tobytes(), "claims 5 sentences"),
        (np.asarray([1, 3], "<u4").tobytes() + b"\x00\x00", "do not match"),
        (np.asarray([2, 1, 0], "<u4").tobytes() + b"\x00\x00", "do not match"),
    ],
)
def test_decode_document_rejects_malformed_records(record, reason):
    with pytest.raises(ValueError, match=reason):
        prepared_lib.decode_document(record, np.dtype("<u2"))


# ------------------------------------------------------------------------------ the reader


def test_prepared_documents_equal_the_encoded_text_in_order(prepared_dir):
    corpus = prepared_lib.load_prepared(prepared_dir)
    assert corpus.vocab_path == os.path.join(prepared_dir, "vocab.txt")
    assert corpus.vocab_size == load_vocab(corpus.vocab_path, True).size <= 120
    assert corpus.lowercase is True and corpus.token_dtype == np.dtype("<u2")
    assert sorted(corpus.splits) == ["eval", "train"]
    for split in ("train", "eval"):
        want = expected(prepared_dir, split)
        documents = prepared_lib.prepared_documents(corpus, split, vocab_size=corpus.vocab_size)
        assert len(documents) == len(want) == corpus.splits[split]["num_documents"]
        assert as_lists(documents) == as_lists(want)
        assert prepared_lib.split_num_tokens(corpus, split) == sum(
            len(sentence) for document in want for sentence in document
        )
    assert [shard["num_documents"] for shard in corpus.splits["train"]["shards"]] == [12, 12, 12, 6]


def test_prepared_documents_shuffle_slice_and_pickle_like_any_map_dataset(prepared_dir):
    corpus = prepared_lib.load_prepared(prepared_dir)
    documents = prepared_lib.prepared_documents(corpus, "train", vocab_size=1000)
    everything = as_lists(documents)
    shuffled = as_lists(documents.shuffle(seed=3))
    assert shuffled != everything
    assert sorted(map(str, shuffled)) == sorted(map(str, everything))
    assert as_lists(documents.shuffle(seed=3)) == shuffled
    assert as_lists(documents[10:30:4]) == everything[10:30:4]
    assert as_lists(pickle.loads(pickle.dumps(documents))[25:27]) == everything[25:27]


def test_a_vocab_size_below_the_ids_names_the_id(prepared_dir):
    corpus = prepared_lib.load_prepared(prepared_dir)
    largest = max(max(s.max() for s in d) for d in expected(prepared_dir, "train"))
    documents = prepared_lib.prepared_documents(corpus, "train", vocab_size=int(largest))
    with pytest.raises(DataError, match=f"holds token id {largest}, not below model.vocab_size"):
        list(documents)


def test_unknown_split_lists_the_splits_there_are(copy_of):
    rewrite_metadata(copy_of, splits={"train": prepared_lib.load_prepared(copy_of).splits["train"]})
    corpus = prepared_lib.load_prepared(copy_of)
    with pytest.raises(DataError, match=r"has no 'eval' split, only \['train'\]"):
        prepared_lib.prepared_documents(corpus, "eval", vocab_size=1000)
    with pytest.raises(DataError, match="has no 'test' split"):
        prepared_lib.split_num_tokens(corpus, "test")


def test_a_directory_without_metadata_is_not_a_finished_preparation(copy_of):
    os.remove(copy_of / "metadata.json")
    with pytest.raises(DataError, match="not a finished mlm.data.prepare output") as error:
        prepared_lib.load_prepared(str(copy_of))
    assert "python -m mlm.data.prepare" in str(error.value)
    assert "\n" not in str(error.value)


def test_another_format_version_and_a_missing_shard_are_refused(copy_of):
    metadata = rewrite_metadata(copy_of, format_version=99)
    with pytest.raises(DataError, match="version 99, but this mlm reads 'mlm.prepared' version 1"):
        prepared_lib.load_prepared(str(copy_of))
    rewrite_metadata(copy_of, format_version=1)
    os.remove(copy_of / metadata["splits"]["train"]["shards"][2]["file"])
    with pytest.raises(DataError, match="train-00002.array_record listed in metadata.json is"):
        prepared_lib.load_prepared(str(copy_of))
    rewrite_metadata(copy_of, splits=None)
    with pytest.raises(DataError, match="metadata.json: malformed"):
        prepared_lib.load_prepared(str(copy_of))
    (copy_of / "metadata.json").write_text("{not json")
    with pytest.raises(DataError, match="metadata.json: unreadable"):
        prepared_lib.load_prepared(str(copy_of))


def test_a_damaged_shard_raises_a_data_error_naming_it(copy_of):
    path = copy_of / "train-00001.array_record"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 200 : middle + 200] = b"\xa5" * 400
    path.write_bytes(bytes(data))
    documents = prepared_lib.prepared_documents(
        prepared_lib.load_prepared(str(copy_of)), "train", vocab_size=1000
    )
    assert len(as_lists(documents[:12])) == 12  # the first shard is intact
    with pytest.raises(DataError, match=r"train-00001\.array_record: record \d+ cannot be read"):
        as_lists(documents)


def test_a_truncated_shard_raises_a_data_error_naming_it(copy_of):
    path = copy_of / "eval-00000.array_record"
    path.write_bytes(path.read_bytes()[:1000])
    documents = prepared_lib.prepared_documents(
        prepared_lib.load_prepared(str(copy_of)), "eval", vocab_size=1000
    )
    with pytest.raises(DataError, match=r"eval-00000\.array_record: record 0 cannot be read"):
        documents[0]


def test_a_malformed_record_raises_a_data_error_naming_shard_and_record(copy_of):
    writer = ArrayRecordWriter(str(copy_of / "eval-00000.array_record"), "group_size:1")
    good = prepared_lib.encode_document([np.asarray([5, 6], np.int32)], np.dtype("<u2"))
    for record in (good, good, b"\x07\x00"):
        writer.write(record)
    writer.close()
    documents = prepared_lib.prepared_documents(
        prepared_lib.load_prepared(str(copy_of)), "eval", vocab_size=1000
    )
    assert as_lists(documents[:2]) == [[[5, 6]], [[5, 6]]]
    with pytest.raises(DataError, match=r"eval-00000\.array_record: record 2 is corrupt"):
        documents[2]
