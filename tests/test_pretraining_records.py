"""Tests for mlm.data.pretraining_records: BERT pretraining TFRecords written, checked, read."""

import gzip
import os
import pickle

import numpy as np
import pytest

from mlm.data import pretraining_records as records
from mlm.data.tfrecord_source import TFRecordDataSource
from mlm.errors import ConfigError, DataError

VOCAB_SIZE = 1000
ROW_KEYS = {
    "input_word_ids": np.int32,
    "input_mask": np.int32,
    "input_type_ids": np.int32,
    "packed_segment_ids": np.int32,
    "position_ids": np.int32,
    "masked_lm_positions": np.int32,
    "masked_lm_ids": np.int32,
    "masked_lm_weights": np.float32,
    "next_sentence_labels": np.int32,
}


def make_row(rng, seq_length=16, max_predictions=4, with_label=True):
    """A random instance in batch-row layout, zero-padded like BERT's."""
    length = int(rng.integers(max_predictions + 2, seq_length + 1))
    num_predictions = int(rng.integers(1, max_predictions + 1))
    row = {
        "input_word_ids": np.zeros(seq_length, np.int32),
        "input_mask": np.zeros(seq_length, np.int32),
        "input_type_ids": np.zeros(seq_length, np.int32),
        "masked_lm_positions": np.zeros(max_predictions, np.int32),
        "masked_lm_ids": np.zeros(max_predictions, np.int32),
        "masked_lm_weights": np.zeros(max_predictions, np.float32),
    }
    row["input_word_ids"][:length] = rng.integers(5, VOCAB_SIZE, length)
    row["input_mask"][:length] = 1
    row["input_type_ids"][length // 2 : length] = 1
    positions = np.sort(rng.choice(np.arange(1, length - 1), num_predictions, replace=False))
    row["masked_lm_positions"][:num_predictions] = positions
    row["masked_lm_ids"][:num_predictions] = rng.integers(5, VOCAB_SIZE, num_predictions)
    row["masked_lm_weights"][:num_predictions] = 1.0
    if with_label:
        row["next_sentence_labels"] = np.int32(rng.integers(0, 2))
    return row


def write(tmp_path, name, rows, **kwargs):
    path = str(tmp_path / name)
    assert records.write_records(path, rows, **kwargs) == len(rows)
    return path


def write_raw(path, payloads):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for payload in payloads:
            writer.write(payload)
    return str(path)


@pytest.mark.parametrize("v2", [False, True])
def test_round_trip_gives_exact_rows(tmp_path, v2):
    rng = np.random.default_rng(0)
    rows = [make_row(rng) for _ in range(7)]
    paths = [write(tmp_path, "a.tfrecord", rows[:3], v2_feature_names=v2)]
    paths.append(write(tmp_path, "b.tfrecord", rows[3:], v2_feature_names=v2))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    source = TFRecordDataSource(paths)

    spec = records.inspect_records(source)
    assert (spec.seq_length, spec.max_predictions) == (16, 4)
    assert spec.v2_feature_names is v2 and spec.has_next_sentence_labels
    assert ("input_word_ids" in spec.feature_names) is v2
    assert ("input_ids" in spec.feature_names) is not v2

    dataset = records.record_rows(source, seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE)
    assert len(dataset) == 7
    for index, expected in enumerate(rows):
        row = dataset[index]
        assert set(row) == set(ROW_KEYS)
        for key, dtype in ROW_KEYS.items():
            assert row[key].dtype == dtype, key
        for key in expected:
            np.testing.assert_array_equal(row[key], expected[key], err_msg=key)
        np.testing.assert_array_equal(row["packed_segment_ids"], expected["input_mask"])
        np.testing.assert_array_equal(row["position_ids"], np.arange(16))
        assert row["next_sentence_labels"].shape == ()


def test_parse_example_reads_both_spellings_and_serializes_deterministically():
    rng = np.random.default_rng(1)
    row = make_row(rng)
    v1 = records.serialize_example(row)
    v2 = records.serialize_example(row, v2_feature_names=True)
    assert v1 != v2
    parsed_v1, parsed_v2 = records.parse_example(v1), records.parse_example(v2)
    for key in parsed_v1:
        np.testing.assert_array_equal(parsed_v1[key], parsed_v2[key])
    np.testing.assert_array_equal(parsed_v1["input_ids"], row["input_word_ids"])
    np.testing.assert_array_equal(parsed_v1["segment_ids"], row["input_type_ids"])
    assert parsed_v1["input_ids"].dtype == np.int64
    assert parsed_v1["masked_lm_weights"].dtype == np.float32
    # The parsed record (original names) serializes back to the same bytes.
    assert records.serialize_example(parsed_v1) == v1


def test_records_without_next_sentence_labels_read_as_zero(tmp_path):
    rng = np.random.default_rng(2)
    path = write(tmp_path, "a.tfrecord", [make_row(rng, with_label=False) for _ in range(3)])
    source = TFRecordDataSource([path])
    spec = records.inspect_records(source)
    assert not spec.has_next_sentence_labels
    dataset = records.record_rows(source, seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE)
    assert [int(row["next_sentence_labels"]) for row in dataset] == [0, 0, 0]
    records.check_records_match(spec, seq_length=16, max_predictions=4, files_desc="f")
    with pytest.raises(ConfigError, match="no next_sentence_labels.*use_next_sentence_label=False"):
        records.check_records_match(
            spec, seq_length=16, max_predictions=4, files_desc="f", use_next_sentence_label=True
        )


def test_check_records_match_names_both_values_and_the_fix():
    spec = records.RecordSpec(512, 76, False, True, ())
    records.check_records_match(spec, seq_length=512, max_predictions=76, files_desc="x")
    with pytest.raises(ConfigError) as error:
        records.check_records_match(
            spec, seq_length=128, max_predictions=20, files_desc="data.tfrecord_files"
        )
    message = str(error.value)
    assert message.startswith("data.tfrecord_files: the records have seq_length 512")
    assert "data.seq_length is 128" in message and "--config.data.seq_length=512" in message
    assert "max_predictions_per_seq=76" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"max_predictions_per_seq 76 .* is 20; set --config"):
        records.check_records_match(spec, seq_length=512, max_predictions=20, files_desc="x")


def test_files_that_disagree_are_refused_naming_both(tmp_path):
    rng = np.random.default_rng(3)
    short = write(tmp_path, "short.tfrecord", [make_row(rng, seq_length=16)])
    long = write(tmp_path, "long.tfrecord", [make_row(rng, seq_length=32)])
    fewer = write(tmp_path, "fewer.tfrecord", [make_row(rng, max_predictions=3)])
    with pytest.raises(DataError, match=f"{short} has seq_length 16 but {long} has 32"):
        records.inspect_records(TFRecordDataSource([short, long]))
    with pytest.raises(DataError, match=f"{short} has max_predictions 4 but {fewer} has 3"):
        records.inspect_records(TFRecordDataSource([short, fewer]))
    # Reading past the first record still checks every record's shape.
    mixed = write(tmp_path, "mixed.tfrecord", [make_row(rng), make_row(rng, seq_length=32)])
    dataset = records.record_rows(
        TFRecordDataSource([mixed]), seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE
    )
    dataset[0]
    with pytest.raises(DataError, match=f"{mixed} record 1: has seq_length 32"):
        dataset[1]


def test_empty_files_are_skipped_but_no_records_is_an_error(tmp_path):
    rng = np.random.default_rng(4)
    empty = write(tmp_path, "empty.tfrecord", [])
    full = write(tmp_path, "full.tfrecord", [make_row(rng)])
    assert records.inspect_records(TFRecordDataSource([empty, full])).seq_length == 16
    with pytest.raises(DataError, match="hold no records"):
        records.inspect_records(TFRecordDataSource([empty]))


def test_corrupt_record_is_a_data_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(5)
    path = write(tmp_path, "a.tfrecord", [make_row(rng) for _ in range(2)])
    with open(path, "r+b") as file:
        file.seek(20)  # Inside the first record's data.
        byte = file.read(1)
        file.seek(20)
        file.write(bytes([byte[0] ^ 0xFF]))
    dataset = records.record_rows(
        TFRecordDataSource([path]), seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE
    )
    dataset[1]
    with pytest.raises(DataError, match=f"{path}: corrupt record"):
        dataset[0]


def test_records_that_are_not_examples_are_data_errors(tmp_path):
    rng = np.random.default_rng(6)
    good = write(tmp_path, "good.tfrecord", [make_row(rng)])
    junk = write_raw(
        tmp_path / "junk.tfrecord", [records.serialize_example(make_row(rng)), b"\xff"]
    )
    source = TFRecordDataSource([good, junk])
    dataset = records.record_rows(source, seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE)
    with pytest.raises(DataError) as error:
        dataset[2]
    message = str(error.value)
    assert message.startswith(f"{junk} record 1: cannot be parsed as tf.train.Example")
    assert "is not a BERT pretraining TFRecord" in message and "\n" not in message

    # A valid Example with other features (e.g. a text dataset) is refused too.
    import tensorflow as tf

    text = tf.train.Example(
        features=tf.train.Features(
            feature={"text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"hi"]))}
        )
    )
    other = write_raw(tmp_path / "text.tfrecord", [text.SerializeToString()])
    with pytest.raises(DataError, match=f"{other} record 0: has no input_ids / input_word_ids"):
        records.inspect_records(TFRecordDataSource([other]))
    with pytest.raises(DataError, match="record 7: has no input_ids"):
        records.parse_example(text.SerializeToString(), where="record 7")


def test_token_ids_beyond_the_vocab_name_the_record_and_the_fix(tmp_path):
    rng = np.random.default_rng(7)
    first = write(tmp_path, "a.tfrecord", [make_row(rng) for _ in range(2)])
    rows = [make_row(rng) for _ in range(3)]
    rows[1]["input_word_ids"][3] = 31000
    rows[2]["masked_lm_ids"][0] = 30522
    second = write(tmp_path, "b.tfrecord", rows)
    dataset = records.record_rows(
        TFRecordDataSource([first, second]), seq_length=16, max_predictions=4, vocab_size=30522
    )
    dataset[2]
    with pytest.raises(DataError) as error:
        dataset[3]
    message = str(error.value)
    assert message.startswith(f"{second} record 1: token id 31000 >= model.vocab_size 30522")
    assert "--config.model.vocab_size" in message
    with pytest.raises(DataError, match=f"{second} record 2: token id 30522 >= model"):
        dataset[4]


def test_record_rows_shuffles_and_pickles_for_grain_workers(tmp_path):
    rng = np.random.default_rng(8)
    rows = [make_row(rng) for _ in range(10)]
    path = write(tmp_path, "a.tfrecord", rows)
    dataset = records.record_rows(
        TFRecordDataSource([path]), seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE
    )
    restored = pickle.loads(pickle.dumps(dataset))
    shuffled_rows = restored.shuffle(seed=3)
    shuffled = [shuffled_rows[i]["input_word_ids"].tolist() for i in range(len(rows))]
    assert sorted(shuffled) == sorted(row["input_word_ids"].tolist() for row in rows)
    assert shuffled != [row["input_word_ids"].tolist() for row in rows]


def test_write_records_leaves_nothing_when_it_fails(tmp_path):
    rng = np.random.default_rng(9)

    def rows():
        yield make_row(rng)
        raise RuntimeError("boom")

    path = str(tmp_path / "out" / "a.tfrecord")
    with pytest.raises(RuntimeError, match="boom"):
        records.write_records(path, rows())
    assert os.listdir(tmp_path / "out") == []


def gzip_file(path):
    """Writes `path + '.gz'`, the gzip-compressed copy of `path`; returns its path."""
    with open(path, "rb") as file, gzip.open(path + ".gz", "wb") as zipped:
        zipped.write(file.read())
    return path + ".gz"


def test_gzip_files_give_the_same_batches_and_resume_exactly(tmp_path):
    import json

    from mlm.data.pipeline import build_row_dataset

    rng = np.random.default_rng(10)
    paths = [
        write(tmp_path, f"{name}.tfrecord", [make_row(rng) for _ in range(9)]) for name in "ab"
    ]
    zipped = [gzip_file(path) for path in paths]

    def batches(files):
        source = TFRecordDataSource(files, cache_dir=str(tmp_path / "cache"))
        rows = records.record_rows(source, seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE)
        return iter(build_row_dataset(rows, batch_size=4, seed=5, train=True))

    plain, compressed = batches(paths), batches(zipped)
    for _ in range(5):  # Into the second epoch (18 rows).
        expected, batch = next(plain), next(compressed)
        for key in ROW_KEYS:
            np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    state = json.loads(json.dumps(compressed.get_state()))
    following = [next(compressed) for _ in range(3)]
    resumed = batches(zipped)
    resumed.set_state(state)
    for expected in following:
        batch, uncompressed = next(resumed), next(plain)
        for key in ROW_KEYS:
            np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
            np.testing.assert_array_equal(uncompressed[key], expected[key], err_msg=key)

    # Shapes are checked as for plain files, naming the .gz file.
    mixed = write(tmp_path, "mixed.tfrecord", [make_row(rng), make_row(rng, seq_length=32)])
    source = TFRecordDataSource([gzip_file(mixed)], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="the records have seq_length 16 but data.seq_length"):
        records.check_records_match(
            records.inspect_records(source), seq_length=32, max_predictions=4, files_desc="f"
        )
    dataset = records.record_rows(source, seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE)
    with pytest.raises(DataError, match=f"{mixed}.gz record 1: has seq_length 32"):
        dataset[1]


def test_use_position_id_reads_the_records_positions_and_checks_them(tmp_path):
    rng = np.random.default_rng(11)
    rows = [make_row(rng) for _ in range(2)]
    rows[0]["position_ids"] = np.array([*range(8), *range(8)], np.int32)  # Two packed segments.
    rows[1]["position_ids"] = np.full(16, 40, np.int32)
    path = write(tmp_path, "positions.tfrecord", rows, position_ids=True)
    source = TFRecordDataSource([path])
    spec = records.inspect_records(source)
    records.check_records_match(
        spec, seq_length=16, max_predictions=4, files_desc="f", use_position_id=True
    )
    options = dict(seq_length=16, max_predictions=4, vocab_size=VOCAB_SIZE)
    honoured = records.record_rows(source, max_positions=32, **options)
    np.testing.assert_array_equal(honoured[0]["position_ids"], rows[0]["position_ids"])
    with pytest.raises(DataError, match=r"record 1: position id 40 is outside \[0, model"):
        honoured[1]
    ignored = records.record_rows(source, **options)  # Without data.use_position_id.
    np.testing.assert_array_equal(ignored[0]["position_ids"], np.arange(16))
    plain = write(tmp_path, "plain.tfrecord", [make_row(rng)])
    with pytest.raises(ConfigError, match="the records have no position_ids feature"):
        records.check_records_match(
            records.inspect_records(TFRecordDataSource([plain])),
            seq_length=16,
            max_predictions=4,
            files_desc="f",
            use_position_id=True,
        )
    with pytest.raises(DataError, match="record 0: data.use_position_id needs 16 int64"):
        records.record_rows(TFRecordDataSource([plain]), max_positions=32, **options)[0]
