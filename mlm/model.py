"""BERT encoder (Model Garden's `BertEncoderV2`) and pretraining heads.

The blocks are post-LN, as original BERT, or pre-LN with `norm_first` (Model Garden's
`TransformerEncoderBlock(norm_first=True)`); the word embeddings may be narrower than the hidden
size (`embedding_size`, Model Garden's `embedding_width`), projected up by a dense layer and tied
to the masked-LM output through a head that projects back down to that width. With
`num_hidden_groups` G the layers share G blocks of parameters (ALBERT's cross-layer sharing):
factorised embeddings plus sharing is ALBERT, whose sentence-order head is the next-sentence head.

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

from mlm.heads import NEXT_SENTENCE, HeadSpec, logits_key, next_sentence_spec
from mlm.kernels import KernelSet
from mlm.kernels import select as select_kernels

LAYER_NORM_EPSILON = 1e-12
# The default of `model.initializer_range` and `model.mlm_initializer_range`.
INITIALIZER_STDDEV = 0.02


# `model.remat` values: the checkpoint policy of each transformer block ('none': no remat).
REMAT_POLICIES = {
    "full": None,  # Save only the block inputs.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

layer_norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32)


def truncated_normal(stddev: float = INITIALIZER_STDDEV) -> nn.initializers.Initializer:
    """BERT's initializer: a normal of `stddev` cut at +-2 stddev.

    No stddev correction in jax's truncated_normal (nor in TF's): with 0.02 the values lie in
    (-0.04, 0.04) and their standard deviation is 0.88 * 0.02.
    """
    return nn.initializers.truncated_normal(stddev)


def dense(
    features: int, *, kernels: KernelSet, stddev: float = INITIALIZER_STDDEV, **kwargs
) -> nn.Dense:
    """A float32-param Dense layer with BERT's init and the kernel set's product."""
    return nn.Dense(
        features,
        param_dtype=jnp.float32,
        kernel_init=truncated_normal(stddev),
        dot_general=kernels.dot_general,
        **kwargs,
    )


def dense_general(
    features, *, kernels: KernelSet, stddev: float = INITIALIZER_STDDEV, **kwargs
) -> nn.DenseGeneral:
    """A float32-param DenseGeneral layer with BERT's init and the kernel set's product."""
    return nn.DenseGeneral(
        features,
        param_dtype=jnp.float32,
        kernel_init=truncated_normal(stddev),
        dot_general=kernels.dot_general,
        **kwargs,
    )


# model.activation / model.mlm_activation -> function (mlm.config.ACTIVATIONS lists the names):
# original BERT's tanh-approximated GELU, the exact erf GELU, ReLU, and SiLU (= swish).
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
}
# A classification head's activation (`mlm.heads.ACTIVATIONS`): Model Garden's tanh or the above.
HEAD_ACTIVATIONS = {"tanh": jnp.tanh, **ACTIVATIONS}


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
    initializer_range: float = INITIALIZER_STDDEV
    kernels: KernelSet = KernelSet()
    row_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        """Args: x [B, S, H]; mask bool [B, 1, S, S]. Returns: [B, S, H] in the compute dtype."""
        heads = (self.num_heads, self.hidden_size // self.num_heads)
        project = functools.partial(
            dense_general, kernels=self.kernels, stddev=self.initializer_range, dtype=self.dtype
        )
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
    """One transformer block, post-LN (original BERT) or pre-LN (`norm_first`).

    Post-LN: x = LN1(x + drop(attn(x))); x = LN2(x + drop(W2 act(W1 x))).
    Pre-LN:  x = x + drop(attn(LN1(x)));  x = x + drop(W2 act(W1 LN2(x))), as Model Garden's
    `TransformerEncoderBlock(norm_first=True)`. The two have the same parameters.
    """

    hidden_size: int
    num_heads: int
    intermediate_size: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: jnp.dtype = jnp.float32
    activation: str = "gelu_tanh"
    norm_first: bool = False
    initializer_range: float = INITIALIZER_STDDEV
    kernels: KernelSet = KernelSet()
    row_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        """Args: x float32 [B, S, H]; mask bool [B, 1, S, S]. Returns: float32 [B, S, H].

        `deterministic` is positional so that `nn.remat` can mark it static.
        """
        dropout = self.kernels.dropout(self.dropout_rate, deterministic=deterministic)
        attention_norm = layer_norm(name="attention_layer_norm")
        output_norm = layer_norm(name="output_layer_norm")
        attention = SelfAttention(
            self.hidden_size,
            self.num_heads,
            self.attention_dropout_rate,
            dtype=self.dtype,
            initializer_range=self.initializer_range,
            kernels=self.kernels,
            row_sharding=self.row_sharding,
            name="attention",
        )
        ffn = functools.partial(
            dense, kernels=self.kernels, stddev=self.initializer_range, dtype=self.dtype
        )
        intermediate = ffn(self.intermediate_size, name="intermediate")
        output = ffn(self.hidden_size, name="output")

        def feed_forward(y: jax.Array) -> jax.Array:
            hidden = constrain_rows(intermediate(y), self.row_sharding)
            return output(ACTIVATIONS[self.activation](hidden))

        if self.norm_first:
            attended = attention(attention_norm(x), mask, deterministic=deterministic)
            x = constrain_rows(x + dropout(attended), self.row_sharding)
            return constrain_rows(x + dropout(feed_forward(output_norm(x))), self.row_sharding)
        attended = attention(x, mask, deterministic=deterministic)
        x = constrain_rows(attention_norm(x + dropout(attended)), self.row_sharding)
        return constrain_rows(output_norm(x + dropout(feed_forward(x))), self.row_sharding)


class Encoder(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout, then `num_layers` blocks.

    With `embedding_size` E other than the hidden size H (Model Garden's `embedding_width`), the
    three embeddings and their LayerNorm are E wide and a dense layer `embedding_projection`
    maps them to H. With `norm_first` the blocks are pre-LN; as in Model Garden's
    `BertEncoderV2`, the embeddings keep their LayerNorm and the last block's output is returned
    as it is (the masked-LM head normalises its own input).

    With `num_hidden_groups` G > 0 (ALBERT's cross-layer sharing, `num_layers` divisible by G)
    there are G blocks `layer_0` .. `layer_{G-1}` and layer i applies block i // (num_layers / G),
    as Hugging Face's `AlbertTransformer` (inner_group_num 1). With 0 each layer has its own
    block, the parameters of G = num_layers.
    """

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
    embedding_size: int = 0  # 0: hidden_size, no projection.
    norm_first: bool = False
    initializer_range: float = INITIALIZER_STDDEV
    kernels: KernelSet = KernelSet()
    row_sharding: jax.sharding.Sharding | None = None
    num_hidden_groups: int = 0  # 0: one block per layer (no sharing).

    def setup(self) -> None:
        groups = self.num_hidden_groups
        if groups < 0 or (groups and self.num_layers % groups):
            raise ValueError(
                f"model.albert.num_hidden_groups ({groups}) must be 0 or divide model.num_layers "
                f"({self.num_layers}); change one of them"
            )
        width = self.embedding_size or self.hidden_size
        embed = functools.partial(
            nn.Embed, features=width, embedding_init=truncated_normal(self.initializer_range)
        )
        self.word_embeddings = embed(self.vocab_size)
        self.position_embeddings = embed(self.max_position_embeddings)
        self.type_embeddings = embed(self.type_vocab_size)
        self.embeddings_layer_norm = layer_norm()
        self.embeddings_dropout = self.kernels.dropout(self.dropout_rate)
        if width != self.hidden_size:
            self.embedding_projection = dense(
                self.hidden_size,
                kernels=self.kernels,
                stddev=self.initializer_range,
                dtype=self.dtype,
            )
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
                norm_first=self.norm_first,
                initializer_range=self.initializer_range,
                kernels=self.kernels,
                row_sharding=self.row_sharding,
                name=f"layer_{i}",
            )
            for i in range(self.num_hidden_groups or self.num_layers)
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
        if (self.embedding_size or self.hidden_size) != self.hidden_size:
            x = self.embedding_projection(x).astype(jnp.float32)
        x = constrain_rows(x, self.row_sharding)
        mask = attention_mask(segment_ids)
        for i in range(self.num_layers):  # Layer i applies block floor(i / (L / G)).
            x = self.layers[i * len(self.layers) // self.num_layers](x, mask, deterministic)
        return x


class MaskedLMHead(nn.Module):
    """Dense + activation + LayerNorm on the gathered slots, then the tied word-embedding product.

    The dense layer maps the hidden size H to the width E of the word-embedding table (H unless
    `model.embedding_size` is set), as Model Garden's `MaskedLM` does, so the logits are the
    transformed slots against the [V, E] table.
    """

    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    activation: str = "gelu_tanh"
    initializer_range: float = INITIALIZER_STDDEV
    kernels: KernelSet = KernelSet()

    @nn.compact
    def __call__(
        self, sequence_output: jax.Array, positions: jax.Array, word_embeddings: jax.Array
    ) -> jax.Array:
        """Args: sequence_output [B, S, H]; positions int [B, P]; word_embeddings [V, E].

        Returns: float32 [B, P, V] logits.
        """
        x = jnp.take_along_axis(sequence_output, positions[:, :, None], axis=1)
        x = dense(
            word_embeddings.shape[-1],
            kernels=self.kernels,
            stddev=self.initializer_range,
            dtype=self.dtype,
            name="dense",
        )(x)
        x = layer_norm(name="layer_norm")(ACTIVATIONS[self.activation](x))
        x = x.astype(self.dtype)
        logits = self.kernels.vocab_logits(x.reshape(-1, x.shape[-1]), word_embeddings)
        logits = logits.reshape(*x.shape[:-1], -1)
        output_bias = self.param("output_bias", nn.initializers.zeros, (self.vocab_size,))
        return self.kernels.add_vocab_bias(logits, output_bias)


class ClassificationHead(nn.Module):
    """A `model.cls_heads` head (Model Garden's `ClassificationHead`, `mlm.heads`).

    Dense(inner_dim) + activation on the token at `cls_token_idx`, dropout, then
    Dense(num_classes). The next-sentence head (inner_dim H, tanh, no dropout, token 0, 2 classes)
    is original BERT's pooler and `cls/seq_relationship`.
    """

    spec: HeadSpec
    dtype: jnp.dtype = jnp.float32
    initializer_range: float = INITIALIZER_STDDEV
    kernels: KernelSet = KernelSet()

    @nn.compact
    def __call__(self, sequence_output: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Args: sequence_output [B, S, H]. Returns: float32 [B, num_classes] logits."""
        spec = self.spec
        layer = functools.partial(
            dense, kernels=self.kernels, stddev=self.initializer_range, dtype=self.dtype
        )
        pooled = layer(spec.inner_dim, name="pooler")(sequence_output[:, spec.cls_token_idx])
        pooled = HEAD_ACTIVATIONS[spec.activation](pooled)
        if spec.dropout_rate > 0:
            pooled = self.kernels.dropout(spec.dropout_rate)(pooled, deterministic=deterministic)
        return layer(spec.num_classes, name="classifier")(pooled).astype(jnp.float32)


class ClassificationHeads(nn.Module):
    """The heads other than next_sentence, each a submodule under its own name."""

    specs: tuple[HeadSpec, ...]
    dtype: jnp.dtype = jnp.float32
    initializer_range: float = INITIALIZER_STDDEV
    kernels: KernelSet = KernelSet()

    @nn.compact
    def __call__(self, sequence_output: jax.Array, *, deterministic: bool) -> dict[str, jax.Array]:
        """Returns {logits key: float32 [B, num_classes]}, in config order."""
        return {
            logits_key(spec.name): ClassificationHead(
                spec,
                dtype=self.dtype,
                initializer_range=self.initializer_range,
                kernels=self.kernels,
                name=spec.name,
            )(sequence_output, deterministic=deterministic)
            for spec in self.specs
        }


class BertForPreTraining(nn.Module):
    """BERT encoder with the masked-LM head and the classification heads (`mlm.heads`).

    The heads are `cls_heads`, or without them the next-sentence head if `use_next_sentence`.
    The one named next_sentence is `nsp_head` (its parameters named as before heads were
    configurable); the others live under `cls_heads/NAME`.
    """

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
    cls_heads: tuple[HeadSpec, ...] = ()
    activation: str = "gelu_tanh"
    remat: str = "none"
    # Model Garden's BertEncoderConfig / BertPretrainerConfig fields (docs/reference.md):
    # word-embedding width (0: hidden_size), pre-LN blocks, the encoder's and NSP head's init
    # stddev, and the masked-LM head's activation ('': `activation`) and init stddev.
    embedding_size: int = 0
    norm_first: bool = False
    initializer_range: float = INITIALIZER_STDDEV
    mlm_activation: str = ""
    mlm_initializer_range: float = INITIALIZER_STDDEV
    # ALBERT's cross-layer sharing: the layers share this many blocks (0: none; `Encoder`).
    num_hidden_groups: int = 0
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
            embedding_size=self.embedding_size,
            norm_first=self.norm_first,
            initializer_range=self.initializer_range,
            kernels=kernel_set,
            row_sharding=self.row_sharding,
            num_hidden_groups=self.num_hidden_groups,
        )
        self.mlm_head = MaskedLMHead(
            self.vocab_size,
            dtype=self.dtype,
            activation=self.mlm_activation or self.activation,
            initializer_range=self.mlm_initializer_range,
            kernels=kernel_set,
        )
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
