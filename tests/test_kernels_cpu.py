"""mlm.kernels.cpu: each CPU kernel equals its plain JAX counterpart in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm.kernels.cpu import add_vocab_bias, kernel_dot_general, tied_vocab_logits


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_tied_vocab_logits_match_the_einsum_with_gradients(dtype, rtol):
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(keys[0], (6, 8)).astype(dtype)
    embeddings = jax.random.normal(keys[1], (11, 8))
    cotangent = jax.random.normal(keys[2], (6, 11))

    def objective(logits_fn):
        return lambda x, e: jnp.sum(logits_fn(x, e) * cotangent)

    def plain(x, e):
        return jnp.einsum("mh,vh->mv", x, e.astype(x.dtype), preferred_element_type=jnp.float32)

    ours = jax.value_and_grad(objective(tied_vocab_logits), argnums=(0, 1))(x, embeddings)
    reference = jax.value_and_grad(objective(plain), argnums=(0, 1))(x, embeddings)
    assert tied_vocab_logits(x, embeddings).dtype == jnp.float32
    assert ours[1][0].dtype == dtype and ours[1][1].dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize(
    "input_shape, kernel_shape, contract",
    [
        ((3, 5, 8), (8, 6), 1),  # Dense
        ((3, 5, 8), (8, 2, 4), 1),  # DenseGeneral to heads (query / key / value)
        ((3, 5, 2, 4), (2, 4, 8), 2),  # DenseGeneral from heads (attention output)
    ],
)
def test_kernel_dot_general_matches_dot_general_with_gradients(input_shape, kernel_shape, contract):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], input_shape)
    w = jax.random.normal(keys[1], kernel_shape)
    dims = ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))), ((), ()))
    out_shape = input_shape[: x.ndim - contract] + kernel_shape[contract:]
    cotangent = jax.random.normal(keys[2], out_shape)

    def objective(dot):
        return lambda x, w: jnp.sum(dot(x, w, dims) * cotangent)

    ours = jax.value_and_grad(objective(kernel_dot_general), argnums=(0, 1))(x, w)
    plain = jax.value_and_grad(objective(jax.lax.dot_general), argnums=(0, 1))(x, w)
    assert kernel_dot_general(x, w, dims).shape == out_shape
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_add_vocab_bias_gradient_is_the_row_sum():
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    logits = jax.random.normal(keys[0], (3, 4, 7))
    bias = jax.random.normal(keys[1], (7,))
    weights = jnp.arange(3 * 4 * 7, dtype=jnp.float32).reshape(3, 4, 7) / 10

    def objective(add):
        return lambda logits, bias: jnp.sum(jnp.sin(add(logits, bias)) * weights)

    ours = jax.grad(objective(add_vocab_bias), argnums=(0, 1))(logits, bias)
    plain = jax.grad(objective(jnp.add), argnums=(0, 1))(logits, bias)
    np.testing.assert_allclose(add_vocab_bias(logits, bias), logits + bias)
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_kernel_dot_general_other_layouts_fall_back_to_dot_general():
    x = jax.random.normal(jax.random.PRNGKey(2), (8, 3, 5))
    w = jax.random.normal(jax.random.PRNGKey(3), (8, 6))
    dims = (((0,), (0,)), ((), ()))  # Contracts the leading input axis: not a Dense layout.
    np.testing.assert_array_equal(kernel_dot_general(x, w, dims), jax.lax.dot_general(x, w, dims))
