"""mlm.dropout: 16-bit draws, exact rescaling, flax-compatible module behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm import dropout as dropout_lib


def test_threshold_is_the_rate_in_units_of_two_to_minus_16():
    assert dropout_lib.drop_threshold(0.1) == 6554
    assert dropout_lib.drop_threshold(0.0) == 0
    assert dropout_lib.drop_threshold(1.0) == 65536
    assert dropout_lib.drop_threshold(0.5) == 32768


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_fraction_and_independent_halves(rate):
    mask = np.asarray(dropout_lib.keep_mask(jax.random.key(0), rate, (512, 2048)))
    p = dropout_lib.drop_threshold(rate) / 2**16
    n = mask.size
    dropped = 1.0 - mask.mean()
    assert abs(dropped - p) < 5 * np.sqrt(p * (1 - p) / n)
    # Both 16-bit halves of each 32-bit word (columns j and j + 1024) drop independently.
    both = np.mean(~mask[:, :1024] & ~mask[:, 1024:])
    assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / (n // 2))


def test_odd_last_dimension_and_new_key_gives_new_mask():
    first = dropout_lib.keep_mask(jax.random.key(1), 0.3, (3, 7))
    again = dropout_lib.keep_mask(jax.random.key(1), 0.3, (3, 7))
    other = dropout_lib.keep_mask(jax.random.key(2), 0.3, (64, 7))
    assert first.shape == (3, 7) and first.dtype == jnp.bool_
    np.testing.assert_array_equal(first, again)
    assert 0 < np.mean(np.asarray(other)) < 1


def test_dropout_zeroes_and_rescales_exactly():
    x = jnp.full((256, 1024), 3.0, jnp.float32)
    out = np.asarray(dropout_lib.dropout(x, 0.1, jax.random.key(3)))
    keep_probability = 1.0 - 6554 / 2**16
    kept = out != 0
    np.testing.assert_array_equal(out[kept], np.float32(3.0) / np.float32(keep_probability))
    assert abs(out.mean() - 3.0) < 0.02  # the expectation is preserved
    np.testing.assert_array_equal(dropout_lib.dropout(x, 0.0, jax.random.key(3)), x)
    np.testing.assert_array_equal(dropout_lib.dropout(x, 1.0, jax.random.key(3)), 0 * x)


def test_gradient_flows_through_kept_elements_only():
    x = jnp.ones((8, 16))
    key = jax.random.key(4)
    grad = jax.grad(lambda x: jnp.sum(dropout_lib.dropout(x, 0.25, key)))(x)
    mask = np.asarray(dropout_lib.keep_mask(key, 0.25, x.shape))
    np.testing.assert_allclose(np.asarray(grad), mask / (1 - 16384 / 2**16))


def test_module_is_deterministic_when_asked_and_uses_the_dropout_rng():
    x = jnp.ones((4, 32))
    layer = dropout_lib.Dropout(0.5)
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    first = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    second = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(6)})
    assert not np.array_equal(first, second)
    kept = np.asarray(first) != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_array_equal(np.asarray(first)[kept], 2.0)
    with pytest.raises(ValueError):
        layer.apply({}, x)  # deterministic given nowhere, as flax.linen.Dropout
