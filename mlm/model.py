"""BERT encoder (post-LN, as original BERT / Model Garden `BertEncoder`) and pretraining heads.

Parameters are always float32; `dtype` only sets the compute dtype of the matmuls. LayerNorms
compute and return float32, so the residual stream stays float32; logits are returned as float32.
The products, dropout and attention come from a `mlm.kernels.KernelSet` (chosen per backend);
the parameter tree is the same whichever set runs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm.kernels import KernelSet
from mlm.kernels import select as select_kernels

LAYER_NORM_EPSILON = 1e-12
INITIALIZER_STDDEV = 0.02


# `model.remat` values: the checkpoint policy of each transformer block ('none': no remat).
REMAT_POLICIES = {
    "full": None,  # Save only the block inputs.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# No stddev correction in jax's truncated_normal: values lie in (-0.04, 0.04), as in TF/BERT.
kernel_init = nn.initializers.truncated_normal(INITIALIZER_STDDEV)
layer_norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32)


def dense(features: int, *, kernels: KernelSet, **kwargs) -> nn.Dense:
    """A float32-param Dense layer with BERT's init and the kernel set's product."""
    return nn.Dense(
        features,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        dot_general=kernels.dot_general,
        **kwargs,
    )


def dense_general(features, *, kernels: KernelSet, **kwargs) -> nn.DenseGeneral:
    """A float32-param DenseGeneral layer with BERT's init and the kernel set's product."""
    return nn.DenseGeneral(
        features,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        dot_general=kernels.dot_general,
        **kwargs,
    )


# model.activation -> function: original BERT's tanh approximation, or the exact erf GELU.
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
}


def constrain_rows(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Pins an activation's sharding to the batch's (rows split, features whole), if given.

    Under FSDP the large kernels are split along a feature dimension; left to itself, XLA's
    sharding propagation then splits activations along their features too and gathers rows,
    which costs more memory than the state it saves. Pinning the activations to the batch
    sharding makes it gather each layer's weights instead (ZeRO-3).

    Args:
      x: an activation whose leading axis is the batch's rows.
      sharding: the batch sharding (`parallel.batch_sharding`), or None (no constraint).

    Returns:
      x, constrained.
    """
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


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


class SelfAttention(nn.Module):
    """Multi-head self-attention with [H, N, D] projection kernels."""

    hidden_size: int
    num_heads: int
    attention_dropout_rate: float
    dtype: jnp.dtype = jnp.float32
    kernels: KernelSet = KernelSet()
    row_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """Args: x [B, S, H]; mask bool [B, 1, S, S]. Returns: [B, S, H] in the compute dtype."""
        heads = (self.num_heads, self.hidden_size // self.num_heads)
        project = functools.partial(dense_general, kernels=self.kernels, dtype=self.dtype)
        query, key, value = (
            constrain_rows(project(heads, name=name)(x), self.row_sharding)
            for name in ("query", "key", "value")
        )
        rate, rng = 0.0, None
        if not deterministic and self.attention_dropout_rate > 0:
            rate, rng = self.attention_dropout_rate, self.make_rng("dropout")
        context = self.kernels.attention(
            query, key, value, mask, dropout_rate=rate, dropout_rng=rng
        )
        return project(self.hidden_size, axis=(-2, -1), name="output")(context)


class TransformerLayer(nn.Module):
    """Post-LN block: x = LN(x + drop(attn(x))); x = LN(x + drop(W2 act(W1 x))); act is a GELU."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: jnp.dtype = jnp.float32
    activation: str = "gelu_tanh"
    kernels: KernelSet = KernelSet()
    row_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        """Args: x float32 [B, S, H]; mask bool [B, 1, S, S]. Returns: float32 [B, S, H].

        `deterministic` is positional so that `nn.remat` can mark it static.
        """
        dropout = self.kernels.dropout(self.dropout_rate, deterministic=deterministic)
        attended = SelfAttention(
            self.hidden_size,
            self.num_heads,
            self.attention_dropout_rate,
            dtype=self.dtype,
            kernels=self.kernels,
            row_sharding=self.row_sharding,
            name="attention",
        )(x, mask, deterministic=deterministic)
        x = layer_norm(name="attention_layer_norm")(x + dropout(attended))
        x = constrain_rows(x, self.row_sharding)
        ffn = functools.partial(dense, kernels=self.kernels, dtype=self.dtype)
        hidden = constrain_rows(
            ffn(self.intermediate_size, name="intermediate")(x), self.row_sharding
        )
        hidden = ffn(self.hidden_size, name="output")(ACTIVATIONS[self.activation](hidden))
        return constrain_rows(
            layer_norm(name="output_layer_norm")(x + dropout(hidden)), self.row_sharding
        )


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
    kernels: KernelSet = KernelSet()
    row_sharding: jax.sharding.Sharding | None = None

    def setup(self) -> None:
        embed = functools.partial(nn.Embed, features=self.hidden_size, embedding_init=kernel_init)
        self.word_embeddings = embed(self.vocab_size)
        self.position_embeddings = embed(self.max_position_embeddings)
        self.type_embeddings = embed(self.type_vocab_size)
        self.embeddings_layer_norm = layer_norm()
        self.embeddings_dropout = self.kernels.dropout(self.dropout_rate)
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
                kernels=self.kernels,
                row_sharding=self.row_sharding,
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
        x = constrain_rows(x, self.row_sharding)
        mask = attention_mask(segment_ids)
        for layer in self.layers:
            x = layer(x, mask, deterministic)
        return x


class MaskedLMHead(nn.Module):
    """Dense + GELU + LayerNorm on the gathered slots, then tied word-embedding projection."""

    hidden_size: int
    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    activation: str = "gelu_tanh"
    kernels: KernelSet = KernelSet()

    @nn.compact
    def __call__(
        self, sequence_output: jax.Array, positions: jax.Array, word_embeddings: jax.Array
    ) -> jax.Array:
        """Args: sequence_output [B, S, H]; positions int [B, P]; word_embeddings [V, H].

        Returns: float32 [B, P, V] logits.
        """
        x = jnp.take_along_axis(sequence_output, positions[:, :, None], axis=1)
        x = dense(self.hidden_size, kernels=self.kernels, dtype=self.dtype, name="dense")(x)
        x = layer_norm(name="layer_norm")(ACTIVATIONS[self.activation](x))
        x = x.astype(self.dtype)
        logits = self.kernels.vocab_logits(x.reshape(-1, x.shape[-1]), word_embeddings)
        logits = logits.reshape(*x.shape[:-1], -1)
        output_bias = self.param("output_bias", nn.initializers.zeros, (self.vocab_size,))
        return self.kernels.add_vocab_bias(logits, output_bias)


class NextSentenceHead(nn.Module):
    """Pooler Dense(H, tanh) on the first ([CLS]) token, then a Dense(2) classifier."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    kernels: KernelSet = KernelSet()

    @nn.compact
    def __call__(self, sequence_output: jax.Array) -> jax.Array:
        """Args: sequence_output [B, S, H]. Returns: float32 [B, 2] logits."""
        layer = functools.partial(dense, kernels=self.kernels, dtype=self.dtype)
        pooled = jnp.tanh(layer(self.hidden_size, name="pooler")(sequence_output[:, 0]))
        return layer(2, name="classifier")(pooled).astype(jnp.float32)


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
    # The backend kernels (`mlm.kernels.select`); None: `model.kernels=auto` for the default
    # devices (`task.build_model` passes the set for the mesh the step is compiled for).
    kernels: KernelSet | None = None
    # The batch sharding its activations keep (`constrain_rows`; FSDP needs it); None: XLA
    # chooses (one device, or a caller without a mesh).
    row_sharding: jax.sharding.Sharding | None = None

    def setup(self) -> None:
        kernel_set = self.kernels or select_kernels("auto", jax.devices()[0].platform)
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
            kernels=kernel_set,
            row_sharding=self.row_sharding,
        )
        self.mlm_head = MaskedLMHead(
            self.hidden_size,
            self.vocab_size,
            dtype=self.dtype,
            activation=self.activation,
            kernels=kernel_set,
        )
        if self.use_next_sentence:
            self.nsp_head = NextSentenceHead(self.hidden_size, dtype=self.dtype, kernels=kernel_set)

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
