"""The CPU kernel set: products and attention written the way XLA:CPU runs them fastest.

Each function computes exactly what its plain JAX counterpart computes (tested against it, values
and gradients); only the way XLA:CPU is asked to compute it differs. They were chosen by
measuring the reference train step on CPU (docs/performance.md) and are used only where the
step is compiled for CPU devices (`mlm.kernels.select`); on GPU and TPU the standard set runs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mlm.kernels import cpu_dropout


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, preferred_element_type: jnp.dtype | None) -> jax.Array:
    """x [M, K] @ w [K, N] whose gradient for w is computed as x^T @ grad (`_matmul_bwd`)."""
    return jnp.matmul(x, w, preferred_element_type=preferred_element_type)


def _matmul_fwd(
    x: jax.Array, w: jax.Array, preferred_element_type: jnp.dtype | None
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _matmul(x, w, preferred_element_type), (x, w)


def _matmul_bwd(
    preferred_element_type: jnp.dtype | None,
    residuals: tuple[jax.Array, jax.Array],
    grad: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    del preferred_element_type
    x, w = residuals
    # A float32 output's gradient (the vocab logits') is taken in the compute dtype.
    grad = grad.astype(x.dtype)
    # The kernel gradient as x^T @ grad, [K, N] directly: JAX's own transpose rule computes
    # grad^T @ x, [N, K], and then transposes it, a copy XLA:CPU does not fuse away.
    dw = jnp.einsum("mk,mn->kn", x, grad)
    return grad @ w.T.astype(grad.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def kernel_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: tuple,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """`jax.lax.dot_general` for Dense layers, with a kernel gradient XLA:CPU runs fast.

    Dense / DenseGeneral contract the trailing axes of the input with the leading axes of the
    kernel; that case is computed as one [M, K] @ [K, N] matmul (`_matmul`), any other falls
    back to `jax.lax.dot_general`. Values and gradients are those of the plain product.

    Args:
      lhs: the input [..., K1, ..., Kc].
      rhs: the kernel [K1, ..., Kc, N1, ...].
      dimension_numbers, precision, preferred_element_type: as for `jax.lax.dot_general`.

    Returns:
      [..., N1, ...].
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    count = len(rhs_contract)
    dense_layout = (
        tuple(lhs_contract) == tuple(range(lhs.ndim - count, lhs.ndim))
        and tuple(rhs_contract) == tuple(range(count))
        and not lhs_batch
        and not rhs_batch
        and precision is None
    )
    if not dense_layout:
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
        )
    k = math.prod(rhs.shape[:count])
    out = _matmul(lhs.reshape(-1, k), rhs.reshape(k, -1), None)
    out = out.reshape(lhs.shape[: lhs.ndim - count] + rhs.shape[count:])
    return out if preferred_element_type is None else out.astype(preferred_element_type)


@jax.custom_vjp
def add_vocab_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """`logits + bias` whose bias gradient is a ones-vector matmul instead of a sum over rows.

    XLA:CPU runs the plain gradient, a reduction of the [B * P, V] logit gradient over its rows,
    far slower than the equivalent matmul; the two agree to float32 rounding.

    Args:
      logits: [..., V].
      bias: [V].

    Returns:
      logits + bias.
    """
    return logits + bias


def _add_vocab_bias_fwd(logits: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
    return logits + bias, None


def _add_vocab_bias_bwd(_: None, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = grad.reshape(-1, grad.shape[-1])
    return grad, jnp.ones((rows.shape[0],), rows.dtype) @ rows


add_vocab_bias.defvjp(_add_vocab_bias_fwd, _add_vocab_bias_bwd)


def tied_vocab_logits(x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    """float32 logits `x @ word_embeddings^T`, with an embedding gradient XLA:CPU runs fast.

    The product is `_matmul` with the transposed table as its kernel, so the embedding gradient
    is computed as (x^T @ grad)^T: [E, V], then transposed. JAX's own transpose rule computes
    grad^T @ x, for which XLA:CPU first transposes the whole [M, V] logit gradient; the [E, V]
    result is smaller by M / E.

    Args:
      x: [M, E] in the compute dtype (E: the embedding width, `model.embedding_size`).
      word_embeddings: [V, E] (float32 params), cast to the compute dtype for the products.

    Returns:
      float32 [M, V]. The gradients are those of the plain product, in the compute dtype.
    """
    return _matmul(x, word_embeddings.astype(x.dtype).T, jnp.float32)


def dropout_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """Attention with dropout (`cpu_dropout`) on the attention probabilities.

    As `jax.nn.dot_product_attention` (and flax's `dot_product_attention`): float32 logits of the
    scaled query and the key, masked with the query dtype's lowest value, a float32 softmax, the
    probabilities cast to the value dtype for the PV matmul. The heads are moved in front of the
    sequence axis first ([B, N, T, D]), so both matmuls and their gradients are plain batched
    matmuls over (B, N), which XLA:CPU runs faster than [B, T, N, D] einsums, with bit-identical
    results.

    Args:
      query, key, value: [B, T, N, D] in the compute dtype.
      mask: bool, broadcastable to [B, N, T, T].
      dropout_rate: dropout rate on the attention probabilities.
      dropout_rng: PRNG key for the dropout; None disables it.

    Returns:
      [B, T, N, D] in the value dtype.
    """

    def heads_first(x: jax.Array) -> jax.Array:
        return jnp.transpose(x, (0, 2, 1, 3))

    scale = jnp.sqrt(query.shape[-1]).astype(query.dtype)
    logits = jnp.einsum(
        "bnqd,bnkd->bnqk",
        heads_first(query / scale),
        heads_first(key),
        preferred_element_type=jnp.float32,
    )
    logits = jnp.where(mask, logits, jnp.finfo(query.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if dropout_rng is not None:
        weights = cpu_dropout.dropout(weights, dropout_rate, dropout_rng)
    context = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(value.dtype), heads_first(value))
    return heads_first(context)
