"""Tests for mlm.data.inputs: files or the built-in corpus, the workdir vocab, and their errors."""

import os

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
