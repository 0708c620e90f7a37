"""Tests for mlm.optim: schedules, weight-decay mask, AdamW/LAMB/SGD/Adafactor updates, clipping,
errors, EMA, loss scaling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from mlm import config as config_lib
from mlm import loss_scale
from mlm.errors import ConfigError
from mlm.optim import (
    OPTIMIZER_NAMES,
    SCHEDULE_NAMES,
    create_optimizer,
    ema_update,
    learning_rate_schedule,
    weight_decay_mask,
)

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
    with pytest.raises(ConfigError, match="'sgdx'.*adamw, lamb, sgd, adafactor$"):
        create_optimizer(make_config(name="sgdx"), num_steps=10)


def test_unknown_schedule_raises_config_error():
    choices = "polynomial, linear, cosine, constant, inverse_sqrt$"
    with pytest.raises(ConfigError, match=f"optimizer.schedule='rsqrt' is unknown.*{choices}"):
        create_optimizer(make_config(schedule="rsqrt"), num_steps=10)


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


# ---------------------------------------------------------------- defaults as before the choices


def schedule_before_choices(config, num_steps):
    """learning_rate_schedule as it was before optimizer.schedule existed (polynomial only)."""
    warmup_steps = int(config.warmup_steps)
    decay = optax.polynomial_schedule(
        init_value=config.learning_rate,
        end_value=config.end_learning_rate,
        power=config.power,
        transition_steps=num_steps,
    )
    if warmup_steps == 0:
        return decay
    peak = decay(warmup_steps) if warmup_steps <= num_steps else config.learning_rate
    warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)
    return lambda step: jnp.where(step < warmup_steps, warmup(step), decay(step))


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(power=2.0), dict(warmup_steps=0), dict(warmup_steps=200), dict(warmup_steps=100)],
)
def test_default_schedule_is_bit_identical_to_the_polynomial_before(overrides):
    steps = jnp.arange(160)
    before = jax.jit(schedule_before_choices(make_config(**overrides), 100))(steps)
    for config in (make_config(**overrides), make_config(schedule="polynomial", **overrides)):
        now = jax.jit(learning_rate_schedule(config, 100))(steps)
        np.testing.assert_array_equal(np.asarray(now), np.asarray(before))


def test_default_optimizer_updates_are_bit_identical_to_before():
    config = config_lib.base_config().optimizer  # adamw, polynomial, clip_norm 1.0
    config.update(learning_rate=1e-2, warmup_steps=2)
    before = optax.apply_if_finite(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(
                schedule_before_choices(config, 10),
                b1=0.9,
                b2=0.999,
                eps=1e-6,
                weight_decay=0.01,
                mask=weight_decay_mask,
            ),
        ),
        max_consecutive_errors=2**30,
    )
    now = create_optimizer(config, num_steps=10)
    params = small_params()
    states = [before.init(params), now.init(params)]
    for seed in range(4):
        grads = small_grads(seed, scale=3.0)
        (u_before, states[0]), (u_now, states[1]) = (
            jax.jit(before.update)(grads, states[0], params),
            jax.jit(now.update)(grads, states[1], params),
        )
        for a, b in zip(jax.tree.leaves(u_now), jax.tree.leaves(u_before), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        params = optax.apply_updates(params, u_now)


# -------------------------------------------------------------------------------- schedules

LR, END, W, N = 1e-3, 1e-5, 10, 100


def cosine_formula(t):
    done = min(max((t - W) / (N - W), 0.0), 1.0)
    return END + (LR - END) * 0.5 * (1 + np.cos(np.pi * done))


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # Warmup ramps to the schedule's rate at W (LR for all but linear and polynomial).
        ("cosine", {0: 0.0, 5: LR / 2, 10: LR, 55: (LR + END) / 2, 100: END, 150: END}),
        ("cosine", {t: cosine_formula(t) for t in (10, 20, 37, 64, 99)}),
        # linear ignores `power` (2 here): polynomial with power 1.
        ("linear", {0: 0.0, 5: 4.505e-4, 10: 9.01e-4, 50: 5.05e-4, 100: END, 150: END}),
        ("constant", {0: 0.0, 5: LR / 2, 10: LR, 50: LR, 100: LR, 150: LR}),
        # lr * sqrt(W / max(t, W)).
        ("inverse_sqrt", {0: 0.0, 5: LR / 2, 10: LR, 40: LR / 2, 90: LR / 3, 1000: LR / 10}),
    ],
)
def test_schedule_values_match_their_formulas(schedule, expected):
    config = make_config(schedule=schedule, power=2.0)
    rates = learning_rate_schedule(config, num_steps=N)
    jitted = jax.jit(rates)
    for step, rate in expected.items():
        np.testing.assert_allclose(float(rates(step)), rate, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(float(jitted(jnp.int32(step))), rate, rtol=1e-5, atol=1e-12)


def test_schedules_match_optax_own():
    steps = jnp.arange(N + 20)

    def ours(**overrides):
        return np.asarray(jax.vmap(learning_rate_schedule(make_config(**overrides), N))(steps))

    def theirs(schedule):
        return np.asarray(jax.vmap(schedule)(steps))

    warmup = optax.linear_schedule(0.0, LR, W)
    np.testing.assert_allclose(
        ours(schedule="cosine"),
        theirs(optax.warmup_cosine_decay_schedule(0.0, LR, W, N, end_value=END)),
        rtol=1e-5,
        atol=1e-10,
    )
    np.testing.assert_allclose(
        ours(schedule="cosine", warmup_steps=0),
        theirs(optax.cosine_decay_schedule(LR, N, alpha=END / LR)),
        rtol=1e-5,
        atol=1e-10,
    )
    np.testing.assert_array_equal(
        ours(schedule="linear", warmup_steps=0), theirs(optax.linear_schedule(LR, END, N))
    )
    np.testing.assert_array_equal(
        ours(schedule="linear", power=3.0), ours(schedule="polynomial", power=1.0)
    )
    np.testing.assert_array_equal(
        ours(schedule="polynomial", power=2.0, warmup_steps=0),
        theirs(optax.polynomial_schedule(LR, END, 2.0, N)),
    )
    np.testing.assert_allclose(
        ours(schedule="constant"),
        theirs(optax.join_schedules([warmup, optax.constant_schedule(LR)], [W])),
        rtol=1e-6,
    )
    rsqrt = LR * np.sqrt(W / np.maximum(np.asarray(steps), W))
    np.testing.assert_allclose(ours(schedule="inverse_sqrt")[W:], rsqrt[W:], rtol=1e-6)
    # No warmup: W is taken as 1, lr / sqrt(max(t, 1)).
    rsqrt = LR / np.sqrt(np.maximum(np.asarray(steps), 1))
    np.testing.assert_allclose(ours(schedule="inverse_sqrt", warmup_steps=0), rsqrt, rtol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_a_warmup_longer_than_the_run_ramps_towards_learning_rate(schedule):
    rates = learning_rate_schedule(make_config(schedule=schedule, warmup_steps=200), num_steps=N)
    for step in (0, 50, 99):
        np.testing.assert_allclose(float(rates(step)), LR * step / 200, rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------------ SGD and Adafactor


def small_params():
    rng = np.random.default_rng(0)
    return {
        "dense": {
            "kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        },
        "layer_norm": {"scale": rng.normal(size=(4,)).astype(np.float32)},
    }


def small_grads(seed, scale=1.0):
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(
        lambda p: (scale * rng.normal(size=p.shape)).astype(np.float32), small_params()
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_three_steps_match_closed_form(nesterov):
    lr, wd, mu = 1e-2, 0.1, 0.9
    config = make_config(
        name="sgd", learning_rate=lr, warmup_steps=0, weight_decay=wd, momentum=mu,
        nesterov=nesterov, end_learning_rate=0.0,
    )  # fmt: skip
    optimizer = create_optimizer(config, num_steps=10)
    params = small_params()
    state = optimizer.init(params)
    expected = {k: v.astype(np.float64) for k, v in flat(params).items()}
    trace = {k: 0.0 for k in expected}
    for t in range(3):
        grads = small_grads(t)
        rate = lr * (1 - t / 10)
        for name, g in flat(grads).items():
            trace[name] = mu * trace[name] + g
            direction = g + mu * trace[name] if nesterov else trace[name]
            decay = wd * expected[name] if name == "dense/kernel" else 0.0
            expected[name] = expected[name] - rate * (direction + decay)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for name, value in flat(params).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7)


def test_sgd_without_weight_decay_is_optax_sgd():
    config = make_config(name="sgd", weight_decay=0.0, momentum=0.5, nesterov=True)
    ours = create_optimizer(config, num_steps=100)
    theirs = optax.sgd(learning_rate_schedule(config, 100), momentum=0.5, nesterov=True)
    params = small_params()
    states = [ours.init(params), theirs.init(params)]
    for t in range(12):  # Through the warmup.
        grads = small_grads(t)
        (a, states[0]), (b, states[1]) = (
            jax.jit(ours.update)(grads, states[0], params),
            jax.jit(theirs.update)(grads, states[1], params),
        )
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9)
        params = optax.apply_updates(params, a)


def test_sgd_momentum_zero_is_plain_gradient_descent():
    config = make_config(name="sgd", warmup_steps=0, weight_decay=0.0, momentum=0.0)
    updates = first_updates(config, small_params(), small_grads(0))
    for name, g in flat(small_grads(0)).items():
        np.testing.assert_allclose(updates[name], -LR * g, rtol=1e-6)


def test_adafactor_is_optax_adafactor_plus_rate_scaled_decoupled_weight_decay():
    wd = 0.1
    params = {"dense": {"kernel": np.random.default_rng(0).normal(size=(200, 130))},
              "layer_norm": {"scale": np.linspace(0.5, 2.0, 130)}}  # fmt: skip
    params = jax.tree.map(lambda p: p.astype(np.float32), params)
    grads = jax.tree.map(lambda p: 0.1 * p + 0.05, params)
    plain = make_config(name="adafactor", weight_decay=0.0, warmup_steps=2)
    decayed = make_config(name="adafactor", weight_decay=wd, warmup_steps=2)
    schedule = learning_rate_schedule(plain, 100)
    reference = optax.adafactor(learning_rate=schedule)
    ours, ours_decayed = create_optimizer(plain, 100), create_optimizer(decayed, 100)
    states = [reference.init(params), ours.init(params), ours_decayed.init(params)]
    for t in range(4):
        results = [
            jax.jit(tx.update)(grads, state, params)
            for tx, state in zip((reference, ours, ours_decayed), states, strict=True)
        ]
        states = [state for _, state in results]
        expected, got, got_decayed = (flat(updates) for updates, _ in results)
        rate = float(schedule(t))
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-12)
            decay = rate * wd * flat(params)[name] if name == "dense/kernel" else 0.0
            np.testing.assert_allclose(
                got_decayed[name], expected[name] - decay, rtol=1e-5, atol=1e-9
            )
        params = optax.apply_updates(params, results[1][0])


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_clip_norm_applies_to_every_optimizer(name):
    params = small_params()
    unit = small_grads(0)
    norm = float(optax.tree.norm(unit))
    unit = jax.tree.map(lambda g: g / norm, unit)
    big = jax.tree.map(lambda g: 50.0 * g, unit)
    clipped = first_updates(make_config(name=name, warmup_steps=0, clip_norm=1.0), params, big)
    plain = first_updates(make_config(name=name, warmup_steps=0, clip_norm=0.0), params, unit)
    for key, value in plain.items():
        np.testing.assert_allclose(clipped[key], value, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------ fixed loss scale


def test_a_fixed_loss_scale_never_changes():
    optimizer = config_lib.base_config().optimizer
    assert loss_scale.growth_steps(optimizer) == optimizer.loss_scale_growth_steps  # dynamic
    assert loss_scale.initial_scale(optimizer) == optimizer.loss_scale_init
    optimizer.loss_scale = 128.0
    assert loss_scale.growth_steps(optimizer) == loss_scale.FIXED
    assert loss_scale.initial_scale(optimizer) == 128.0
    state = loss_scale.initial(128.0)
    for finite in (True, True, True, False, False, True):
        finite = jnp.asarray(finite)
        assert not bool(loss_scale.overflow(state.scale, finite, loss_scale.FIXED))
        state = loss_scale.adjust(state, finite, loss_scale.FIXED)
        assert float(state.scale) == 128.0 and int(state.good_steps) == 0
    # Dynamic: only a non-finite step above the minimum scale is an expected overflow.
    assert bool(loss_scale.overflow(jnp.float32(2.0), jnp.asarray(False), 3))
    assert not bool(loss_scale.overflow(jnp.float32(1.0), jnp.asarray(False), 3))
    assert not bool(loss_scale.overflow(jnp.float32(2.0), jnp.asarray(True), 3))
