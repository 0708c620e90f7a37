"""Tests for mlm.data.inputs: files or the built-in corpus, the workdir vocab, and their errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mlm import config as config_lib
from mlm.data.inputs import build_inputs, corpus_files, input_shards
from mlm.errors import ConfigError, DataError

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine stitches later.",
    "every good boy does fine on the long test.",
    "the rain in spain falls mainly on the plain.",
]


def write_corpus(path, num_documents: int) -> str:
    lines = []
    for index in range(num_documents):
        lines.extend(SENTENCES[(index + k) % len(SENTENCES)] for k in range(3))
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def google_vocab(path) -> str:
    """A vocab in the layout of Google's BERT releases: [PAD], [unused..], [UNK]=100, ..."""
    words = sorted({w.strip(".") for s in SENTENCES for w in s.split()} | {"."})
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    path.write_text("\n".join(tokens) + "\n")
    return str(path)


def small_config(**data):
    config = config_lib.base_config()
    config.model.update(vocab_size=200, max_position_embeddings=32)
    config.data.update(seq_length=32, max_predictions_per_seq=4, use_next_sentence_label=False)
    config.data.update(**data)
    config.train.update(global_batch_size=4)
    return config_lib.validate(config)


def test_user_files_with_a_google_vocab(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 40)
    evaluation = write_corpus(tmp_path / "eval.txt", 10)
    vocab = google_vocab(tmp_path / "given_vocab.txt")
    config = small_config(train_files=train, eval_files=evaluation, vocab_file=vocab)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    inputs = build_inputs(config, str(workdir))
    assert (workdir / "vocab.txt").read_text() == (tmp_path / "given_vocab.txt").read_text()
    assert (inputs.vocab.cls_id, inputs.vocab.sep_id, inputs.vocab.mask_id) == (101, 102, 103)
    batch = next(iter(inputs.train))
    assert batch["input_word_ids"].shape == (4, 32)
    real = batch["input_word_ids"][batch["input_mask"] == 1]
    assert real.max() < inputs.vocab.size
    assert (batch["input_word_ids"][:, 0] == 101).all()  # every row starts with [CLS]
    assert not (real == inputs.vocab.unk_id).any()
    eval_batches = list(iter(inputs.eval))
    assert eval_batches and all(b["masked_lm_weights"].sum() > 0 for b in eval_batches)


def test_builtin_corpus_is_written_into_the_workdir(tmp_path):
    train, evaluation = corpus_files(small_config().data, str(tmp_path))
    assert train == [str(tmp_path / "corpus" / "train.txt")]
    assert evaluation == [str(tmp_path / "corpus" / "eval.txt")]
    assert os.path.getsize(train[0]) > 5 * os.path.getsize(evaluation[0])  # ~90% / ~10%


def test_trained_vocab_is_reused_on_the_next_run(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 40)
    config = small_config(train_files=train)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    first = build_inputs(config, str(workdir))
    (workdir / "vocab.txt").write_text((workdir / "vocab.txt").read_text() + "zzzextra\n")
    second = build_inputs(config, str(workdir))
    assert second.vocab.size == first.vocab.size + 1
    assert first.eval is None  # train files only: no eval set
    a, b = next(iter(first.train)), next(iter(second.train))
    np.testing.assert_array_equal(a["input_mask"], b["input_mask"])


def test_vocab_larger_than_the_model_is_refused(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 40)
    vocab = google_vocab(tmp_path / "vocab.txt")
    config = config_lib.base_config()
    config.model.update(vocab_size=50, max_position_embeddings=32)
    config.data.update(seq_length=32, max_predictions_per_seq=4, train_files=train)
    config.data.vocab_file = vocab
    with pytest.raises(DataError, match=r"tokens but model.vocab_size is 50.*vocab_size="):
        build_inputs(config_lib.validate(config), str(tmp_path))


@pytest.mark.parametrize(
    "data,error,message",
    [
        (dict(train_files="/nonexistent/*.txt"), DataError, r"/nonexistent/\*\.txt"),
        (dict(eval_files="x.txt"), ConfigError, "data.train_files is empty"),
    ],
)
def test_bad_file_settings(tmp_path, data, error, message):
    with pytest.raises(error, match=message):
        build_inputs(small_config(**data), str(tmp_path))


def test_missing_vocab_file_is_named(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 40)
    config = small_config(train_files=train, vocab_file=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="missing.txt"):
        build_inputs(config, str(tmp_path))


def test_fixed_input_shards_give_the_same_global_batches_for_any_process_count(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 40)
    config = small_config(train_files=train, input_shards=2)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    one_process = next(iter(build_inputs(config, str(workdir)).train))
    parts = [
        next(iter(build_inputs(config, str(workdir), shard_index=i, shard_count=2).train))
        for i in range(2)
    ]
    assert one_process["input_word_ids"].shape == (4, 32)
    assert parts[0]["input_word_ids"].shape == (2, 32)
    for key, value in one_process.items():
        np.testing.assert_array_equal(value, np.concatenate([p[key] for p in parts]), key)


@pytest.mark.parametrize(
    "shards,processes,batch,message",
    [(3, 2, 6, "multiple of the 2 processes"), (4, 1, 6, r"divisible by data.input_shards \(4\)")],
)
def test_input_shards_must_split_evenly(shards, processes, batch, message):
    with pytest.raises(ConfigError, match=message):
        input_shards(shards, batch, 0, processes)


# --------------------------------------------------------------------- the workdir's vocab.txt

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = sorted({w.strip(".") for s in SENTENCES for w in s.split()} | {"."})


def write_vocab(path, tokens) -> str:
    path.write_text("\n".join(tokens) + "\n")
    return str(path)


def fake_checkpoint(workdir):
    """A finished step as `mlm.checkpoint.has_checkpoint` sees one (orbax names steps by number)."""
    (workdir / "checkpoints" / "3").mkdir(parents=True)


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            lambda path: write_vocab(path, SPECIALS[:4] + WORDS),
            r"bad\.txt: the special token \[MASK\] is missing",
        ),
        (
            lambda path: path.write_bytes(("\n".join(SPECIALS) + "\ncafé\n").encode("latin-1")),
            r"bad\.txt:6: not valid UTF-8 \(invalid continuation byte at byte 3 of the line\)",
        ),
        (lambda path: path.write_bytes(b""), r"vocab file '.*bad\.txt' is empty"),
        (
            lambda path: write_vocab(path, SPECIALS + WORDS + ["the"]),
            r"bad\.txt:\d+: duplicate token 'the' \(first on line \d+\)",
        ),
        (
            lambda path: write_vocab(path, SPECIALS + [f"w{i}" for i in range(300)]),
            r"data\.vocab_file '.*bad\.txt' has 305 tokens but model\.vocab_size is 200",
        ),
    ],
    ids=["no_mask", "latin1", "empty", "duplicate", "too_big"],
)
def test_rejected_vocab_file_is_not_copied_so_the_corrected_run_works(tmp_path, bad, message):
    train = write_corpus(tmp_path / "train.txt", 40)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    bad(tmp_path / "bad.txt")
    with pytest.raises(DataError, match=message) as caught:
        build_inputs(small_config(train_files=train, vocab_file=str(tmp_path / "bad.txt")), workdir)
    assert "\n" not in str(caught.value)
    assert os.listdir(workdir) == []
    good = write_vocab(tmp_path / "good.txt", SPECIALS + WORDS)
    inputs = build_inputs(small_config(train_files=train, vocab_file=good), str(workdir))
    assert inputs.vocab.tokens == SPECIALS + WORDS
    assert (workdir / "vocab.txt").read_text() == (tmp_path / "good.txt").read_text()


def test_without_a_checkpoint_the_vocab_of_this_command_wins(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 40)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    first = write_vocab(tmp_path / "first.txt", SPECIALS + WORDS)
    second = write_vocab(tmp_path / "second.txt", SPECIALS + WORDS[::-1])
    build_inputs(small_config(train_files=train, vocab_file=first), str(workdir))
    # The run stopped before its first checkpoint; the rerun gives another vocab.
    inputs = build_inputs(small_config(train_files=train, vocab_file=second), str(workdir))
    assert inputs.vocab.tokens == SPECIALS + WORDS[::-1]
    assert (workdir / "vocab.txt").read_text() == (tmp_path / "second.txt").read_text()
    # And then none: a vocab is trained (and recorded as such).
    trained = build_inputs(small_config(train_files=train), str(workdir)).vocab
    assert trained.tokens != SPECIALS + WORDS[::-1] and trained.tokens[:5] == SPECIALS
    assert (workdir / "vocab_settings.json").exists()
    # A vocab trained with other settings (other train files) is trained again; the same
    # settings reuse it as it is.
    (tmp_path / "other.txt").write_text("zebras graze quietly near wide rivers.\n" * 40)
    other = small_config(train_files=str(tmp_path / "other.txt"))
    retrained = build_inputs(other, str(workdir)).vocab
    assert retrained.tokens != trained.tokens and "zebras" in retrained.tokens
    with open(workdir / "vocab.txt", "a") as file:
        file.write("zzzextra\n")
    again = build_inputs(other, str(workdir)).vocab
    assert again.tokens == retrained.tokens + ["zzzextra"]
    # A given vocab replaces a trained one, and its record goes with it.
    build_inputs(small_config(train_files=train, vocab_file=first), str(workdir))
    assert (workdir / "vocab.txt").read_text() == (tmp_path / "first.txt").read_text()
    assert not (workdir / "vocab_settings.json").exists()
    # Even a workdir vocab that cannot be read (a damaged file) is replaced.
    (workdir / "vocab.txt").write_bytes(b"\x89PNG\r\n")
    build_inputs(small_config(train_files=train, vocab_file=second), str(workdir))
    assert (workdir / "vocab.txt").read_text() == (tmp_path / "second.txt").read_text()


def test_with_a_checkpoint_another_vocab_is_refused_naming_both(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 40)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    first = write_vocab(tmp_path / "first.txt", SPECIALS + WORDS)
    build_inputs(small_config(train_files=train, vocab_file=first), str(workdir))
    fake_checkpoint(workdir)
    before = (workdir / "vocab.txt").read_text()
    other = write_vocab(tmp_path / "other.txt", SPECIALS + WORDS[::-1])
    with pytest.raises(
        DataError,
        match=rf"^data\.vocab_file: the vocab '{other}' differs from '{workdir}/vocab\.txt', "
        r"the vocab the workdir's checkpoints were trained with; give that vocab \(the same "
        r"tokens\) or use a new --workdir$",
    ):
        build_inputs(small_config(train_files=train, vocab_file=other), str(workdir))
    assert (workdir / "vocab.txt").read_text() == before
    # The same tokens in another file are fine, and without data.vocab_file the workdir's
    # vocab is kept (not trained again: the checkpoints were trained with it).
    copy = write_vocab(tmp_path / "copy.txt", SPECIALS + WORDS)
    build_inputs(small_config(train_files=train, vocab_file=copy), str(workdir))
    kept = build_inputs(small_config(train_files=train), str(workdir)).vocab
    assert kept.tokens == SPECIALS + WORDS
    assert (workdir / "vocab.txt").read_text() == before


def test_train_cli_refuses_a_vocab_that_is_not_utf8_and_copies_nothing(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 40)
    (tmp_path / "latin.txt").write_bytes(("\n".join(SPECIALS) + "\nnaïve\n").encode("latin-1"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "mlm.train", "--config", f"{root}/configs/bert_tiny.py"]
    command += ["--workdir", "workdir", f"--config.data.train_files={train}"]
    command += ["--config.data.vocab_file=latin.txt", "--config.data.use_next_sentence_label=False"]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: latin.txt:6: not valid UTF-8 (invalid continuation byte at byte 2 of the line); "
        "re-encode the file as UTF-8 or give a BERT vocab.txt"
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "workdir" / "vocab.txt").exists()


def test_tfds_vocab_sample_is_written_only_when_a_vocab_is_trained(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    import tfds_testing  # Registers the builder.

    data_dir = tfds_testing.build_tiny_text(str(tmp_path / "tfds"), "tfrecord")
    config = small_config(tfds_name=tfds_testing.NAME, tfds_data_dir=data_dir)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    first = build_inputs(config, str(workdir), need_eval=False).vocab
    assert (workdir / "vocab_sample.txt").exists() and "river" in first.tokens
    (workdir / "vocab_sample.txt").unlink()
    again = build_inputs(config, str(workdir), need_eval=False).vocab
    assert again.tokens == first.tokens and not (workdir / "vocab_sample.txt").exists()
    other = small_config(tfds_name=tfds_testing.NAME, tfds_data_dir=data_dir, lowercase=False)
    cased = build_inputs(other, str(workdir), need_eval=False).vocab  # Trained again: cased.
    assert (workdir / "vocab_sample.txt").exists() and "River" in cased.tokens
