"""Tests for mlm.data.create_pretraining_data: streaming text to BERT pretraining TFRecords."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mlm.data import create_pretraining_data as cpd
from mlm.data import pretraining_records as records
from mlm.data.corpus import expand_globs
from mlm.data.masking import num_to_predict
from mlm.data.tfrecord_source import TFRecordDataSource
from mlm.data.tokenizer import encode_sentences, load_vocab, train_wordpiece
from mlm.errors import ConfigError, DataError

SEQ, PREDICTIONS = 32, 6
SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "ve", "zu", "the", "and"]
# Two topics spelled with disjoint letters, so no WordPiece token is shared between them.
TOPIC_A = ["bead", "cafe", "faded", "decade", "ebb", "facade", "dab"]
TOPIC_B = ["plonk", "pool", "loop", "monk", "knoll", "polo", "mop"]


def pseudo_words(rng, count):
    """Made-up words of 1-4 syllables: too many for a 200-token vocab, so some split into ##."""
    return ["".join(rng.choice(SYLLABLES, rng.integers(1, 5))) for _ in range(count)]


def sentences(rng, words, count):
    return [" ".join(rng.choice(words, rng.integers(3, 12))) + "." for _ in range(count)]


def write_text(path, documents):
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n\n".join("\n".join(document) for document in documents) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text files of 40 random documents and a ~200-token vocab trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = pseudo_words(rng, 150)
    documents = [sentences(rng, words, int(rng.integers(1, 9))) for _ in range(40)]
    files = [write_text(root / "a.txt", documents[:25]), write_text(root / "b.txt", documents[25:])]
    two_topics = write_text(
        root / "topics.txt", [sentences(rng, TOPIC_A, 12), sentences(rng, TOPIC_B, 12)]
    )
    vocab_path = train_wordpiece([*files, two_topics], 200, True, str(root / "vocab.txt"))
    return {"files": files, "two_topics": two_topics, "vocab_path": vocab_path, "root": root}


@pytest.fixture(scope="module")
def vocab(corpus):
    return load_vocab(corpus["vocab_path"], True)


def create(corpus, vocab, out_dir, outputs=("out.tfrecord",), files=None, **options):
    options = {"max_seq_length": SEQ, "max_predictions_per_seq": PREDICTIONS, **options}
    paths = [str(out_dir / name) for name in outputs]
    stats = cpd.create_pretraining_data(files or corpus["files"], paths, vocab, **options)
    return paths, stats


def read(paths):
    source = TFRecordDataSource(paths)
    return [records.parse_example(source[i]) for i in range(len(source))]


def file_bytes(paths):
    return [open(path, "rb").read() for path in paths]


def unmasked(record):
    """The instance's original ids: masked positions restored from masked_lm_ids."""
    ids = record["input_ids"].copy()
    used = record["masked_lm_weights"] > 0
    ids[record["masked_lm_positions"][used]] = record["masked_lm_ids"][used]
    return ids


def test_instances_have_bert_structure_and_masks(corpus, vocab, tmp_path):
    paths, stats = create(corpus, vocab, tmp_path, dupe_factor=3)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    instances = read(paths)
    assert stats["instances"] == len(instances) > 50
    assert stats["documents"] == 40
    assert set(stats["instances_per_file"]) == set(paths)
    specials = set(vocab.special_ids.tolist())
    masked_kinds = {"mask": 0, "random": 0, "kept": 0}
    for record in instances:
        ids, mask, segments = record["input_ids"], record["input_mask"], record["segment_ids"]
        assert ids.shape == mask.shape == segments.shape == (SEQ,)
        assert record["masked_lm_positions"].shape == (PREDICTIONS,)
        length = int(mask.sum())
        np.testing.assert_array_equal(mask, np.arange(SEQ) < length)
        assert not ids[length:].any() and not segments[length:].any()
        original = unmasked(record)[:length]
        assert original[0] == vocab.cls_id and original[-1] == vocab.sep_id
        separators = np.flatnonzero(original == vocab.sep_id)
        assert len(separators) == 2 and vocab.cls_id not in original[1:]
        first_sep = separators[0]
        assert 1 < first_sep < length - 2  # A and B are both non-empty.
        np.testing.assert_array_equal(segments[:length], np.arange(length) > first_sep)
        # Predictions: the BERT count, real slots weight exactly 1, unused slots all 0.
        weights = record["masked_lm_weights"]
        count = num_to_predict(length, 0.15, PREDICTIONS)
        np.testing.assert_array_equal(weights, np.arange(PREDICTIONS) < count)
        positions = record["masked_lm_positions"][:count]
        assert (np.diff(positions) > 0).all() and positions.min() > 0 and positions.max() < length
        assert not record["masked_lm_positions"][count:].any()
        assert not record["masked_lm_ids"][count:].any()
        originals = record["masked_lm_ids"][:count]
        assert not set(originals.tolist()) & specials
        for position, original_id in zip(positions, originals, strict=True):
            if ids[position] == vocab.mask_id:
                masked_kinds["mask"] += 1
            elif ids[position] == original_id:
                masked_kinds["kept"] += 1
            else:
                assert ids[position] not in specials
                masked_kinds["random"] += 1
        # Unmasked positions are untouched text, never [MASK].
        unmasked_positions = np.setdiff1d(np.arange(length), positions)
        assert vocab.mask_id not in ids[unmasked_positions]
    total = sum(masked_kinds.values())
    assert 0.7 < masked_kinds["mask"] / total < 0.9
    assert masked_kinds["random"] > 0 and masked_kinds["kept"] > 0
    labels = [int(record["next_sentence_labels"][0]) for record in instances]
    assert 0.3 < np.mean(labels) < 0.7


def test_output_is_readable_as_rows_and_by_model_garden_tf_data(corpus, vocab, tmp_path):
    import tensorflow as tf

    paths, stats = create(corpus, vocab, tmp_path, dupe_factor=1)
    source = TFRecordDataSource(paths)
    spec = records.inspect_records(source)
    assert (spec.seq_length, spec.max_predictions) == (SEQ, PREDICTIONS)
    dataset = records.record_rows(
        source, seq_length=SEQ, max_predictions=PREDICTIONS, vocab_size=vocab.size
    )
    rows = [dataset[index] for index in range(len(dataset))]
    # Model Garden's pretraining dataloader feature spec.
    name_to_features = {
        "input_ids": tf.io.FixedLenFeature([SEQ], tf.int64),
        "input_mask": tf.io.FixedLenFeature([SEQ], tf.int64),
        "segment_ids": tf.io.FixedLenFeature([SEQ], tf.int64),
        "masked_lm_positions": tf.io.FixedLenFeature([PREDICTIONS], tf.int64),
        "masked_lm_ids": tf.io.FixedLenFeature([PREDICTIONS], tf.int64),
        "masked_lm_weights": tf.io.FixedLenFeature([PREDICTIONS], tf.float32),
        "next_sentence_labels": tf.io.FixedLenFeature([1], tf.int64),
    }
    parsed = [
        tf.io.parse_single_example(data, name_to_features)
        for data in tf.data.TFRecordDataset(paths)
    ]
    assert len(parsed) == len(rows) == stats["instances"]
    for row, example in zip(rows, parsed, strict=True):
        np.testing.assert_array_equal(row["input_word_ids"], example["input_ids"].numpy())
        np.testing.assert_array_equal(row["input_type_ids"], example["segment_ids"].numpy())
        np.testing.assert_array_equal(row["masked_lm_ids"], example["masked_lm_ids"].numpy())
        np.testing.assert_array_equal(
            row["masked_lm_weights"], example["masked_lm_weights"].numpy()
        )
        assert row["next_sentence_labels"] == example["next_sentence_labels"].numpy()[0]


def test_v2_feature_names(corpus, vocab, tmp_path):
    paths, _ = create(corpus, vocab, tmp_path, dupe_factor=1, use_v2_feature_names=True)
    spec = records.inspect_records(TFRecordDataSource(paths))
    assert spec.v2_feature_names
    assert {"input_word_ids", "input_type_ids"} <= set(spec.feature_names)


def test_instances_scale_with_dupe_factor(corpus, vocab, tmp_path):
    _, once = create(corpus, vocab, tmp_path, ("one.tfrecord",), dupe_factor=1)
    _, four = create(corpus, vocab, tmp_path, ("four.tfrecord",), dupe_factor=4)
    assert 3.5 < four["instances"] / once["instances"] < 4.5


def test_seed_decides_the_bytes(corpus, vocab, tmp_path):
    first, _ = create(corpus, vocab, tmp_path, ("a.tfrecord",), dupe_factor=2)
    again, _ = create(corpus, vocab, tmp_path, ("b.tfrecord",), dupe_factor=2)
    other, _ = create(corpus, vocab, tmp_path, ("c.tfrecord",), dupe_factor=2, random_seed=7)
    assert file_bytes(first) == file_bytes(again) != file_bytes(other)


def test_records_go_round_robin_to_the_outputs(corpus, vocab, tmp_path):
    single, _ = create(corpus, vocab, tmp_path, ("all.tfrecord",), dupe_factor=2)
    pair, stats = create(corpus, vocab, tmp_path, ("x.tfrecord", "y.tfrecord"), dupe_factor=2)
    everything = TFRecordDataSource(single)
    halves = [TFRecordDataSource([path]) for path in pair]
    assert len(halves[0]) - len(halves[1]) in (0, 1)
    assert stats["instances_per_file"] == {pair[0]: len(halves[0]), pair[1]: len(halves[1])}
    for index in range(len(everything)):
        assert halves[index % 2][index // 2] == everything[index]


def test_blocks_draw_random_next_sentences_from_their_own_documents(corpus, vocab, tmp_path):
    topic_a = set(np.concatenate(encode_sentences(vocab, TOPIC_A)).tolist())
    topic_b = set(np.concatenate(encode_sentences(vocab, TOPIC_B)).tolist())
    assert not topic_a & topic_b

    def topics(record):
        text = set(unmasked(record)[record["input_mask"] == 1].tolist())
        text -= set(vocab.special_ids.tolist()) | set(encode_sentences(vocab, ["."])[0].tolist())
        return bool(text & topic_a), bool(text & topic_b)

    files = [corpus["two_topics"]]
    apart, _ = create(corpus, vocab, tmp_path, ("1.tfrecord",), files, documents_per_block=1)
    together, _ = create(corpus, vocab, tmp_path, ("2.tfrecord",), files, documents_per_block=2)
    apart_records = read(apart)
    # A block of one document still yields random-next pairs (B from the same document).
    assert {int(record["next_sentence_labels"][0]) for record in apart_records} == {0, 1}
    assert all(topics(record) != (True, True) for record in apart_records)
    assert any(topics(record) == (True, True) for record in read(together))


def test_whole_word_masking_masks_every_piece_of_a_word(corpus, vocab, tmp_path):
    paths, _ = create(corpus, vocab, tmp_path, dupe_factor=2, do_whole_word_mask=True)
    continuation_words = 0
    for record in read(paths):
        used = record["masked_lm_weights"] > 0
        positions = set(record["masked_lm_positions"][used].tolist())
        original = unmasked(record)
        for position in positions:
            following = position + 1
            while following < len(original) and vocab.is_continuation[original[following]]:
                assert following in positions
                continuation_words += 1
                following += 1
            # A piece continues the word before it, unless truncation cut that word off.
            previous = original[position - 1]
            if vocab.is_continuation[original[position]] and previous not in vocab.special_ids:
                assert position - 1 in positions
    assert continuation_words > 0


def test_bad_options_and_inputs_are_one_line_errors(corpus, vocab, tmp_path):
    with pytest.raises(ConfigError, match="--max_predictions_per_seq=40 must be between 1"):
        create(corpus, vocab, tmp_path, max_predictions_per_seq=40)
    with pytest.raises(ConfigError, match="names a file twice"):
        create(corpus, vocab, tmp_path, ("a.tfrecord", "a.tfrecord"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("First line.\ncaf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{latin1}:2: not valid UTF-8"):
        create(corpus, vocab, tmp_path, ("x.tfrecord", "y.tfrecord"), [str(latin1)])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n \n")
    with pytest.raises(DataError, match="hold no text that encodes to tokens"):
        create(corpus, vocab, tmp_path, ("x.tfrecord",), [str(blank)])
    assert sorted(os.listdir(tmp_path)) == ["blank.txt", "latin1.txt"]  # No output, no .tmp.
    with pytest.raises(DataError, match="--input_file: no file matches '.*nothing"):
        expand_globs(f"{corpus['files'][0]},{tmp_path}/nothing*.txt", "--input_file", "")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlm.data.create_pretraining_data", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_records_and_reports_errors_on_one_line(corpus, tmp_path):
    outputs = f"{tmp_path}/a.tfrecord,{tmp_path}/b.tfrecord"
    result = run_cli(
        f"--input_file={corpus['root']}/[ab].txt",
        f"--output_file={outputs}",
        f"--vocab_file={corpus['vocab_path']}",
        "--max_seq_length=32",
        "--max_predictions_per_seq=6",
        "--dupe_factor=2",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote ") and "from 40 documents" in result.stdout
    assert f"{tmp_path}/a.tfrecord: " in result.stdout and len(result.stdout.splitlines()) == 1
    assert "documents" in result.stderr  # The progress bar.
    spec = records.inspect_records(TFRecordDataSource(outputs.split(",")))
    assert (spec.seq_length, spec.max_predictions) == (32, 6)

    missing = run_cli(
        f"--input_file={tmp_path}/nothing*.txt",
        f"--output_file={tmp_path}/c.tfrecord",
        f"--vocab_file={corpus['vocab_path']}",
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: --input_file: no file matches")
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not os.path.exists(f"{tmp_path}/c.tfrecord")


def test_importing_the_modules_does_not_import_tensorflow():
    code = (
        "import sys, mlm.data.create_pretraining_data, mlm.data.pretraining_records; "
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
