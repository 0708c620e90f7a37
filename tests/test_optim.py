"""Tests for mlm.optim: schedule values, weight-decay mask, AdamW/LAMB updates, clipping, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from mlm import loss_scale
from mlm.errors import ConfigError
from mlm.optim import create_optimizer, ema_update, learning_rate_schedule, weight_decay_mask

DECAYED_NAMES = [
    "encoder/word_embeddings/embedding",
    "encoder/position_embeddings/embedding",
    "encoder/type_embeddings/embedding",
    "encoder/layer_0/attention/query/kernel",
    "encoder/layer_0/attention/key/kernel",
    "encoder/layer_0/attention/value/kernel",
    "encoder/layer_0/attention/output/kernel",
    "encoder/layer_0/intermediate/kernel",
    "encoder/layer_0/output/kernel",
    "mlm_head/dense/kernel",
    "nsp_head/pooler/kernel",
    "nsp_head/classifier/kernel",
]
NOT_DECAYED_NAMES = [
    "encoder/embeddings_layer_norm/scale",
    "encoder/embeddings_layer_norm/bias",
    "encoder/layer_0/attention/query/bias",
    "encoder/layer_0/attention/key/bias",
    "encoder/layer_0/attention/value/bias",
    "encoder/layer_0/attention/output/bias",
    "encoder/layer_0/attention_layer_norm/scale",
    "encoder/layer_0/attention_layer_norm/bias",
    "encoder/layer_0/intermediate/bias",
    "encoder/layer_0/output/bias",
    "encoder/layer_0/output_layer_norm/scale",
    "encoder/layer_0/output_layer_norm/bias",
    "mlm_head/dense/bias",
    "mlm_head/layer_norm/scale",
    "mlm_head/layer_norm/bias",
    "mlm_head/output_bias",
    "nsp_head/pooler/bias",
    "nsp_head/classifier/bias",
]


def make_config(**overrides) -> ml_collections.ConfigDict:
    fields = dict(
        name="adamw",
        learning_rate=1e-3,
        warmup_steps=10,
        end_learning_rate=1e-5,
        power=1.0,
        weight_decay=0.01,
        clip_norm=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        grad_accum_steps=1,
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def tree(leaves: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict(leaves, sep="/")


def flat(params: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def first_updates(config: ml_collections.ConfigDict, params: dict, grads: dict) -> dict:
    optimizer = create_optimizer(config, num_steps=100)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return flat(updates)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # decayed(t) = 0.99e-3 * (1 - t/100)**power + 1e-5; warmup: decayed(10) * t / 10.
        (
            dict(power=1.0),
            {0: 0.0, 5: 4.505e-4, 10: 9.01e-4, 50: 5.05e-4, 100: 1e-5, 150: 1e-5},
        ),
        (
            dict(power=2.0),
            {0: 0.0, 5: 4.0595e-4, 10: 8.119e-4, 50: 2.575e-4, 100: 1e-5, 150: 1e-5},
        ),
        (
            dict(warmup_steps=0),
            {0: 1e-3, 5: 9.505e-4, 10: 9.01e-4, 50: 5.05e-4, 100: 1e-5, 150: 1e-5},
        ),
        # A warmup longer than the run ramps towards learning_rate and never ends.
        (
            dict(warmup_steps=200),
            {0: 0.0, 5: 2.5e-5, 50: 2.5e-4, 100: 5e-4, 150: 7.5e-4},
        ),
    ],
)
def test_learning_rate_schedule_values(overrides, expected):
    schedule = learning_rate_schedule(make_config(**overrides), num_steps=100)
    for step, rate in expected.items():
        np.testing.assert_allclose(float(schedule(step)), rate, rtol=1e-5, atol=1e-12)
    jitted = jax.jit(schedule)
    np.testing.assert_allclose(float(jitted(5)), expected[5], rtol=1e-5, atol=1e-12)


def test_weight_decay_mask_on_model_param_names():
    params = tree({name: np.zeros((2,)) for name in DECAYED_NAMES + NOT_DECAYED_NAMES})
    mask = flat(weight_decay_mask(params))
    assert sorted(name for name, decays in mask.items() if decays) == sorted(DECAYED_NAMES)
    assert len(mask) == len(DECAYED_NAMES) + len(NOT_DECAYED_NAMES)
    wrapped = flat(weight_decay_mask({"params": params}))
    assert wrapped["params/mlm_head/output_bias"] == False  # noqa: E712
    assert wrapped["params/mlm_head/dense/kernel"] == True  # noqa: E712


def test_adamw_two_steps_match_closed_form():
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-6
    config = make_config(learning_rate=lr, warmup_steps=0, weight_decay=wd, eps=eps)
    params = {
        "dense": {"kernel": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)},
        "layer_norm": {"scale": np.array([1.0, 2.0], np.float32)},
    }
    grad_steps = [
        {"dense": {"kernel": np.array([[0.1, -0.3], [0.2, 0.05]], np.float32)},
         "layer_norm": {"scale": np.array([0.4, -0.1], np.float32)}},
        {"dense": {"kernel": np.array([[-0.2, 0.1], [0.3, 0.0]], np.float32)},
         "layer_norm": {"scale": np.array([0.2, 0.3], np.float32)}},
    ]  # fmt: skip
    optimizer = create_optimizer(config, num_steps=100)
    state = optimizer.init(params)
    expected = {k: v.astype(np.float64) for k, v in flat(params).items()}
    m = {k: 0.0 for k in expected}
    v = {k: 0.0 for k in expected}
    for t, grads in enumerate(grad_steps, start=1):
        rate = (lr - 1e-5) * (1 - (t - 1) / 100) + 1e-5  # schedule at update count t - 1
        for name, g in flat(grads).items():
            m[name] = b1 * m[name] + (1 - b1) * g
            v[name] = b2 * v[name] + (1 - b2) * g**2
            m_hat, v_hat = m[name] / (1 - b1**t), v[name] / (1 - b2**t)
            decay = wd * expected[name] if name == "dense/kernel" else 0.0
            expected[name] = expected[name] - rate * (m_hat / (np.sqrt(v_hat) + eps) + decay)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for name, value in flat(params).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7)


def test_clipping_rescales_to_clip_norm():
    # eps=1 keeps Adam's first step scale-dependent, so a missing clip would change the update.
    params = {"dense": {"kernel": np.ones((2, 2), np.float32)}}
    direction = np.array([[0.6, 0.0], [0.0, -0.8]], np.float32)  # global norm 1
    big, unit = {"dense": {"kernel": 100 * direction}}, {"dense": {"kernel": direction}}
    clipped = make_config(warmup_steps=0, eps=1.0, clip_norm=1.0)
    np.testing.assert_allclose(
        first_updates(clipped, params, big)["dense/kernel"],
        first_updates(clipped, params, unit)["dense/kernel"],
        rtol=1e-6,
    )
    unclipped = make_config(warmup_steps=0, eps=1.0, clip_norm=0.0)
    assert not np.allclose(
        first_updates(unclipped, params, big)["dense/kernel"],
        first_updates(unclipped, params, unit)["dense/kernel"],
        rtol=1e-3,
    )


def test_lamb_trust_ratio_only_on_decayed_params():
    lr, wd, eps = 1e-2, 0.1, 1e-6
    config = make_config(name="lamb", learning_rate=lr, warmup_steps=0, weight_decay=wd, eps=eps)
    params = {
        "dense": {"kernel": np.array([[3.0, -4.0], [12.0, 0.0]], np.float32)},
        "layer_norm": {"scale": np.array([5.0, 7.0], np.float32)},
        "dense_out": {"bias": np.array([2.0, -2.0], np.float32)},
    }
    grads = {
        "dense": {"kernel": np.array([[0.1, -0.3], [0.2, 0.05]], np.float32)},
        "layer_norm": {"scale": np.array([0.4, -0.1], np.float32)},
        "dense_out": {"bias": np.array([-0.5, 0.25], np.float32)},
    }
    updates = first_updates(config, params, grads)
    adam = {k: g / (np.abs(g) + eps) for k, g in flat(grads).items()}  # first-step Adam direction
    for name in ("layer_norm/scale", "dense_out/bias"):
        np.testing.assert_allclose(updates[name], -lr * adam[name], rtol=1e-5)
    kernel = flat(params)["dense/kernel"]
    direction = adam["dense/kernel"] + wd * kernel
    ratio = np.linalg.norm(kernel) / np.linalg.norm(direction)
    assert ratio > 2  # the scaling is visible
    np.testing.assert_allclose(updates["dense/kernel"], -lr * ratio * direction, rtol=1e-5)


def test_unknown_optimizer_name_raises_config_error():
    with pytest.raises(ConfigError, match="'sgdx'.*adamw, lamb"):
        create_optimizer(make_config(name="sgdx"), num_steps=10)


@pytest.mark.parametrize("accum", [0, 2.0, True])
def test_invalid_grad_accum_steps_raises_config_error(accum):
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        create_optimizer(make_config(grad_accum_steps=accum), num_steps=10)


def test_ema_update_matches_the_closed_form_on_a_toy_sequence():
    decay, history = 0.9, [jnp.asarray([1.0, -2.0]) * i for i in range(6)]
    ema = history[0]
    for params in history[1:]:
        ema = ema_update({"w": ema}, {"w": params}, decay)["w"]
    k = len(history) - 1
    expected = decay**k * history[0] + (1 - decay) * sum(
        decay ** (k - i) * history[i] for i in range(1, k + 1)
    )
    np.testing.assert_allclose(ema, expected, rtol=1e-6)
    kept = ema_update({"w": ema}, {"w": history[1]}, decay, applied=False)["w"]
    np.testing.assert_array_equal(kept, ema)


def test_loss_scale_halves_on_overflow_and_doubles_after_growth_steps():
    state = loss_scale.initial(8.0)
    trace = []
    for finite in (True, True, True, False, True, False, False, False, False):
        state = loss_scale.adjust(state, jnp.asarray(finite), growth_steps=3)
        trace.append(float(state.scale))
    assert trace == [8.0, 8.0, 16.0, 8.0, 8.0, 4.0, 2.0, 1.0, 1.0]  # Never below MIN_SCALE.
