"""The standard kernel set: plain JAX and flax operations, as XLA and cuDNN run them on GPU / TPU.

Nothing here is tuned for one backend: the Dense layers use flax's own `dot_general`, dropout is
`flax.linen.Dropout` (`jax.random` bits), attention is `jax.nn.dot_product_attention`, which runs
cuDNN's fused attention on GPU for 16-bit inputs where cuDNN accepts them and XLA's otherwise.
JAX's public attention function has no dropout (cuDNN's dropout is reachable only through jax's
private modules), so attention with dropout on the probabilities (training with
`model.attention_dropout_rate` > 0, as the BERT configs do) is XLA's softmax attention with
`jax.random` dropout between the two products (`dropout_attention`), on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Errors jax raises at trace time when cuDNN cannot run the inputs (no cuDNN, a GPU too old, a
# shape, dtype or mask it does not support).
_CUDNN_REFUSALS = (RuntimeError, ValueError, NotImplementedError, TypeError)


def attention_implementation(platform: str, dtype: jnp.dtype) -> str | None:
    """'cudnn' (cuDNN flash attention) on GPU for 16-bit inputs; None (XLA) otherwise.

    Args:
      platform: the platform the step is compiled for ('cpu', 'gpu', 'tpu').
      dtype: the attention inputs' dtype.

    Returns:
      The `implementation` argument of `jax.nn.dot_product_attention`.
    """
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return None


def fused_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    implementation: str | None = None,
) -> jax.Array:
    """Attention without dropout via `jax.nn.dot_product_attention`.

    With `implementation='cudnn'`, inputs cuDNN refuses at trace time (no cuDNN, a shape or
    dtype it does not support) run XLA's implementation instead. XLA's computes the logits and
    the softmax in float32 for 16-bit inputs and casts only the probabilities back for the PV
    matmul.

    Args:
      query, key, value: [B, T, N, D] in the compute dtype.
      mask: bool, broadcastable to [B, N, T, T].
      implementation: 'cudnn', or None for XLA.

    Returns:
      [B, T, N, D] in the input dtype.
    """
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(
                query, key, value, mask=mask, implementation="cudnn"
            )
        except _CUDNN_REFUSALS:
            pass  # XLA below.
    return jax.nn.dot_product_attention(query, key, value, mask=mask)


def dropout_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    dropout_rate: float,
    dropout_rng: jax.Array,
) -> jax.Array:
    """Softmax attention with `jax.random` dropout on the probabilities, as XLA fuses it.

    The function of `fused_attention` (float32 logits and softmax, the probabilities cast to the
    value dtype for the PV product) with dropout between the two products, one independent
    Bernoulli draw per probability (as BERT and `flax.linen.Dropout`). flax's
    `dot_product_attention` would compute 16-bit logits and, by default, share one dropout mask
    across the batch and heads, so it is not used.

    Args:
      query, key, value: [B, T, N, D] in the compute dtype.
      mask: bool, broadcastable to [B, N, T, T].
      dropout_rate: dropout rate on the attention probabilities.
      dropout_rng: PRNG key for the dropout.

    Returns:
      [B, T, N, D] in the value dtype.
    """
    scale = jnp.sqrt(query.shape[-1]).astype(query.dtype)
    logits = jnp.einsum("bqnd,bknd->bnqk", query / scale, key, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(query.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    keep_probability = 1.0 - dropout_rate
    keep = jax.random.bernoulli(dropout_rng, keep_probability, weights.shape)
    weights = jnp.where(keep, weights / keep_probability, 0.0)
    return jnp.einsum("bnqk,bknd->bqnd", weights.astype(value.dtype), value)


def vocab_logits(x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    """float32 logits `x @ word_embeddings^T`, the table cast to the compute dtype.

    Args:
      x: [M, E] in the compute dtype (E: the embedding width, `model.embedding_size`).
      word_embeddings: [V, E] float32 params.

    Returns:
      float32 [M, V].
    """
    return jnp.matmul(x, word_embeddings.astype(x.dtype).T, preferred_element_type=jnp.float32)
