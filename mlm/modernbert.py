"""ModernBERT encoder (Hugging Face's `ModernBertForMaskedLM`) with mlm's pretraining heads.

The blocks are pre-LN with LayerNorms and dense layers without biases; the first block takes its
input without a LayerNorm (the embeddings are already normalised). Positions enter as rotary
embeddings of the queries and keys (no position table), with one rotary base for the global
layers and another for the local ones. Layer i attends globally iff
i % global_attn_every_n_layers == 0; the other layers attend within a window of
local_attention // 2 tokens on each side (Hugging Face's rule |i - j| <= local_attention // 2),
always inside the token's own packed sequence. The feed-forward block is a GeGLU:
Wo(drop(act(x Wi_input) * x Wi_gate)). The masked-LM head is dense, activation, LayerNorm, then
the tied word-embedding product plus a bias, on the gathered slots only.

Parameters are float32 and `dtype` sets the compute dtype of the products, as in
`mlm.model.BertForPreTraining`, whose interface (batch format, outputs, heads, remat, kernel
set) this model shares. Rotary tables and the rotation are computed in float32. The fused
Wqkv is kept as one [H, 3, N, D] kernel and Wi as [H, 2, I], so each is one product and a
Hugging Face checkpoint converts by a transpose and a reshape (`mlm.interop.modernbert_layout`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlm.heads import NEXT_SENTENCE, HeadSpec, next_sentence_spec
from mlm.kernels import KernelSet
from mlm.kernels import select as select_kernels
from mlm.model import (
    ACTIVATIONS,
    INITIALIZER_STDDEV,
    REMAT_POLICIES,
    ClassificationHead,
    ClassificationHeads,
    attention_mask,
    constrain_rows,
    dense_general,
    truncated_normal,
)

NORM_EPSILON = 1e-5


def layer_norm(epsilon: float, name: str | None = None) -> nn.LayerNorm:
    """A float32 LayerNorm without bias, its variance taken as E[(x - E[x])^2] as PyTorch does."""
    return nn.LayerNorm(
        epsilon=epsilon,
        use_bias=False,
        use_fast_variance=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name=name,
    )


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """Rotary inverse frequencies 1 / theta^(2k / head_dim), k < head_dim / 2, as float32.

    Computed in float32 as Hugging Face computes them, once per trace (a constant).

    Args:
      head_dim: the attention head width (even).
      theta: the rotary base.

    Returns:
      float32 [head_dim // 2].
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return np.float32(1.0) / np.power(np.float32(theta), exponents)


def rotary_tables(
    position_ids: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, the frequencies repeated over both halves.

    Args:
      position_ids: int [B, S].
      head_dim: the attention head width.
      theta: the rotary base.

    Returns:
      (cos, sin), each float32 [B, S, 1, head_dim] (broadcast over heads).
    """
    frequencies = position_ids.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)
    angles = jnp.concatenate([frequencies, frequencies], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x's two halves by the angles: x cos + rotate_half(x) sin, in float32.

    Args:
      x: [B, S, N, D] queries or keys.
      cos, sin: float32 [B, S, 1, D] (`rotary_tables`).

    Returns:
      [B, S, N, D] in x's dtype.
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def sliding_window(seq_len: int, local_attention: int) -> jax.Array:
    """Which tokens a local layer's token sees: |i - j| <= local_attention // 2.

    Args:
      seq_len: S.
      local_attention: the window width (Hugging Face's `local_attention`).

    Returns:
      bool [1, 1, S, S].
    """
    index = jnp.arange(seq_len)
    return (jnp.abs(index[:, None] - index[None, :]) <= local_attention // 2)[None, None]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The fields of `ModernBertForPreTraining` its submodules read (hashable: a module field).

    `kernels` is resolved; `output_stddev` is Hugging Face's init stddev of the layers writing
    into the residual stream and of the head's dense layer, initializer_range / sqrt(2 L).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: jnp.dtype
    activation: str
    mlm_activation: str
    remat: str
    initializer_range: float
    global_attn_every_n_layers: int
    local_attention: int
    global_rope_theta: float
    local_rope_theta: float
    norm_eps: float
    kernels: KernelSet
    row_sharding: jax.sharding.Sharding | None

    @property
    def output_stddev(self) -> float:
        return self.initializer_range / math.sqrt(2.0 * self.num_layers)

    def is_global(self, layer: int) -> bool:
        """Whether a layer attends over its whole sequence (else within the local window)."""
        return layer % self.global_attn_every_n_layers == 0

    def dense(
        self, features: int | tuple[int, ...], stddev: float, name: str, **kwargs
    ) -> nn.DenseGeneral:
        """A bias-free DenseGeneral in the compute dtype with the kernel set's product."""
        return dense_general(
            features,
            kernels=self.kernels,
            stddev=stddev,
            dtype=self.dtype,
            use_bias=False,
            name=name,
            **kwargs,
        )


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with a fused [H, 3, N, D] Wqkv, rotary positions, no biases."""

    settings: Settings

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, rotary: tuple[jax.Array, ...], deterministic: bool
    ) -> jax.Array:
        """Args: x [B, S, H]; mask bool [B, 1, S, S]; rotary (cos, sin) [B, S, 1, D].

        Returns: [B, S, H] in the compute dtype, after the output dropout.
        """
        s = self.settings
        heads = (3, s.num_heads, s.hidden_size // s.num_heads)
        qkv = s.dense(heads, s.initializer_range, "qkv")(x)
        qkv = constrain_rows(qkv, s.row_sharding)
        query, key = (apply_rotary(qkv[:, :, i], *rotary) for i in (0, 1))
        rate, rng = 0.0, None
        if not deterministic and s.attention_dropout_rate > 0:
            rate, rng = s.attention_dropout_rate, self.make_rng("dropout")
        context = s.kernels.attention(
            query, key, qkv[:, :, 2], mask, dropout_rate=rate, dropout_rng=rng
        )
        out = s.dense(s.hidden_size, s.output_stddev, "output", axis=(-2, -1))(context)
        dropout = s.kernels.dropout(s.attention_dropout_rate, name="output_dropout")
        return dropout(out, deterministic=deterministic)


class GatedFeedForward(nn.Module):
    """GeGLU: Wo(drop(act(x Wi[:, 0]) * x Wi[:, 1])), Wi [H, 2, I], no biases."""

    settings: Settings

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        """Args: x [B, S, H]. Returns: [B, S, H] in the compute dtype."""
        s = self.settings
        hidden = s.dense((2, s.intermediate_size), s.initializer_range, "intermediate")(x)
        hidden = constrain_rows(hidden, s.row_sharding)
        gated = ACTIVATIONS[s.activation](hidden[..., 0, :]) * hidden[..., 1, :]
        gated = s.kernels.dropout(s.dropout_rate)(gated, deterministic=deterministic)
        return s.dense(s.hidden_size, s.output_stddev, "output")(gated)


class ModernBertLayer(nn.Module):
    """One pre-LN block: x += attn(LN(x)) (no LN in the first block); x += mlp(LN(x))."""

    settings: Settings
    first: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array, deterministic: bool
    ) -> jax.Array:
        """Args: x float32 [B, S, H]; mask bool [B, 1, S, S]; cos, sin float32 [B, S, 1, D].

        Returns: float32 [B, S, H]. `deterministic` is positional so that `nn.remat` can mark
        it static.
        """
        s = self.settings
        normed = x if self.first else layer_norm(s.norm_eps, "attention_layer_norm")(x)
        attended = RotarySelfAttention(s, name="attention")(normed, mask, (cos, sin), deterministic)
        x = constrain_rows(x + attended, s.row_sharding)
        normed = layer_norm(s.norm_eps, "mlp_layer_norm")(x)
        return constrain_rows(
            x + GatedFeedForward(s, name="mlp")(normed, deterministic), s.row_sharding
        )


class ModernBertEncoder(nn.Module):
    """Word embeddings, LayerNorm, dropout, `num_layers` blocks and a final LayerNorm."""

    settings: Settings

    def setup(self) -> None:
        s = self.settings
        self.word_embeddings = nn.Embed(
            s.vocab_size, s.hidden_size, embedding_init=truncated_normal(s.initializer_range)
        )
        self.embeddings_layer_norm = layer_norm(s.norm_eps)
        self.embeddings_dropout = s.kernels.dropout(s.dropout_rate)
        layer_cls = ModernBertLayer
        if s.remat != "none":
            # As BertForPreTraining: recompute each block's activations in the backward pass.
            layer_cls = nn.remat(
                ModernBertLayer, static_argnums=(5,), policy=REMAT_POLICIES[s.remat]
            )
        self.layers = [layer_cls(s, first=i == 0, name=f"layer_{i}") for i in range(s.num_layers)]
        self.final_layer_norm = layer_norm(s.norm_eps)

    def __call__(
        self,
        word_ids: jax.Array,
        position_ids: jax.Array,
        segment_ids: jax.Array,
        *,
        deterministic: bool,
    ) -> jax.Array:
        """Encodes token ids.

        Args:
          word_ids, position_ids, segment_ids: int [B, S] (see the batch format).
          deterministic: disables dropout when True.

        Returns:
          float32 [B, S, H], after the final LayerNorm.
        """
        s, seq_len = self.settings, word_ids.shape[1]
        if seq_len > s.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds model.max_position_embeddings "
                f"({s.max_position_embeddings}); shorten data.seq_length or raise the limit"
            )
        x = self.embeddings_layer_norm(self.word_embeddings(word_ids))
        x = constrain_rows(self.embeddings_dropout(x, deterministic=deterministic), s.row_sharding)
        head_dim = s.hidden_size // s.num_heads
        masks = {True: attention_mask(segment_ids)}
        tables = {True: rotary_tables(position_ids, head_dim, s.global_rope_theta)}
        if not all(s.is_global(i) for i in range(s.num_layers)):
            masks[False] = masks[True] & sliding_window(seq_len, s.local_attention)
            tables[False] = rotary_tables(position_ids, head_dim, s.local_rope_theta)
        for i, layer in enumerate(self.layers):
            scope = s.is_global(i)
            x = layer(x, masks[scope], *tables[scope], deterministic)
        return self.final_layer_norm(x)


class ModernBertMaskedLMHead(nn.Module):
    """Dense (no bias), activation, LayerNorm (no bias), tied word-embedding product + bias."""

    settings: Settings

    @nn.compact
    def __call__(
        self, sequence_output: jax.Array, positions: jax.Array, word_embeddings: jax.Array
    ) -> jax.Array:
        """Args: sequence_output [B, S, H]; positions int [B, P]; word_embeddings [V, H].

        Returns: float32 [B, P, V] logits.
        """
        s = self.settings
        x = jnp.take_along_axis(sequence_output, positions[:, :, None], axis=1)
        x = s.dense(word_embeddings.shape[-1], s.output_stddev, "dense")(x)
        x = ACTIVATIONS[s.mlm_activation or s.activation](x)
        x = layer_norm(s.norm_eps, "layer_norm")(x).astype(s.dtype)
        logits = s.kernels.vocab_logits(x.reshape(-1, x.shape[-1]), word_embeddings)
        logits = logits.reshape(*x.shape[:-1], -1)
        output_bias = self.param("output_bias", nn.initializers.zeros, (s.vocab_size,))
        return s.kernels.add_vocab_bias(logits, output_bias)


class ModernBertForPreTraining(nn.Module):
    """ModernBERT encoder with the masked-LM head and the classification heads (`mlm.heads`).

    The interface of `mlm.model.BertForPreTraining`; `input_type_ids` is ignored (ModernBERT
    has no token types). The heads are `cls_heads`, or without them the next-sentence head if
    `use_next_sentence`.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # The GeGLU width: Wi maps H to 2 * intermediate_size.
    max_position_embeddings: int
    dropout_rate: float = 0.0  # Hugging Face's embedding_dropout and mlp_dropout.
    attention_dropout_rate: float = 0.0  # On the probabilities and the attention output.
    dtype: jnp.dtype = jnp.float32
    use_next_sentence: bool = False
    cls_heads: tuple[HeadSpec, ...] = ()
    activation: str = "gelu"  # hidden_activation.
    mlm_activation: str = ""  # classifier_activation ('': `activation`).
    remat: str = "none"
    initializer_range: float = INITIALIZER_STDDEV
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    norm_eps: float = NORM_EPSILON
    kernels: KernelSet | None = None
    row_sharding: jax.sharding.Sharding | None = None

    def setup(self) -> None:
        kernel_set = self.kernels or select_kernels("auto", jax.devices()[0].platform)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                f"({self.num_heads}) into an even head width (rotary halves); change one of them"
            )
        names = [f.name for f in dataclasses.fields(Settings) if f.name != "kernels"]
        settings = Settings(kernels=kernel_set, **{name: getattr(self, name) for name in names})
        self.encoder = ModernBertEncoder(settings)
        self.mlm_head = ModernBertMaskedLMHead(settings)
        heads = self.head_specs()
        head_args = dict(
            dtype=self.dtype, initializer_range=self.initializer_range, kernels=kernel_set
        )
        for spec in heads:
            if spec.name == NEXT_SENTENCE:
                self.nsp_head = ClassificationHead(spec, **head_args)
        others = tuple(spec for spec in heads if spec.name != NEXT_SENTENCE)
        if others:
            self.other_heads = ClassificationHeads(others, **head_args, name="cls_heads")

    def head_specs(self) -> tuple[HeadSpec, ...]:
        """The classification heads: `cls_heads`, else next-sentence with `use_next_sentence`."""
        if self.cls_heads:
            return self.cls_heads
        return (next_sentence_spec(self.hidden_size),) if self.use_next_sentence else ()

    def encode(self, batch: Mapping[str, jax.Array], *, deterministic: bool) -> jax.Array:
        """Runs the encoder.

        Args:
          batch: `input_word_ids`, `input_mask`, optional `packed_segment_ids` (default
            `input_mask`) and `position_ids` (default arange(S)), all int [B, S];
            `input_type_ids` may be present and is ignored.
          deterministic: disables dropout when True (otherwise needs a 'dropout' rng).

        Returns:
          float32 [B, S, H] sequence output (after the final LayerNorm).
        """
        word_ids = batch["input_word_ids"]
        segment_ids = batch.get("packed_segment_ids", batch["input_mask"])
        default_positions = jnp.broadcast_to(jnp.arange(word_ids.shape[1]), word_ids.shape)
        position_ids = batch.get("position_ids", default_positions)
        return self.encoder(word_ids, position_ids, segment_ids, deterministic=deterministic)

    def __call__(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool
    ) -> dict[str, jax.Array]:
        """Computes pretraining logits.

        Args:
          batch: the `encode` inputs plus `masked_lm_positions` int [B, P].
          deterministic: disables dropout when True (otherwise needs a 'dropout' rng).

        Returns:
          {"mlm_logits": float32 [B, P, V]} plus each classification head's float32
          [B, num_classes] logits (`mlm.heads.logits_key`: "nsp_logits" for next-sentence).
        """
        sequence_output = self.encode(batch, deterministic=deterministic)
        word_embeddings = self.encoder.word_embeddings.embedding
        outputs = {
            "mlm_logits": self.mlm_head(
                sequence_output, batch["masked_lm_positions"], word_embeddings
            )
        }
        names = [spec.name for spec in self.head_specs()]
        if NEXT_SENTENCE in names:
            outputs["nsp_logits"] = self.nsp_head(sequence_output, deterministic=deterministic)
        if len(names) > (NEXT_SENTENCE in names):
            outputs.update(self.other_heads(sequence_output, deterministic=deterministic))
        return outputs
