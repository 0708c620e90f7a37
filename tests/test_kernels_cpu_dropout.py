"""mlm.kernels.cpu_dropout: 16-bit draws, exact rescaling, flax-compatible module behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from mlm.kernels import cpu_dropout as dropout_lib


def test_threshold_is_the_rate_in_units_of_two_to_minus_16():
    assert dropout_lib.drop_threshold(0.1) == 6554
    assert dropout_lib.drop_threshold(0.0) == 0
    assert dropout_lib.drop_threshold(1.0) == 65536
    assert dropout_lib.drop_threshold(0.5) == 32768


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_fraction_and_independent_draws_of_one_hash(rate):
    mask = np.asarray(dropout_lib.keep_mask(jax.random.key(0), rate, (512, 2048)))
    p = dropout_lib.drop_threshold(rate) / 2**16
    n = mask.size
    dropped = 1.0 - mask.mean()
    assert abs(dropped - p) < 5 * np.sqrt(p * (1 - p) / n)
    # Elements 4k..4k+3 share one hash: the halves of one word (offset 1) and the two words
    # (offset 2) drop independently.
    for offset in (1, 2):
        both = np.mean(~mask[:, 0::4] & ~mask[:, offset::4])
        assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / (n // 4)), offset


def test_draws_are_threefry2x32_of_the_group_index():
    key = jax.random.key(7)
    draws = np.asarray(dropout_lib.random_draws16(key, (2, 8)))
    k1, k2 = (int(w) for w in np.asarray(jax.random.key_data(key)))
    groups = 4  # two rows of 8 elements, four per hash
    counts = np.concatenate([np.zeros(groups, np.uint32), np.arange(groups, dtype=np.uint32)])
    out = np.asarray(threefry_2x32((np.uint32(k1), np.uint32(k2)), counts))
    first, second = out[:groups], out[groups:]
    expected = np.stack(
        [first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16], axis=-1
    ).reshape(2, 8)
    np.testing.assert_array_equal(draws, expected.astype(np.uint16))
    # A raw uint32 key with the same words gives the same draws.
    raw = jax.random.key_data(key)
    np.testing.assert_array_equal(dropout_lib.random_draws16(raw, (2, 8)), draws)


def test_unrolled_hash_equals_jax_threefry_for_any_key_and_counter():
    rng = np.random.default_rng(0)
    count1 = rng.integers(0, 2**32, 4096, dtype=np.uint32)
    count2 = np.concatenate(
        [
            np.arange(2048, dtype=np.uint32),
            np.uint32(2**32 - 2048) + np.arange(2048, dtype=np.uint32),
        ]
    )
    for key in [(0, 0), (2**32 - 1, 1), tuple(rng.integers(0, 2**32, 2, dtype=np.uint32))]:
        k1, k2 = np.uint32(key[0]), np.uint32(key[1])
        expected = np.asarray(threefry_2x32((k1, k2), np.concatenate([count1, count2])))
        first, second = jax.jit(dropout_lib.threefry2x32)(k1, k2, count1, count2)
        np.testing.assert_array_equal(np.concatenate([first, second]), expected, err_msg=str(key))


def test_other_prng_implementations_fall_back_to_jax_random_bits():
    mask = np.asarray(dropout_lib.keep_mask(jax.random.key(0, impl="rbg"), 0.25, (256, 512)))
    assert abs((1 - mask.mean()) - 0.25) < 0.01


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
