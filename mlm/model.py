"""BERT encoder (post-LN, as original BERT / Model Garden `BertEncoder`) and pretraining heads.

Parameters are always float32; `dtype` only sets the compute dtype of the matmuls. LayerNorms
compute and return float32, so the residual stream stays float32; logits are returned as float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm import dropout as dropout_lib

LAYER_NORM_EPSILON = 1e-12
INITIALIZER_STDDEV = 0.02


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
    # grad^T @ x, [N, K], and transposes it; on XLA:CPU this rule cut the reference train
    # step's CPU time by 12% (README 'Performance').
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


# `model.remat` values: the checkpoint policy of each transformer block ('none': no remat).
REMAT_POLICIES = {
    "full": None,  # Save only the block inputs.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# No stddev correction in jax's truncated_normal: values lie in (-0.04, 0.04), as in TF/BERT.
kernel_init = nn.initializers.truncated_normal(INITIALIZER_STDDEV)
layer_norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32)
dense = functools.partial(
    nn.Dense, param_dtype=jnp.float32, kernel_init=kernel_init, dot_general=kernel_dot_general
)
dense_general = functools.partial(
    nn.DenseGeneral,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    dot_general=kernel_dot_general,
)
# model.activation -> function: original BERT's tanh approximation, or the exact erf GELU.
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
}


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Boolean self-attention mask for packed, padded rows.

    Token i attends to token j iff both belong to the same non-zero segment. Padding queries
    (segment 0) attend only to themselves, so no softmax row is empty; nothing real sees them.

    Args:
      segment_ids: int [B, S], 1, 2, ... per packed sequence, 0 at padding.

    Returns:
      bool [B, 1, S, S] (broadcast over heads).
    """
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    key_is_real = (segment_ids != 0)[:, None, :]
    itself = jnp.eye(segment_ids.shape[1], dtype=bool)[None]
    return ((same_segment & key_is_real) | itself)[:, None]


def attention_implementation(dtype: jnp.dtype) -> str | None:
    """'cudnn' (cuDNN flash attention) on GPU for 16-bit inputs; None (XLA) otherwise."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return None


def fused_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    implementation: str | None = "auto",
) -> jax.Array:
    """Attention without dropout via `jax.nn.dot_product_attention`.

    The implementation is cuDNN's fused attention on GPU in bfloat16 / float16
    (`attention_implementation`), XLA's otherwise; where cuDNN refuses the inputs (no cuDNN,
    a shape or dtype it does not support) the XLA implementation runs instead, at trace time.

    Softmax precision, checked in jax 0.10.2 `jax/_src/nn/functions.py`
    (`_dot_product_attention_core`, used by the default 'xla' implementation): the QK^T einsum
    uses `preferred_element_type=promote_types(query.dtype, float32)` (dot algorithm
    BF16_BF16_F32 for bfloat16), so the logits are float32; the mask fills a finite large negative
    number; the logits are cast to float32 before the softmax; only the probabilities are cast back
    to the input dtype for the PV matmul. So with bfloat16 inputs the softmax already runs in
    float32 and nothing needs to be added here.

    Args:
      query, key, value: [B, T, N, D] in the compute dtype.
      mask: bool, broadcastable to [B, N, T, T].
      implementation: 'auto' (`attention_implementation`), 'cudnn', 'xla' or None (XLA).

    Returns:
      [B, T, N, D] in the input dtype.
    """
    if implementation == "auto":
        implementation = attention_implementation(query.dtype)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(
                query, key, value, mask=mask, implementation="cudnn"
            )
        except (RuntimeError, ValueError, NotImplementedError, TypeError):
            pass  # No cuDNN here, or inputs it does not take: XLA below.
    return jax.nn.dot_product_attention(query, key, value, mask=mask)


def dropout_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """`fused_attention` with dropout (`mlm.dropout`) on the attention probabilities.

    As `fused_attention` (and flax's `dot_product_attention`): float32 logits of the scaled
    query and the key, masked with the query dtype's lowest value, a float32 softmax, the
    probabilities cast to the value dtype for the PV matmul. The heads are moved in front of the
    sequence axis first ([B, N, T, D]), so both matmuls and their gradients are plain batched
    matmuls over (B, N): on the 2-core benchmark CPU a layer's attention forward + backward took
    19.3 ms against 22.7 ms with flax's [B, T, N, D] einsums, with bit-identical results.

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
        weights = dropout_lib.dropout(weights, dropout_rate, dropout_rng)
    context = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(value.dtype), heads_first(value))
    return heads_first(context)


class SelfAttention(nn.Module):
    """Multi-head self-attention with [H, N, D] projection kernels."""

    hidden_size: int
    num_heads: int
    attention_dropout_rate: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """Args: x [B, S, H]; mask bool [B, 1, S, S]. Returns: [B, S, H] in the compute dtype."""
        heads = (self.num_heads, self.hidden_size // self.num_heads)
        query = dense_general(heads, dtype=self.dtype, name="query")(x)
        key = dense_general(heads, dtype=self.dtype, name="key")(x)
        value = dense_general(heads, dtype=self.dtype, name="value")(x)
        if query.dtype == jnp.float16 and jax.default_backend() == "cpu":
            # XLA:CPU has no float16 x float16 -> float32 dot (F16_F16_F32): attention runs in
            # float32 there; accelerators keep float16.
            query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
        if not deterministic and self.attention_dropout_rate > 0:
            rate, rng = self.attention_dropout_rate, self.make_rng("dropout")
            context = dropout_attention(query, key, value, mask, dropout_rate=rate, dropout_rng=rng)
        else:
            context = fused_attention(query, key, value, mask)
        output = dense_general(self.hidden_size, axis=(-2, -1), dtype=self.dtype, name="output")
        return output(context)


class TransformerLayer(nn.Module):
    """Post-LN block: x = LN(x + drop(attn(x))); x = LN(x + drop(W2 act(W1 x))); act is a GELU."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: jnp.dtype = jnp.float32
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        """Args: x float32 [B, S, H]; mask bool [B, 1, S, S]. Returns: float32 [B, S, H].

        `deterministic` is positional so that `nn.remat` can mark it static.
        """
        dropout = dropout_lib.Dropout(self.dropout_rate, deterministic=deterministic)
        attended = SelfAttention(
            self.hidden_size,
            self.num_heads,
            self.attention_dropout_rate,
            dtype=self.dtype,
            name="attention",
        )(x, mask, deterministic=deterministic)
        x = layer_norm(name="attention_layer_norm")(x + dropout(attended))
        hidden = dense(self.intermediate_size, dtype=self.dtype, name="intermediate")(x)
        hidden = dense(self.hidden_size, dtype=self.dtype, name="output")(
            ACTIVATIONS[self.activation](hidden)
        )
        return layer_norm(name="output_layer_norm")(x + dropout(hidden))


class Encoder(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout, then `num_layers` blocks."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: jnp.dtype = jnp.float32
    activation: str = "gelu_tanh"
    remat: str = "none"

    def setup(self) -> None:
        embed = functools.partial(nn.Embed, features=self.hidden_size, embedding_init=kernel_init)
        self.word_embeddings = embed(self.vocab_size)
        self.position_embeddings = embed(self.max_position_embeddings)
        self.type_embeddings = embed(self.type_vocab_size)
        self.embeddings_layer_norm = layer_norm()
        self.embeddings_dropout = dropout_lib.Dropout(self.dropout_rate)
        layer_cls = TransformerLayer
        if self.remat != "none":
            # Activations of each block are recomputed in the backward pass (less memory, more
            # compute); 'dots' keeps the matmul outputs without a batch dimension.
            layer_cls = nn.remat(
                TransformerLayer, static_argnums=(3,), policy=REMAT_POLICIES[self.remat]
            )
        self.layers = [
            layer_cls(
                self.hidden_size,
                self.num_heads,
                self.intermediate_size,
                self.dropout_rate,
                self.attention_dropout_rate,
                dtype=self.dtype,
                activation=self.activation,
                name=f"layer_{i}",
            )
            for i in range(self.num_layers)
        ]

    def __call__(
        self,
        word_ids: jax.Array,
        type_ids: jax.Array,
        position_ids: jax.Array,
        segment_ids: jax.Array,
        *,
        deterministic: bool,
    ) -> jax.Array:
        """Encodes token ids.

        Args:
          word_ids, type_ids, position_ids, segment_ids: int [B, S] (see the batch format).
          deterministic: disables dropout when True.

        Returns:
          float32 [B, S, H] sequence output.
        """
        if word_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {word_ids.shape[1]} exceeds model.max_position_embeddings "
                f"({self.max_position_embeddings}); shorten data.seq_length or raise the limit"
            )
        # Padding positions may hold any value: pin them to 0, as an out-of-range id gathers NaN.
        position_ids = jnp.where(segment_ids != 0, position_ids, 0)
        x = (
            self.word_embeddings(word_ids)
            + self.position_embeddings(position_ids)
            + self.type_embeddings(type_ids)
        )
        x = self.embeddings_layer_norm(x)
        x = self.embeddings_dropout(x, deterministic=deterministic)
        mask = attention_mask(segment_ids)
        for layer in self.layers:
            x = layer(x, mask, deterministic)
        return x


@jax.custom_vjp
def add_vocab_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """`logits + bias` whose bias gradient is a ones-vector matmul instead of a sum over rows.

    On XLA:CPU (jax 0.10.2, 2-core AMD EPYC) the plain gradient, a reduction of the
    [B * P, V] logit gradient over its rows, took 95-125 ms alone for B * P = 640, V = 30522,
    the matmul about 2 ms (README 'Performance' has the whole-step effect); the two agree to
    float32 rounding.

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
    is computed as (x^T @ grad)^T: [H, V], then transposed. JAX's own transpose rule computes
    grad^T @ x, for which XLA:CPU first transposes the whole [M, V] logit gradient; the [H, V]
    result is smaller by M / H. On the 2-core benchmark CPU the reference train step took
    421.5 / 420.6 ms against 436.5 / 433.6 ms with the plain einsum (two runs, one process
    alternating the two).

    Args:
      x: [M, H] in the compute dtype.
      word_embeddings: [V, H] (float32 params), cast to the compute dtype for the products.

    Returns:
      float32 [M, V]. The gradients are those of the plain product, in the compute dtype.
    """
    return _matmul(x, word_embeddings.astype(x.dtype).T, jnp.float32)


class MaskedLMHead(nn.Module):
    """Dense + GELU + LayerNorm on the gathered slots, then tied word-embedding projection."""

    hidden_size: int
    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(
        self, sequence_output: jax.Array, positions: jax.Array, word_embeddings: jax.Array
    ) -> jax.Array:
        """Args: sequence_output [B, S, H]; positions int [B, P]; word_embeddings [V, H].

        Returns: float32 [B, P, V] logits.
        """
        x = jnp.take_along_axis(sequence_output, positions[:, :, None], axis=1)
        x = dense(self.hidden_size, dtype=self.dtype, name="dense")(x)
        x = layer_norm(name="layer_norm")(ACTIVATIONS[self.activation](x))
        x = x.astype(self.dtype)
        logits = tied_vocab_logits(x.reshape(-1, x.shape[-1]), word_embeddings)
        logits = logits.reshape(*x.shape[:-1], -1)
        output_bias = self.param("output_bias", nn.initializers.zeros, (self.vocab_size,))
        return add_vocab_bias(logits, output_bias)


class NextSentenceHead(nn.Module):
    """Pooler Dense(H, tanh) on the first ([CLS]) token, then a Dense(2) classifier."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sequence_output: jax.Array) -> jax.Array:
        """Args: sequence_output [B, S, H]. Returns: float32 [B, 2] logits."""
        pooler = dense(self.hidden_size, dtype=self.dtype, name="pooler")
        pooled = jnp.tanh(pooler(sequence_output[:, 0]))
        return dense(2, dtype=self.dtype, name="classifier")(pooled).astype(jnp.float32)


class BertForPreTraining(nn.Module):
    """BERT encoder with the masked-LM head and, if `use_next_sentence`, the next-sentence head."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    dtype: jnp.dtype = jnp.float32
    use_next_sentence: bool = False
    activation: str = "gelu_tanh"
    remat: str = "none"

    def setup(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                f"({self.num_heads}); change one of them"
            )
        self.encoder = Encoder(
            self.vocab_size,
            self.hidden_size,
            self.num_layers,
            self.num_heads,
            self.intermediate_size,
            self.max_position_embeddings,
            self.type_vocab_size,
            self.dropout_rate,
            self.attention_dropout_rate,
            dtype=self.dtype,
            remat=self.remat,
            activation=self.activation,
        )
        self.mlm_head = MaskedLMHead(
            self.hidden_size, self.vocab_size, dtype=self.dtype, activation=self.activation
        )
        if self.use_next_sentence:
            self.nsp_head = NextSentenceHead(self.hidden_size, dtype=self.dtype)

    def encode(self, batch: Mapping[str, jax.Array], *, deterministic: bool) -> jax.Array:
        """Runs the encoder.

        Args:
          batch: `input_word_ids`, `input_mask`, `input_type_ids`, optional `packed_segment_ids`
            (default `input_mask`) and `position_ids` (default arange(S)), all int [B, S].
          deterministic: disables dropout when True (otherwise needs a 'dropout' rng).

        Returns:
          float32 [B, S, H] sequence output.
        """
        word_ids = batch["input_word_ids"]
        segment_ids = batch.get("packed_segment_ids", batch["input_mask"])
        default_positions = jnp.broadcast_to(jnp.arange(word_ids.shape[1]), word_ids.shape)
        position_ids = batch.get("position_ids", default_positions)
        return self.encoder(
            word_ids,
            batch["input_type_ids"],
            position_ids,
            segment_ids,
            deterministic=deterministic,
        )

    def __call__(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> dict[str, jax.Array]:
        """Computes pretraining logits.

        Args:
          batch: the `encode` inputs plus `masked_lm_positions` int [B, P].
          deterministic: disables dropout when True (otherwise needs a 'dropout' rng).

        Returns:
          {"mlm_logits": float32 [B, P, V]} plus "nsp_logits": float32 [B, 2] with next-sentence.
        """
        sequence_output = self.encode(batch, deterministic=deterministic)
        word_embeddings = self.encoder.word_embeddings.embedding
        outputs = {
            "mlm_logits": self.mlm_head(
                sequence_output, batch["masked_lm_positions"], word_embeddings
            )
        }
        if self.use_next_sentence:
            outputs["nsp_logits"] = self.nsp_head(sequence_output)
        return outputs
