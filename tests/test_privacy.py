"""Tests for mlm.privacy and the DP-SGD train step: clipping, noise, accounting, a full run."""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_task import make_state, random_batch, tiny_config

from mlm import config as config_lib
from mlm import privacy, task
from mlm.optim import learning_rate_schedule

DP = privacy.DpSgd(l2_clip=1.0, noise_multiplier=1.0)


def dp_step_fn(config, model, tx, accum=1, dp=DP):
    schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
    return jax.jit(
        functools.partial(
            task.train_step, model=model, tx=tx, schedule=schedule, grad_accum_steps=accum, dp=dp
        )
    )


def tree_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(leaf.astype(jnp.float32) ** 2) for leaf in tree)))


def test_each_rows_contribution_is_clipped_even_a_huge_one():
    # Toy loss 0.5 * ||w - x||^2 per row: its gradient is w - x; row 2 is a million times larger.
    rows = {"x": jnp.asarray([[1.0, 0.0], [0.0, 2.0], [3e6, 4e6], [0.1, 0.1]])}
    params = {"w": jnp.zeros(2)}

    def row_loss(p, row, key):
        del key
        value = 0.5 * jnp.sum((p["w"] - row["x"]) ** 2)
        return value, value

    ids, key = jnp.arange(4), jax.random.PRNGKey(0)
    _, total, clipped = privacy.clipped_gradient_sum(row_loss, params, rows, key, ids, 1.5)
    without = {"x": rows["x"][jnp.asarray([0, 1, 3])]}
    _, rest, _ = privacy.clipped_gradient_sum(row_loss, params, without, key, ids[:3], 1.5)
    contribution = total["w"] - rest["w"]
    # The huge row adds exactly a vector of norm l2_clip in its own direction.
    np.testing.assert_allclose(contribution, [-0.9, -1.2], rtol=1e-6)
    np.testing.assert_allclose(rest["w"], [-1.0 - 0.1, -1.5 - 0.1], rtol=1e-6)
    assert int(clipped) == 2  # Rows 1 (norm 2) and 2; rows 0 and 3 are under 1.5.


def test_model_rows_are_clipped_to_l2_clip_each():
    config = tiny_config()
    model, _, state = make_state(config)
    batch = {k: jnp.asarray(v) for k, v in random_batch(7).items()}
    clip = 1e-3  # Far below the rows' own gradient norms: every row is clipped.
    clipped_sum = jax.jit(
        functools.partial(
            privacy.clipped_gradient_sum, functools.partial(task.row_loss, model=model)
        )
    )
    ids = jnp.arange(4)
    key = jax.random.PRNGKey(1)
    _, total, clipped = clipped_sum(state.params, batch, key, ids, clip)
    assert int(clipped) == 4
    for drop in range(4):
        keep = np.asarray([i for i in range(4) if i != drop])
        part = {k: v[keep] for k, v in batch.items()}
        _, rest, _ = clipped_sum(state.params, part, key, ids[keep], clip)
        contribution = jax.tree.map(jnp.subtract, total, rest)
        assert tree_norm(jax.tree.leaves(contribution)) <= clip * (1 + 1e-3)
        assert tree_norm(jax.tree.leaves(contribution)) >= clip * (1 - 1e-3)


def test_noise_standard_deviation_matches_noise_multiplier_times_clip():
    std = 0.7 * 2.0
    zeros = {"a": jnp.zeros(()), "b": jnp.zeros(())}
    base = jax.random.PRNGKey(3)

    def draw(step):
        key = privacy.noise_key(jax.random.fold_in(base, step))
        return privacy.add_noise(zeros, key, std)

    draws = jax.vmap(draw)(jnp.arange(2000))
    for name in ("a", "b"):
        assert np.std(draws[name]) == pytest.approx(std, rel=0.05)
        assert abs(np.mean(draws[name])) < 4 * std / np.sqrt(2000)
    assert not np.allclose(draws["a"], draws["b"])  # Independent per parameter.


def test_dp_step_on_zero_gradients_is_pure_noise_of_std_sigma_c_over_b():
    config = tiny_config()
    model, tx, state = make_state(config)
    batch = random_batch(8)
    batch["masked_lm_weights"] = np.zeros_like(batch["masked_lm_weights"])  # Loss 0, grads 0.
    dp = privacy.DpSgd(l2_clip=0.5, noise_multiplier=3.0)
    rng = jax.random.fold_in(state.rng, state.step)
    private_gradients = jax.jit(
        functools.partial(task._private_gradients, model=model, dp=dp),
        static_argnames="grad_accum_steps",
    )
    value, _, grads, clipped = private_gradients(state.params, batch, rng, grad_accum_steps=1)
    assert float(value) == 0.0 and int(clipped) == 0
    values = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    assert values.size > 5000
    assert np.std(values) == pytest.approx(3.0 * 0.5 / 4, rel=0.05)
    again = private_gradients(state.params, batch, rng, grad_accum_steps=2)[2]
    # Noise is drawn once per step from the step key, also with gradient accumulation.
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_adds_noise_once_and_keeps_each_rows_dropout():
    config = tiny_config(dropout=0.3)
    model, tx, state = make_state(config)
    batch = random_batch(9)
    full, full_logs = dp_step_fn(config, model, tx, 1)(state, batch)
    _, _, state = make_state(config)
    accum, accum_logs = dp_step_fn(config, model, tx, 2)(state, batch)
    np.testing.assert_allclose(float(accum_logs["loss"]), float(full_logs["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    eval_loss, _ = task.loss(state.params, batch, None, model=model)
    assert float(full_logs["dp_rows"]) == 4
    assert float(full_logs["loss"]) != float(eval_loss)  # Dropout stays on.


def test_epsilon_matches_published_values_of_the_rdp_accountant():
    import dp_accounting

    # (q, sigma, steps, delta, published epsilon):
    # Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1: q=0.01, sigma=4,
    #   T=10000, delta=1e-5 -> epsilon 1.26 with the moments accountant.
    # TensorFlow Privacy, tutorials/README.md: N=60000, batch 256, noise 1.1, 60 epochs,
    #   delta=1e-5 -> epsilon 3.01 (compute_dp_sgd_privacy.py, RDP).
    cases = [(0.01, 4.0, 10_000, 1e-5, 1.26), (256 / 60_000, 1.1, 14_063, 1e-5, 3.01)]
    for q, sigma, steps, delta, published in cases:
        # Those numbers convert RDP to (epsilon, delta) with Mironov 2017, Prop. 3: epsilon =
        # min over orders a of RDP(a) + log(1 / delta) / (a - 1). The same conversion of the
        # accountant's RDP curve reproduces them (TF Privacy's order grid).
        orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
        accountant = dp_accounting.rdp.RdpAccountant(orders)
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        classic = min(
            r + np.log(1 / delta) / (a - 1)
            for a, r in zip(orders, accountant._rdp, strict=True)  # noqa: SLF001
        )
        assert round(classic, 2) == published
        # What mlm reports uses dp_accounting's tighter conversion: never more than published.
        reported = privacy.epsilon(q, sigma, steps, delta)
        assert 0.7 * published < reported <= published
    assert privacy.epsilon(0.01, 4.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.01, 4.0, 100, 1e-5) < privacy.epsilon(0.01, 4.0, 200, 1e-5)


def test_dp_training_run_logs_epsilon_each_interval_and_at_the_end(tmp_path):
    from test_train import tiny_config as run_config

    from mlm.train import train_and_evaluate

    config = run_config()
    config.train.update(num_steps=10, log_every=5, eval_every=0, checkpoint_every=10)
    config.privacy.update(enabled=True, l2_clip=1.0, noise_multiplier=1.1, num_examples=2000)
    workdir = str(tmp_path / "dp")
    results = train_and_evaluate(config, workdir)
    config = config_lib.validate(config)
    expected = [privacy.epsilon(8 / 2000, 1.1, steps, 1e-5) for steps in (5, 10)]
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        records = [json.loads(line) for line in file]
    assert [r["privacy_epsilon"] for r in records] == expected
    assert all(0.0 <= r["dp_clipped_fraction"] <= 1.0 for r in records)
    assert (
        results["train"]["privacy_epsilon"]
        == expected[-1]
        == privacy.epsilon_for_config(config, 10)
    )
    assert np.isfinite(results["eval"]["masked_lm_accuracy"])


def test_private_training_without_the_accountant_stops_before_any_file(tmp_path, monkeypatch):
    from test_train import tiny_config as run_config

    from mlm.errors import ConfigError
    from mlm.train import train_and_evaluate

    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # As if the extra were missing.
    config = run_config()
    config.privacy.update(enabled=True, l2_clip=1.0, noise_multiplier=1.1, num_examples=2000)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[privacy\]'$"):
        train_and_evaluate(config, str(tmp_path / "dp"))
    assert not (tmp_path / "dp").exists()
    config.privacy.enabled = False
    privacy.require_accountant(config_lib.validate(config))  # Only private runs need it.
