"""Tests for mlm.data.tfrecord_source: random access to TFRecord files and damage detection."""

import gzip
import os
import pickle
from pathlib import Path

import grain
import pytest

from mlm.data.tfrecord_source import (
    TFRecordDataSource,
    default_cache_dir,
    index_records,
    masked_crc32c,
)
from mlm.errors import DataError


def write_tfrecord(path, records, options=None):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path), options) as writer:
        for record in records:
            writer.write(record)
    return str(path)


RECORDS_A = [b"a%d" % i * (i + 1) for i in range(30)]
RECORDS_B = [b"b%d" % i for i in range(7)] + [b""]


@pytest.fixture
def files(tmp_path):
    return write_tfrecord(tmp_path / "a.tfrecord", RECORDS_A), write_tfrecord(
        tmp_path / "b.tfrecord", RECORDS_B
    )


def test_checksums_match_tensorflows_writer(files):
    data = Path(files[0]).read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert length == len(RECORDS_A[0])
    assert masked_crc32c(data[:8]) == int.from_bytes(data[8:12], "little")
    record = data[12 : 12 + length]
    assert masked_crc32c(record) == int.from_bytes(data[12 + length : 16 + length], "little")


def test_random_access_over_files_in_order(files):
    source = TFRecordDataSource(files)
    assert len(source) == len(RECORDS_A) + len(RECORDS_B)
    assert source.records_per_file() == [len(RECORDS_A), len(RECORDS_B)]
    expected = RECORDS_A + RECORDS_B
    for index in (0, 5, 29, 30, 36, 37, 3):
        assert source[index] == expected[index]
    with pytest.raises(IndexError):
        source[len(expected)]
    copy = pickle.loads(pickle.dumps(source))
    assert [copy[i] for i in range(len(copy))] == expected
    shuffled = list(grain.MapDataset.source(source).shuffle(seed=1))
    assert sorted(shuffled) == sorted(expected) and shuffled != expected


def test_damage_is_a_data_error_naming_the_file(tmp_path, files):
    data = bytearray(Path(files[0]).read_bytes())
    truncated = tmp_path / "truncated.tfrecord"
    truncated.write_bytes(bytes(data[:-3]))
    with pytest.raises(DataError, match="truncated.tfrecord: truncated record"):
        TFRecordDataSource([str(truncated)])
    bad_header = bytearray(data)
    bad_header[0] ^= 0xFF
    (tmp_path / "header.tfrecord").write_bytes(bytes(bad_header))
    with pytest.raises(DataError, match="header.tfrecord: corrupt record header at byte 0"):
        index_records(str(tmp_path / "header.tfrecord"))
    bad_data = bytearray(data)
    bad_data[14] ^= 0x01  # Inside the first record's data.
    (tmp_path / "data.tfrecord").write_bytes(bytes(bad_data))
    source = TFRecordDataSource([str(tmp_path / "data.tfrecord")])
    assert source[1] == RECORDS_A[1]
    with pytest.raises(DataError, match="data.tfrecord: corrupt record at byte 0"):
        source[0]
    (tmp_path / "zipped.tfrecord").write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DataError, match="zipped.tfrecord: is gzip-compressed; read it through"):
        index_records(str(tmp_path / "zipped.tfrecord"))
    with pytest.raises(DataError, match="missing.tfrecord: cannot read"):
        TFRecordDataSource([str(tmp_path / "missing.tfrecord")])
    with pytest.raises(DataError, match="no TFRecord files"):
        TFRecordDataSource([])


def test_threaded_reads_return_the_right_records(tmp_path):
    records = [b"%06d" % i * (1 + i % 7) for i in range(5000)]
    source = TFRecordDataSource([write_tfrecord(tmp_path / "many.tfrecord", records)])
    # grain reads a MapDataset with a thread pool: reads must not share a file position.
    assert list(grain.MapDataset.source(source).to_iter_dataset()) == records


def test_gzip_files_are_read_through_a_decompressed_copy(tmp_path, files):
    cache = str(tmp_path / "cache")
    # TensorFlow's own GZIP writer (Model Garden's compression_type='GZIP'), and gzip content
    # under a plain name (found by its magic bytes).
    zipped_a = write_tfrecord(tmp_path / "a.tfrecord.gz", RECORDS_A, options="GZIP")
    zipped_b = tmp_path / "b.tfrecord-00000-of-00001"
    zipped_b.write_bytes(gzip.compress(Path(files[1]).read_bytes()))
    source = TFRecordDataSource([zipped_a, str(zipped_b)], cache_dir=cache)
    assert source.paths == [zipped_a, str(zipped_b)]
    assert source.records_per_file() == [len(RECORDS_A), len(RECORDS_B)]
    copies = source.local_paths
    assert all(os.path.dirname(copy) == os.path.join(cache, "tfrecords") for copy in copies)
    assert Path(copies[0]).read_bytes() == Path(files[0]).read_bytes()
    expected = RECORDS_A + RECORDS_B
    assert [source[i] for i in range(len(source))] == expected
    copy = pickle.loads(pickle.dumps(source))
    assert [copy[i] for i in range(len(copy))] == expected

    # A second source reuses the copies; a changed file gets a new one.
    mtimes = [os.stat(copy).st_mtime_ns for copy in copies]
    assert TFRecordDataSource([zipped_a], cache_dir=cache).local_paths == copies[:1]
    assert [os.stat(copy).st_mtime_ns for copy in copies] == mtimes
    write_tfrecord(zipped_a, RECORDS_B, options="GZIP")
    changed = TFRecordDataSource([zipped_a], cache_dir=cache)
    assert changed.local_paths != copies[:1] and list(changed) == RECORDS_B
    assert not [name for name in os.listdir(os.path.dirname(copies[0])) if name.endswith(".tmp")]


def test_damaged_gzip_files_are_one_line_data_errors(tmp_path, files, monkeypatch):
    monkeypatch.setenv("MLM_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == str(tmp_path / "cache")
    data = Path(files[0]).read_bytes()
    truncated = tmp_path / "truncated.tfrecord.gz"
    truncated.write_bytes(gzip.compress(data)[:-20])
    plain = tmp_path / "plain.tfrecord.gz"
    plain.write_bytes(data)
    for path in (truncated, plain):
        with pytest.raises(DataError) as error:
            TFRecordDataSource([str(path)])
        message = str(error.value)
        assert message.startswith(f"{path}: not a valid gzip file (")
        assert message.endswith("; copy or regenerate the file") and "\n" not in message
    assert os.listdir(tmp_path / "cache" / "tfrecords") == []

    # Records damaged before compression: the checksums name the .gz file.
    bad_data = bytearray(data)
    bad_data[14] ^= 0x01  # Inside the first record's data.
    (tmp_path / "data.tfrecord.gz").write_bytes(gzip.compress(bytes(bad_data)))
    source = TFRecordDataSource([str(tmp_path / "data.tfrecord.gz")])
    assert source[1] == RECORDS_A[1]
    with pytest.raises(DataError, match="data.tfrecord.gz: corrupt record at decompressed byte 0"):
        source[0]
    (tmp_path / "short.tfrecord.gz").write_bytes(gzip.compress(data[:-3]))
    with pytest.raises(DataError, match="short.tfrecord.gz: truncated record at decompressed"):
        TFRecordDataSource([str(tmp_path / "short.tfrecord.gz")])

    (tmp_path / "not_a_dir").write_bytes(b"")
    zipped = tmp_path / "a.tfrecord.gz"
    zipped.write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="a.tfrecord.gz: cannot write its decompressed copy to"):
        TFRecordDataSource([str(zipped)], cache_dir=str(tmp_path / "not_a_dir"))
    with pytest.raises(DataError, match="missing.tfrecord.gz: cannot read"):
        TFRecordDataSource([str(tmp_path / "missing.tfrecord.gz")])
