"""Tests for model.cls_heads (mlm.heads): the next-sentence head as before, extra heads, errors."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mlm import config as config_lib
from mlm import task
from mlm.errors import ConfigError, DataError
from mlm.interop import layout
from mlm.model import dense

SEQ, PRED, VOCAB, HIDDEN = 16, 4, 50, 16
TOPIC = dict(name="topic", num_classes=3, inner_dim=8, dropout_rate=0.1, cls_token_idx=1)


def tiny_config(cls_heads=(), nsp=True, **data) -> ml_collections.ConfigDict:
    config = config_lib.base_config()
    config.model.update(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        cls_heads=list(cls_heads),
    )
    config.data.update(
        seq_length=SEQ, max_predictions_per_seq=PRED, use_next_sentence_label=nsp, **data
    )
    config.train.update(global_batch_size=4, num_steps=4, log_every=2, eval_every=4, eval_steps=1)
    config.train.update(checkpoint_every=4)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
    return config


def make_row(rng):
    length = int(rng.integers(8, SEQ + 1))
    row = {
        "input_word_ids": np.zeros(SEQ, np.int32),
        "input_mask": np.zeros(SEQ, np.int32),
        "input_type_ids": np.zeros(SEQ, np.int32),
        "masked_lm_positions": np.sort(rng.choice(np.arange(1, length - 1), PRED, False)),
        "masked_lm_ids": rng.integers(5, VOCAB, PRED).astype(np.int32),
        "masked_lm_weights": np.ones(PRED, np.float32),
        "next_sentence_labels": np.int32(rng.integers(0, 2)),
        "topic_labels": np.int32(rng.integers(0, 3)),
    }
    row["input_word_ids"][:length] = rng.integers(5, VOCAB, length)
    row["input_mask"][:length] = 1
    row["input_type_ids"][length // 2 : length] = 1
    return row


def batch_of(rows):
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    batch["packed_segment_ids"] = batch["input_mask"].copy()
    batch["position_ids"] = np.tile(np.arange(SEQ, dtype=np.int32), (len(rows), 1))
    return batch


class OldNextSentenceHead(nn.Module):
    """mlm's fixed next-sentence head before model.cls_heads, verbatim, as the reference."""

    @nn.compact
    def __call__(self, sequence_output):
        layer = functools.partial(dense, kernels=task.kernels.select("auto", "cpu"))
        pooled = jnp.tanh(layer(HIDDEN, name="pooler")(sequence_output[:, 0]))
        return layer(2, name="classifier")(pooled).astype(jnp.float32)


def init_params(config):
    model = task.build_model(config_lib.validate(config))
    batch = task.dummy_batch(1, SEQ, PRED)
    return model, model.init(jax.random.PRNGKey(0), batch, deterministic=True)["params"]


def shapes(tree):
    return jax.tree.map(np.shape, tree)


def test_default_and_explicit_next_sentence_heads_are_the_old_head():
    model, params = init_params(tiny_config())
    explicit_model, explicit = init_params(tiny_config([dict(name="next_sentence", num_classes=2)]))
    assert set(params) == {"encoder", "mlm_head", "nsp_head"}
    assert shapes(params["nsp_head"]) == {
        "pooler": {"kernel": (HIDDEN, HIDDEN), "bias": (HIDDEN,)},
        "classifier": {"kernel": (HIDDEN, 2), "bias": (2,)},
    }
    # The same tree and the same values: a Model Garden config maps onto old checkpoints.
    jax.tree.map(np.testing.assert_array_equal, params, explicit)
    batch = batch_of([make_row(np.random.default_rng(i)) for i in range(4)])
    outputs = model.apply({"params": params}, batch, deterministic=True)
    assert set(outputs) == {"mlm_logits", "nsp_logits"}
    sequence = model.apply({"params": params}, batch, deterministic=True, method="encode")
    old = OldNextSentenceHead().apply({"params": params["nsp_head"]}, sequence)
    np.testing.assert_array_equal(outputs["nsp_logits"], old)
    np.testing.assert_array_equal(
        outputs["nsp_logits"],
        explicit_model.apply({"params": explicit}, batch, deterministic=True)["nsp_logits"],
    )
    sums = task.eval_step(params, batch, model=model)
    assert sorted(sums) == sorted(
        ["lm_loss_sum", "lm_weight_sum", "lm_correct_sum"]
        + ["nsp_loss_sum", "nsp_correct_sum", "nsp_count"]
    )
    metrics = task.reduce_aggregated_logs(task.aggregate_logs(None, jax.device_get(sums)))
    assert list(metrics) == [
        "lm_example_loss",
        "masked_lm_accuracy",
        "next_sentence_loss",
        "next_sentence_accuracy",
        "validation_loss",
    ]
    assert metrics["validation_loss"] == metrics["lm_example_loss"] + metrics["next_sentence_loss"]


def log_softmax_loss(logits, labels):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


def test_a_second_head_pools_its_token_adds_its_loss_and_drops_out():
    config = tiny_config([dict(name="next_sentence", num_classes=2), TOPIC])
    config.data.tfrecord_files = "unused.tfrecord"
    model, params = init_params(config)
    assert shapes(params["cls_heads"]) == {
        "topic": {
            "pooler": {"kernel": (HIDDEN, 8), "bias": (8,)},
            "classifier": {"kernel": (8, 3), "bias": (3,)},
        }
    }
    batch = batch_of([make_row(np.random.default_rng(i)) for i in range(4)])
    outputs = model.apply({"params": params}, batch, deterministic=True)
    sequence = model.apply({"params": params}, batch, deterministic=True, method="encode")
    head = jax.device_get(params["cls_heads"]["topic"])
    pooled = np.tanh(np.asarray(sequence)[:, 1] @ head["pooler"]["kernel"] + head["pooler"]["bias"])
    expected = pooled @ head["classifier"]["kernel"] + head["classifier"]["bias"]
    np.testing.assert_allclose(outputs["topic_logits"], expected, rtol=1e-5, atol=1e-6)

    value, sums = task.loss(params, batch, None, model=model)
    lm = float(sums["lm_loss_sum"] / sums["lm_weight_sum"])
    nsp = log_softmax_loss(outputs["nsp_logits"], batch["next_sentence_labels"])
    topic = log_softmax_loss(outputs["topic_logits"], batch["topic_labels"])
    np.testing.assert_allclose(float(value), lm + nsp + topic, rtol=1e-5)
    metrics = task.reduce_aggregated_logs(task.aggregate_logs(None, jax.device_get(sums)))
    np.testing.assert_allclose(metrics["topic_loss"], topic, rtol=1e-5)
    assert metrics["topic_accuracy"] == np.mean(
        np.argmax(outputs["topic_logits"], -1) == batch["topic_labels"]
    )
    # Dropout (rate 0.1 in topic, none in next_sentence) acts only with a dropout rng.
    dropped = model.apply(
        {"params": params}, batch, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}
    )
    assert not np.array_equal(dropped["topic_logits"], outputs["topic_logits"])
    np.testing.assert_array_equal(dropped["nsp_logits"], outputs["nsp_logits"])


def test_the_shipped_two_head_config_trains_with_per_head_metrics(tmp_path):
    """configs/bert_base_preln_two_heads.py, shrunk: pre-LN, factorised embeddings, cosine."""
    from mlm import config_file, train
    from mlm.data import pretraining_records as records

    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("eval", 8)):
        rows = [make_row(rng) for _ in range(count)]
        records.write_records(str(tmp_path / f"{split}.tfrecord"), rows, labels=["topic_labels"])
    config = config_file.load_config_file("configs/bert_base_preln_two_heads.py")
    assert (config.model.norm_first, config.model.embedding_size) == (True, 128)
    assert config.optimizer.schedule == "cosine"
    assert [head["name"] for head in config.model.cls_heads] == ["next_sentence", "topic"]
    shrunk = tiny_config(
        config.model.cls_heads,
        tfrecord_files=str(tmp_path / "train.tfrecord"),
        eval_tfrecord_files=str(tmp_path / "eval.tfrecord"),
    )
    shrunk.model.update(norm_first=True, embedding_size=8)
    shrunk.optimizer.schedule = "cosine"
    shrunk.train.best_metric = config.train.best_metric
    result = train.train_and_evaluate(shrunk, str(tmp_path / "work"))
    for split in ("train", "eval"):
        for name in ("next_sentence", "topic"):
            assert 0.0 < result[split][f"{name}_loss"] < 5.0
            assert 0.0 <= result[split][f"{name}_accuracy"] <= 1.0
    evaluation = result["eval"]
    np.testing.assert_allclose(
        evaluation["validation_loss"],
        evaluation["lm_example_loss"] + evaluation["next_sentence_loss"] + evaluation["topic_loss"],
        rtol=1e-6,
    )
    assert os.listdir(tmp_path / "work" / "checkpoints_best")  # Best by topic_accuracy.


@pytest.mark.parametrize(
    "heads, data, message",
    [
        ([dict(num_classes=2)], {}, r"model\.cls_heads\[0\] needs 'name'"),
        ([dict(name="next_sentence", num_classes=2, inner=3)], {}, r"unknown field 'inner'"),
        ([dict(name="next-sentence", num_classes=2)], {}, r"must be a Python identifier"),
        ([dict(name="next_sentence", num_classes=1)], {}, r"num_classes must be >= 2, got 1"),
        ([dict(name="next_sentence", num_classes=2, activation="gelu_fast")], {}, r"tanh, "),
        ([dict(name="next_sentence", num_classes=2, dropout_rate=1.0)], {}, r"in \[0, 1\)"),
        ([dict(name="next_sentence", num_classes=2, cls_token_idx=SEQ)], {}, r"data\.seq_length"),
        ([dict(name="next_sentence", num_classes=2)] * 2, {}, r"two heads are named"),
        ([dict(name="lm", num_classes=2)], {}, r"the name 'lm' is reserved"),
        ([TOPIC], {}, r"NAME_labels|topic_labels of data\.tfrecord_files"),
        ([TOPIC], dict(tfrecord_files="x.tfrecord"), r"has no head named next_sentence"),
        (
            [dict(name="next_sentence", num_classes=2)],
            dict(use_next_sentence_label=False),
            r"need data\.use_next_sentence_label=True",
        ),
    ],
)
def test_config_errors(heads, data, message):
    nsp = data.pop("use_next_sentence_label", True)
    config = tiny_config(heads, nsp=nsp, **data)
    with pytest.raises(ConfigError, match=message) as raised:
        config_lib.validate(config)
    assert "\n" not in str(raised.value)


def test_best_metric_may_name_a_head_metric_only_when_the_head_exists():
    config = tiny_config()
    config.train.best_metric = "topic_accuracy"
    with pytest.raises(ConfigError, match="train.best_metric must be one of"):
        config_lib.validate(config)


def test_only_the_next_sentence_head_exports_to_hugging_face():
    fields = config_lib.base_config().model.to_dict()
    layout.check_exportable({**fields, "cls_heads": [dict(name="next_sentence", num_classes=2)]})
    for head in (TOPIC, dict(name="next_sentence", num_classes=3)):
        with pytest.raises(DataError, match=r"^model\.cls_heads head '\w+' has no Hugging Face"):
            layout.check_exportable({**fields, "cls_heads": [head]})


def test_records_must_carry_each_heads_labels_in_range(tmp_path):
    from mlm.data import pretraining_records as records
    from mlm.data.tfrecord_source import TFRecordDataSource

    rng = np.random.default_rng(0)
    plain = str(tmp_path / "plain.tfrecord")
    records.write_records(plain, [make_row(rng)])
    source = TFRecordDataSource([plain])
    with pytest.raises(ConfigError, match="no topic_labels feature, which model.cls_heads head"):
        records.check_records_match(
            records.inspect_records(source),
            seq_length=SEQ,
            max_predictions=PRED,
            files_desc="data.tfrecord_files",
            labels=["topic_labels"],
        )
    bad = str(tmp_path / "bad.tfrecord")
    row = {**make_row(rng), "topic_labels": np.int32(3)}
    records.write_records(bad, [row], labels=["topic_labels"])
    rows = records.record_rows(
        TFRecordDataSource([bad]),
        seq_length=SEQ,
        max_predictions=PRED,
        vocab_size=VOCAB,
        labels=[("topic_labels", 3)],
    )
    with pytest.raises(DataError, match=r"topic_labels 3 is outside \[0, num_classes=3\)"):
        rows[0]
    good = records.record_rows(
        TFRecordDataSource([plain]), seq_length=SEQ, max_predictions=PRED, vocab_size=VOCAB
    )
    assert "topic_labels" not in good[0]


def test_benchmark_and_shape_batches_carry_the_heads_labels(tmp_path):
    """mlm.bench step (synthetic batches) and mlm.aot (dummy batch) feed extra heads too."""
    from mlm import heads
    from mlm.data.synthetic import synthetic_batches

    config = config_lib.validate(
        tiny_config(
            [dict(name="next_sentence", num_classes=2), TOPIC],
            tfrecord_files=str(tmp_path / "x.tfrecord"),
        )
    )
    labels = heads.record_labels(config.model.cls_heads)
    assert labels == (("topic_labels", 3),)
    batch = synthetic_batches(config, 0.94, 1)[0]
    assert batch["topic_labels"].shape == (4,) and set(batch["topic_labels"]) <= {0, 1, 2}
    assert task.dummy_batch(4, SEQ, PRED, labels)["topic_labels"].shape == (4,)
