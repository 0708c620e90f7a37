"""Tests for the synthetic data source (`data.synthetic=True`, mlm.data.synthetic)."""

import itertools
import os

import ml_collections
import numpy as np
import pytest

from mlm import config as config_lib
from mlm.data import synthetic
from mlm.data.inputs import build_inputs
from mlm.data.pipeline import prefetch
from mlm.errors import ConfigError
from mlm.train import train_and_evaluate

KEYS = {
    "input_word_ids",
    "input_mask",
    "input_type_ids",
    "packed_segment_ids",
    "position_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "masked_lm_weights",
    "next_sentence_labels",
}


def tiny_config(next_sentence: bool = False, **data) -> ml_collections.ConfigDict:
    config = config_lib.base_config()
    config.model.update(
        vocab_size=64,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    config.data.update(
        synthetic=True,
        seq_length=32,
        max_predictions_per_seq=5,
        use_next_sentence_label=next_sentence,
        **data,
    )
    config.train.update(global_batch_size=8, num_steps=2, log_every=1, eval_every=2, eval_steps=2)
    config.train.update(checkpoint_every=2, best_metric="")
    config.optimizer.update(learning_rate=1e-3, warmup_steps=1)
    return config_lib.validate(config)


def take(dataset, count):
    return list(itertools.islice(dataset, count))


def same(first, second):
    return all(
        a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
        for a, b in zip(first, second, strict=True)
    )


@pytest.mark.parametrize("next_sentence", [True, False])
def test_batches_have_the_contract_shapes_dtypes_and_ranges(next_sentence):
    config = tiny_config(next_sentence)
    dataset = synthetic.synthetic_dataset(config, train=True, batch_size=8)
    for batch in take(dataset, 3):
        assert set(batch) == KEYS
        for key in KEYS - {"masked_lm_positions", "masked_lm_ids", "masked_lm_weights"}:
            expected = (8,) if key == "next_sentence_labels" else (8, 32)
            assert batch[key].shape == expected and batch[key].dtype == np.int32, key
        for key in ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights"):
            assert batch[key].shape == (8, 5)
        assert batch["masked_lm_weights"].dtype == np.float32
        assert batch["masked_lm_positions"].dtype == batch["masked_lm_ids"].dtype == np.int32
        mask, ids = batch["input_mask"], batch["input_word_ids"]
        lengths = mask.sum(1)
        assert (mask == (np.arange(32)[None] < lengths[:, None])).all()  # padding at the end
        assert (lengths >= 2).all() and (batch["packed_segment_ids"] == mask).all()
        assert (ids[:, 0] == synthetic.CLS_ID).all() and ((ids == 0) == (mask == 0)).all()
        assert (ids[:, 1:][mask[:, 1:] == 1] >= 5).all() and (ids < 64).all()
        assert (batch["position_ids"] == np.arange(32)).all()
        weights = batch["masked_lm_weights"]
        counts = weights.sum(1).astype(int)
        assert ((weights == 1) | (weights == 0)).all() and (counts >= 1).all()
        for row in range(8):
            positions = batch["masked_lm_positions"][row]
            assert (weights[row, : counts[row]] == 1).all()  # real slots first
            chosen = positions[: counts[row]]
            assert len(set(chosen)) == counts[row] and (chosen > 0).all()
            assert (chosen < lengths[row]).all() and (np.diff(chosen) > 0).all()
        targets = batch["masked_lm_ids"]
        assert ((targets >= 5) == (weights == 1)).all() and (targets < 64).all()
        labels, types = batch["next_sentence_labels"], batch["input_type_ids"]
        assert set(np.unique(labels)) <= {0, 1} and set(np.unique(types)) <= {0, 1}
        if not next_sentence:
            assert not labels.any() and not types.any()
    if next_sentence:
        labels = np.concatenate([b["next_sentence_labels"] for b in take(dataset, 4)])
        assert 0 < labels.sum() < len(labels)


def test_stream_is_deterministic_and_differs_by_shard_and_split():
    config = tiny_config()

    def stream(train=True, **part):
        return synthetic.synthetic_dataset(config, train=train, batch_size=4, **part)

    assert same(take(stream(), 3), take(stream(), 3))
    first, second = take(stream(), 2)
    assert not (first["input_word_ids"] == second["input_word_ids"]).all()
    shard0 = take(stream(shard_index=0, shard_count=2), 1)[0]
    shard1 = take(stream(shard_index=1, shard_count=2), 1)[0]
    assert not (shard0["input_word_ids"] == shard1["input_word_ids"]).all()
    evaluation = take(stream(train=False), 1)[0]
    assert not (evaluation["input_word_ids"] == first["input_word_ids"]).all()


def test_build_inputs_gives_per_process_batches_without_vocab_or_files(tmp_path):
    config = tiny_config(input_shards=2)
    inputs = [
        build_inputs(config, str(tmp_path), shard_index=index, shard_count=2) for index in (0, 1)
    ]
    assert all(i.vocab is None and i.source == "data.synthetic" for i in inputs)
    assert os.listdir(tmp_path) == []  # No vocab, no corpus written.
    rows = [take(i.train, 1)[0] for i in inputs]
    assert rows[0]["input_word_ids"].shape == (4, 32)  # global 8 / 2 processes
    assert not (rows[0]["input_word_ids"] == rows[1]["input_word_ids"]).all()
    # One process reading both shards sees the same global batch as the two processes.
    whole = take(build_inputs(config, str(tmp_path)).train, 1)[0]
    assert all((whole[k] == np.concatenate([r[k] for r in rows])).all() for k in KEYS)
    # Eval: train.eval_steps batches, the same on every iter().
    evaluation = inputs[0].eval
    assert len(list(evaluation)) == 2 and same(list(evaluation), list(evaluation))
    only_train = build_inputs(config, str(tmp_path), need_eval=False)
    assert only_train.eval is None and only_train.train is not None


def test_eval_steps_zero_gives_the_default_eval_set():
    config = tiny_config()
    with config.unlocked():
        config.train.eval_steps = 0
    dataset = synthetic.synthetic_dataset(config, train=False, batch_size=2)
    assert len(list(dataset)) == synthetic.DEFAULT_EVAL_BATCHES


@pytest.mark.parametrize("prefetch_batches", [0, 2])
def test_iterator_state_resumes_batch_exactly(tmp_path, prefetch_batches):
    train = build_inputs(tiny_config(), str(tmp_path), need_eval=False).train
    iterator = iter(prefetch(train, 0, prefetch_batches))
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 2)
    resumed = iter(prefetch(train, 0, prefetch_batches))
    resumed.set_state(state)
    assert same(take(resumed, 2), expected)


@pytest.mark.parametrize(
    "field, value",
    [
        ("train_files", "corpus/*.txt"),
        ("prepared_dir", "prepared"),
        ("tfds_name", "wikipedia/20230601.en"),
        ("hf_dataset", "wikitext"),
        ("tfrecord_files", "out/*.tfrecord"),
    ],
)
def test_synthetic_with_another_source_is_one_line_config_error(field, value):
    config = config_lib.base_config()
    config.data.synthetic = True
    config.data[field] = value
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config)
    message = str(error.value)
    assert "\n" not in message and f"data.{field} and data.synthetic are both set" in message
    assert "set one data source" in message


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(data=dict(vocab_file="vocab.txt")), "clear data.vocab_file"),
        (dict(model=dict(vocab_size=5)), "model.vocab_size > 5"),
    ],
)
def test_synthetic_refuses_a_vocab_file_and_a_tiny_vocab(fields, expected):
    config = config_lib.base_config()
    config.data.synthetic = True
    for section, values in fields.items():
        config[section].update(values)
    with pytest.raises(ConfigError, match=expected) as error:
        config_lib.validate(config)
    assert "\n" not in str(error.value)


def test_training_runs_on_synthetic_data(tmp_path):
    workdir = str(tmp_path / "run")
    results = train_and_evaluate(tiny_config(), workdir)
    assert np.isfinite(results["train"]["loss"]) and np.isfinite(results["eval"]["validation_loss"])
    assert results["eval"]["eval_examples"] == 16  # train.eval_steps x 8 rows
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(workdir, "vocab.txt"))


def test_the_step_benchmark_times_the_batches_training_reads(tmp_path):
    config = tiny_config()
    train = build_inputs(config, str(tmp_path), need_eval=False).train
    benched = synthetic.synthetic_batches(config, synthetic.DEFAULT_REAL_FRACTION, 3)
    assert same(benched, take(train, 3))
