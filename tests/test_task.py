"""Tests for mlm.task: the loss against a hand computation, train/eval/inference steps, logs."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mlm import config as config_lib
from mlm import loss_scale, task
from mlm.optim import create_optimizer, learning_rate_schedule

SEQ, PRED, VOCAB = 16, 4, 50


def tiny_config(nsp: bool = False, dropout: float = 0.0) -> ml_collections.ConfigDict:
    config = config_lib.base_config()
    config.model.update(
        vocab_size=VOCAB,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        dropout_rate=dropout,
        attention_dropout_rate=0.0,
    )
    config.data.update(seq_length=SEQ, max_predictions_per_seq=PRED, use_next_sentence_label=nsp)
    config.train.update(global_batch_size=4, num_steps=100)
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
    return config_lib.validate(config)


def random_batch(seed: int, batch_size: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, SEQ + 1, batch_size)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    positions = np.stack([np.sort(rng.choice(np.arange(1, n - 1), PRED, False)) for n in lengths])
    weights = (rng.random((batch_size, PRED)) < 0.7).astype(np.float32)
    weights[:, 0] = 1.0
    return {
        "input_word_ids": (rng.integers(5, VOCAB, (batch_size, SEQ)) * mask).astype(np.int32),
        "input_mask": mask,
        "input_type_ids": np.zeros((batch_size, SEQ), np.int32),
        "packed_segment_ids": mask.copy(),
        "position_ids": np.tile(np.arange(SEQ, dtype=np.int32), (batch_size, 1)),
        "masked_lm_positions": positions.astype(np.int32),
        "masked_lm_ids": rng.integers(5, VOCAB, (batch_size, PRED)).astype(np.int32),
        "masked_lm_weights": weights,
        "next_sentence_labels": rng.integers(0, 2, batch_size).astype(np.int32),
    }


def make_state(config):
    model = task.build_model(config)
    tx = create_optimizer(config.optimizer, config.train.num_steps)
    state = task.init(
        jax.random.PRNGKey(0),
        model=model,
        tx=tx,
        seq_length=config.data.seq_length,
        max_predictions=config.data.max_predictions_per_seq,
    )
    return model, tx, state


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("nsp", [False, True])
def test_loss_matches_hand_computation(nsp):
    config = tiny_config(nsp=nsp)
    model, _, state = make_state(config)
    batch = random_batch(1)
    value, sums = task.loss(state.params, batch, None, model=model)
    outputs = model.apply({"params": state.params}, batch, deterministic=True)
    logp = log_softmax(np.asarray(outputs["mlm_logits"], np.float64))
    picked = np.take_along_axis(logp, batch["masked_lm_ids"][..., None], -1)[..., 0]
    weights = batch["masked_lm_weights"]
    expected = -(picked * weights).sum() / weights.sum()  # per weighted slot, not per slot
    if nsp:
        nsp_logp = log_softmax(np.asarray(outputs["nsp_logits"], np.float64))
        labels = batch["next_sentence_labels"]
        expected += -nsp_logp[np.arange(len(labels)), labels].mean()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert float(sums["lm_weight_sum"]) == weights.sum()
    correct = (logp.argmax(-1) == batch["masked_lm_ids"]) * weights
    assert float(sums["lm_correct_sum"]) == correct.sum()


def test_loss_ignores_zero_weight_slots():
    config = tiny_config()
    model, _, state = make_state(config)
    batch = random_batch(2)
    changed = dict(
        batch, masked_lm_ids=np.where(batch["masked_lm_weights"] > 0, batch["masked_lm_ids"], 7)
    )
    a, _ = task.loss(state.params, batch, None, model=model)
    b, _ = task.loss(state.params, changed, None, model=model)
    assert float(a) == float(b)


def step_fn(config, model, tx, accum):
    schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
    return jax.jit(
        functools.partial(
            task.train_step, model=model, tx=tx, schedule=schedule, grad_accum_steps=accum
        )
    )


def test_gradient_accumulation_equals_full_batch():
    config = tiny_config()
    model, tx, state = make_state(config)
    batch = random_batch(3)
    full_state, full_logs = step_fn(config, model, tx, 1)(state, batch)
    _, _, state = make_state(config)
    accum_state, accum_logs = step_fn(config, model, tx, 2)(state, batch)
    np.testing.assert_allclose(float(accum_logs["loss"]), float(full_logs["loss"]), rtol=1e-5)
    np.testing.assert_allclose(
        float(accum_logs["grad_norm"]), float(full_logs["grad_norm"]), rtol=1e-5
    )
    for a, b in zip(
        jax.tree.leaves(full_state.params), jax.tree.leaves(accum_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert float(accum_logs["lm_weight_sum"]) == batch["masked_lm_weights"].sum()


def test_train_step_lowers_loss_and_counts_steps():
    config = tiny_config(nsp=True)
    model, tx, state = make_state(config)
    train = step_fn(config, model, tx, 1)
    batch = random_batch(4)
    losses = []
    for _ in range(30):
        state, logs = train(state, batch)
        losses.append(float(logs["loss"]))
    assert int(state.step) == 30
    assert losses[-1] < 0.5 * losses[0]
    schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
    assert float(logs["learning_rate"]) == pytest.approx(float(schedule(29)))
    assert {"loss", "grad_norm", "learning_rate", "nsp_loss_sum", "lm_loss_sum"} <= set(logs)


@pytest.mark.parametrize("encoder", ["albert", "modernbert"])
def test_albert_and_modernbert_train_evaluate_and_predict(encoder):
    config = tiny_config(nsp=encoder == "albert", dropout=0.1)
    config.model.encoder = encoder
    if encoder == "albert":
        config.model.embedding_size = 8
        config.model.albert.num_hidden_groups = 1
    else:
        config.model.modernbert.local_attention = 4
    config = config_lib.validate(config)
    model, tx, state = make_state(config)
    if encoder == "albert":  # One block shared by both layers, and the projection up from E.
        assert set(state.params["encoder"]) >= {"layer_0", "embedding_projection"}
        assert "layer_1" not in state.params["encoder"]
    else:
        assert "qkv" in state.params["encoder"]["layer_1"]["attention"]
    train = step_fn(config, model, tx, 1)
    batch = random_batch(4)
    losses = []
    for _ in range(30):
        state, logs = train(state, batch)
        losses.append(float(logs["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    sums = task.eval_step(state.params, batch, model=model)
    _, expected = task.loss(state.params, batch, None, model=model)
    for name in expected:
        assert float(sums[name]) == pytest.approx(float(expected[name]), rel=1e-6)
    outputs = task.inference_step(state.params, batch, model=model)
    assert outputs["mlm_logits"].shape == (4, PRED, VOCAB)
    assert ("nsp_logits" in outputs) == (encoder == "albert")


def test_a_non_finite_update_is_skipped_and_counted():
    config = tiny_config()
    model, tx, state = make_state(config)
    train = step_fn(config, model, tx, 1)
    good = random_batch(5)
    bad = dict(good, masked_lm_weights=np.full_like(good["masked_lm_weights"], np.inf))
    state, logs = train(state, good)
    assert (int(logs["skipped_steps"]), int(logs["consecutive_skips"])) == (0, 0)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for expected in (1, 2):
        state, logs = train(state, bad)
        assert not np.isfinite(float(logs["loss"]))
        assert (int(logs["skipped_steps"]), int(logs["consecutive_skips"])) == (1, expected)
    after = jax.tree.map(np.asarray, (state.params.copy(), state.opt_state))
    # Params and the inner optimizer state are those of the last good update.
    for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 3  # The data moves on.
    state, logs = train(state, good)
    assert (int(logs["skipped_steps"]), int(logs["consecutive_skips"])) == (0, 0)
    aggregated = None
    for step_logs in ({"loss": 1.0, "skipped_steps": 1}, {"loss": 2.0, "skipped_steps": 0}):
        aggregated = task.aggregate_logs(aggregated, step_logs)
    assert task.reduce_aggregated_logs(aggregated)["skipped_steps"] == 1


def test_dropout_uses_the_step_rng():
    config = tiny_config(dropout=0.5)
    model, tx, state = make_state(config)
    train = step_fn(config, model, tx, 1)
    batch = random_batch(5)
    _, logs_a = train(state, batch)
    _, _, state = make_state(config)
    _, logs_b = train(state, batch)
    assert float(logs_a["loss"]) == float(logs_b["loss"])  # same state -> same dropout mask
    eval_loss, _ = task.loss(state.params, batch, None, model=model)
    assert float(logs_a["loss"]) != float(eval_loss)  # but dropout was on


def test_eval_step_and_inference_step():
    config = tiny_config(nsp=True)
    model, _, state = make_state(config)
    batch = random_batch(6)
    sums = task.eval_step(state.params, batch, model=model)
    value, expected = task.loss(state.params, batch, None, model=model)
    for name in expected:
        assert float(sums[name]) == float(expected[name])
    outputs = task.inference_step(state.params, batch, model=model)
    assert outputs["mlm_logits"].shape == (4, PRED, VOCAB)
    assert outputs["nsp_logits"].shape == (4, 2)
    assert outputs["mlm_logits"].dtype == jnp.float32


def test_aggregate_and_reduce_logs_by_hand():
    steps = [
        {
            "loss": 3.0,
            "grad_norm": 1.0,
            "learning_rate": 0.1,
            "lm_loss_sum": 10.0,
            "lm_weight_sum": 4.0,
            "lm_correct_sum": 1.0,
            "nsp_loss_sum": 2.0,
            "nsp_correct_sum": 1.0,
            "nsp_count": 2.0,
        },
        {
            "loss": 1.0,
            "grad_norm": 3.0,
            "learning_rate": 0.2,
            "lm_loss_sum": 2.0,
            "lm_weight_sum": 2.0,
            "lm_correct_sum": 2.0,
            "nsp_loss_sum": 1.0,
            "nsp_correct_sum": 2.0,
            "nsp_count": 2.0,
        },
    ]
    aggregated = None
    for logs in steps:
        aggregated = task.aggregate_logs(aggregated, {k: np.float32(v) for k, v in logs.items()})
    metrics = task.reduce_aggregated_logs(aggregated, global_step=7)
    assert metrics["step"] == 7
    assert metrics["loss"] == pytest.approx(2.0)
    assert metrics["grad_norm"] == pytest.approx(2.0)
    assert metrics["learning_rate"] == pytest.approx(0.2)
    assert metrics["lm_example_loss"] == pytest.approx(12.0 / 6.0)
    assert metrics["masked_lm_accuracy"] == pytest.approx(3.0 / 6.0)
    assert metrics["next_sentence_loss"] == pytest.approx(3.0 / 4.0)
    assert metrics["next_sentence_accuracy"] == pytest.approx(3.0 / 4.0)
    assert "validation_loss" not in metrics


def test_reduce_eval_sums_gives_validation_loss():
    aggregated = task.aggregate_logs(
        None, {"lm_loss_sum": 6.0, "lm_weight_sum": 3.0, "lm_correct_sum": 3.0}
    )
    metrics = task.reduce_aggregated_logs(aggregated, 5)
    assert metrics["validation_loss"] == pytest.approx(2.0)
    assert metrics["masked_lm_accuracy"] == pytest.approx(1.0)
    assert "next_sentence_loss" not in metrics


def make_full_state(config):
    """Model, optimizer and state as the driver builds them (EMA, loss scale from the config)."""
    model = task.build_model(config)
    tx = create_optimizer(config.optimizer, config.train.num_steps)
    return model, tx, task.state_initializer(config, model, tx)(jax.random.PRNGKey(0))


def test_ema_params_after_k_steps_equal_the_closed_form():
    config = tiny_config()
    with config.unlocked():
        config.optimizer.ema_decay = 0.8
    model, tx, state = make_full_state(config)
    schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
    train = jax.jit(
        functools.partial(task.train_step, model=model, tx=tx, schedule=schedule, ema_decay=0.8)
    )
    history = [state.params]
    for seed in range(3):
        state, _ = train(state, random_batch(seed))
        history.append(state.params)
    # ema_k = d^k p_0 + (1 - d) * sum_{i=1..k} d^(k-i) p_i
    d, k = 0.8, 3
    expected = jax.tree.map(
        lambda *ps: d**k * ps[0] + (1 - d) * sum(d ** (k - i) * ps[i] for i in range(1, k + 1)),
        *history,
    )
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])
    # A skipped (non-finite) update leaves the average where it was.
    bad = random_batch(5)
    bad["masked_lm_weights"] = np.full_like(bad["masked_lm_weights"], np.inf)
    skipped, logs = train(state, bad)
    assert int(logs["skipped_steps"]) == 1
    for a, b in zip(
        jax.tree.leaves(skipped.ema_params), jax.tree.leaves(state.ema_params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_float16_overflow_skips_the_step_and_halves_the_scale():
    config = tiny_config()
    with config.unlocked():
        config.model.dtype = "float16"
        config.optimizer.loss_scale_growth_steps = 2
    model, tx, state = make_full_state(config)
    assert float(state.loss_scale.scale) == config.optimizer.loss_scale_init
    schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
    train = jax.jit(
        functools.partial(
            task.train_step, model=model, tx=tx, schedule=schedule, loss_scale_growth_steps=2
        )
    )
    batch = random_batch(1)
    state, logs = train(state, batch)
    assert int(logs["skipped_steps"]) == 0
    # Inject an overflow: at a scale of 2^20 the float16 backward pass overflows.
    big = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(2.0**20)))
    after, logs = train(big, batch)
    assert np.isfinite(float(logs["loss"]))  # The loss itself is fine; its gradients are not.
    assert int(logs["skipped_steps"]) == 1
    assert int(logs["consecutive_skips"]) == 0  # Expected under loss scaling: no divergence.
    assert float(logs["loss_scale"]) == 2.0**20
    assert float(after.loss_scale.scale) == 2.0**19
    for a, b in zip(
        jax.tree.leaves((big.params, big.opt_state)),
        jax.tree.leaves((after.params, after.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(after.step) == int(big.step) + 1
    # Finite steps at a sane scale: applied, and the scale doubles after growth_steps of them.
    state = after.replace(loss_scale=after.loss_scale.replace(scale=jnp.float32(1024.0)))
    scales = []
    for seed in (2, 3, 4):
        state, logs = train(state, random_batch(seed))
        assert int(logs["skipped_steps"]) == 0
        scales.append(float(state.loss_scale.scale))
    assert scales == [1024.0, 2048.0, 2048.0]
    assert np.isfinite(float(logs["loss"]))


def test_float16_fixed_loss_scale_stays_and_its_overflows_count_as_divergence():
    config = tiny_config()
    with config.unlocked():
        config.model.dtype = "float16"
        config.optimizer.loss_scale = 1024.0
        config.optimizer.loss_scale_growth_steps = 1  # Unused: a dynamic scale would double.
    model, tx, state = make_full_state(config)
    assert float(state.loss_scale.scale) == 1024.0
    schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
    growth_steps = loss_scale.growth_steps(config.optimizer)
    fixed = jax.jit(
        functools.partial(
            task.train_step,
            model=model,
            tx=tx,
            schedule=schedule,
            loss_scale_growth_steps=growth_steps,
        )
    )
    batch = random_batch(1)
    after, logs = fixed(state, batch)
    assert int(logs["skipped_steps"]) == 0 and float(after.loss_scale.scale) == 1024.0
    # The gradients are the float32 model's, unscaled, within float16's precision.
    with config.unlocked():
        config.model.dtype = "float32"
    model32, _, state32 = make_full_state(config)
    _, logs32 = jax.jit(
        functools.partial(task.train_step, model=model32, tx=tx, schedule=schedule)
    )(state32, batch)
    np.testing.assert_allclose(float(logs["grad_norm"]), float(logs32["grad_norm"]), rtol=2e-2)
    after, logs = fixed(after, random_batch(2))
    assert int(logs["skipped_steps"]) == 0 and float(logs["loss_scale"]) == 1024.0
    assert float(after.loss_scale.scale) == 1024.0
    # An overflow at a fixed scale is skipped and counted by the divergence guard.
    big = after.replace(loss_scale=after.loss_scale.replace(scale=jnp.float32(2.0**20)))
    over, logs = fixed(big, batch)
    assert int(logs["skipped_steps"]) == 1 and int(logs["consecutive_skips"]) == 1
    assert float(over.loss_scale.scale) == 2.0**20
    for a, b in zip(jax.tree.leaves(over.params), jax.tree.leaves(big.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
