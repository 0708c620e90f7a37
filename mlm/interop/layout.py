"""The correspondence between mlm's parameters and BERT's published tensor names and layouts.

Tensors are exchanged in Hugging Face's names and layouts (PyTorch `nn.Linear.weight` is
[out, in]); the original TF1 release names the same tensors differently and stores dense kernels
as [in, out]. mlm keeps attention projections as [H, heads, head_dim] (query/key/value) and
[heads, head_dim, H] (output), as `flax.linen.DenseGeneral` does. Every conversion is a transpose
and a reshape, so weights round-trip bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from mlm import heads
from mlm.errors import DataError

# How a tensor's Hugging Face layout becomes mlm's.
COPY = "copy"  # Embeddings, biases, LayerNorm parameters: the same array.
LINEAR = "linear"  # [out, in] -> [in, out].
HEADS_IN = "heads_in"  # query/key/value weight [H, H] -> [H, heads, head_dim].
HEADS_BIAS = "heads_bias"  # query/key/value bias [H] -> [heads, head_dim].
HEADS_OUT = "heads_out"  # attention output weight [H, H] -> [heads, head_dim, H].

# Tensors a Hugging Face checkpoint may hold that carry nothing of their own: a buffer of
# position ids, and the decoder of the MLM head, tied to the word embeddings and the MLM bias.
HF_POSITION_IDS = "bert.embeddings.position_ids"
HF_DECODER_WEIGHT = "cls.predictions.decoder.weight"
HF_DECODER_BIAS = "cls.predictions.decoder.bias"
HF_WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
HF_MLM_BIAS = "cls.predictions.bias"
HF_NSP_WEIGHT = "cls.seq_relationship.weight"


# BERT config fields (Hugging Face's BertConfig and the original bert_config.json share them) ->
# mlm's model fields.
_MODEL_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "hidden_dropout_prob": "dropout_rate",
    "attention_probs_dropout_prob": "attention_dropout_rate",
}
# Of those, the sizes (whole numbers >= 1) and the dropout rates (in [0, 1)).
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)
_RATE_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
LAYER_NORM_EPSILON = 1e-12
# hidden_act -> model.activation. Hugging Face's "gelu" is the exact erf form; its tanh forms
# share one formula. The original release's "gelu" is the tanh approximation (modeling.py).
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
TF_BERT_ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu"}
# model.activation -> the hidden_act Hugging Face computes the same function with.
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
# Model fields Hugging Face's BertModel has no counterpart for, with the value it computes;
# a model with another value does not export.
_NOT_IN_HF_BERT = {"norm_first": False, "embedding_size": 0}


def model_fields(
    bert_config: Mapping[str, Any], activations: Mapping[str, str], where: str
) -> dict[str, Any]:
    """Reads mlm's model fields from a BERT config (Hugging Face or original release).

    Args:
      bert_config: the parsed config.json / bert_config.json.
      activations: hidden_act -> model.activation for this source.
      where: the file, for error messages.

    Returns:
      {model field: value} for every field of `config.model` a checkpoint determines.

    Raises:
      DataError: a field is missing, or the model is not one mlm computes (another activation,
        LayerNorm epsilon, position embedding type or model type).
    """
    model_type = bert_config.get("model_type", "bert")
    if model_type != "bert":
        raise DataError(
            f"{where}: model_type is '{model_type}'; only BERT, ALBERT and ModernBERT "
            "checkpoints convert"
        )
    missing = [name for name in _MODEL_FIELDS if name not in bert_config]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(missing)}; is it a BERT config? Give the config the "
            "weights were saved with"
        )
    _check_sizes(bert_config, where)
    fields = {ours: bert_config[theirs] for theirs, ours in _MODEL_FIELDS.items()}
    act = bert_config.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in activations:
        raise DataError(
            f"{where}: hidden_act {act!r} is not computed by mlm; only models with hidden_act "
            f"{', '.join(sorted(activations))} convert"
        )
    fields["activation"] = activations[act]
    fields["mlm_activation"] = ""  # BERT's head uses hidden_act too.
    stddev = bert_config.get("initializer_range", 0.02)
    if not _is_number(stddev) or not stddev > 0:
        raise DataError(f"{where}: initializer_range is {stddev!r}; it must be a positive number")
    # Both heads and the encoder are initialised with it (fine-tuning new weights).
    fields["initializer_range"] = fields["mlm_initializer_range"] = float(stddev)
    epsilon = bert_config.get("layer_norm_eps", LAYER_NORM_EPSILON)
    if not _is_number(epsilon):
        raise DataError(
            f"{where}: layer_norm_eps is {epsilon!r}, not a number; BERT's is {LAYER_NORM_EPSILON}"
        )
    if not np.isclose(epsilon, LAYER_NORM_EPSILON, rtol=1e-6, atol=0):
        raise DataError(
            f"{where}: layer_norm_eps is {epsilon}; mlm's BERT uses {LAYER_NORM_EPSILON}"
        )
    position_type = bert_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise DataError(
            f"{where}: position_embedding_type '{position_type}'; mlm's BERT has absolute "
            "position embeddings"
        )
    return fields


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sizes(bert_config: Mapping[str, Any], where: str) -> None:
    """Raises DataError naming the first size or rate of a BERT config that cannot be a model's."""
    for name in _SIZE_FIELDS:
        value = bert_config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(
                f"{where}: {name} is {value!r}; it must be a whole number of at least 1: set "
                "the value the weights were saved with"
            )
    for name in _RATE_FIELDS:
        value = bert_config[name]
        if not _is_number(value) or not 0 <= value < 1:
            raise DataError(
                f"{where}: {name} is {value!r}; it must be a number in [0, 1) (BERT's is 0.1)"
            )
    hidden, heads = bert_config["hidden_size"], bert_config["num_attention_heads"]
    if hidden % heads:
        raise DataError(
            f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; set "
            "the values the weights were saved with (each head has hidden_size / "
            "num_attention_heads dimensions)"
        )


def check_exportable(fields: Mapping[str, Any]) -> None:
    """Refuses a model Hugging Face's BERT does not compute, naming the field.

    Args:
      fields: `config.model` as a dict (a field it lacks has its default).

    Raises:
      DataError: pre-LN blocks, factorised embeddings, a masked-LM head activation other than
        the feed-forward one (Hugging Face's head uses hidden_act), or a `model.cls_heads` head
        other than BERT's next-sentence one (Hugging Face's pooler and `cls.seq_relationship`).
    """
    for name, value in _NOT_IN_HF_BERT.items():
        if fields.get(name, value) != value:
            raise DataError(
                f"model.{name}={fields[name]!r} has no Hugging Face BERT counterpart (its "
                f"BertModel computes {name}={value!r}); only standard BERT models export"
            )
    head = fields.get("mlm_activation", "")
    if head and head != fields["activation"]:
        raise DataError(
            f"model.mlm_activation={head!r} differs from model.activation="
            f"{fields['activation']!r}; Hugging Face's BERT head uses hidden_act for both"
        )
    for head in heads.entries(fields.get("cls_heads", [])):
        if (
            head["name"] != heads.NEXT_SENTENCE
            or head["num_classes"] != 2
            or head["inner_dim"] not in (0, fields["hidden_size"])
            or head["activation"] != "tanh"
            or head["cls_token_idx"] != 0
        ):
            raise DataError(
                f"model.cls_heads head '{head['name']}' has no Hugging Face BERT counterpart "
                "(only next_sentence with num_classes 2, inner_dim hidden_size, tanh and "
                "cls_token_idx 0 exports, as cls.seq_relationship); only standard BERT models "
                "export"
            )


def hf_bert_config(
    fields: Mapping[str, Any], next_sentence: bool, pad_token_id: int
) -> dict[str, Any]:
    """Writes mlm's model fields as a Hugging Face BertConfig dict (config.json).

    Args:
      fields: `config.model` as a dict (`check_exportable`).
      next_sentence: the model has the next-sentence head (architecture BertForPreTraining).
      pad_token_id: the vocab's [PAD] id.

    Returns:
      The config.json content.
    """
    check_exportable(fields)
    config = {theirs: fields[ours] for theirs, ours in _MODEL_FIELDS.items()}
    config.update(
        architectures=["BertForPreTraining" if next_sentence else "BertForMaskedLM"],
        model_type="bert",
        hidden_act=TO_HF_ACTIVATION[fields["activation"]],
        layer_norm_eps=LAYER_NORM_EPSILON,
        initializer_range=fields.get("initializer_range", 0.02),
        position_embedding_type="absolute",
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    return config


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter under its three names.

    Attributes:
      hf: the Hugging Face state-dict key.
      tf: the variable name in an original google-research/bert checkpoint.
      mlm: the path in mlm's `params` tree.
      kind: how the Hugging Face array becomes mlm's (COPY, LINEAR, HEADS_*).
      dims: the Hugging Face array's shape: BERT config sizes by name (e.g. "hidden_size"),
        or numbers.
      tf_transposed: the TF1 array is the transpose of the Hugging Face one (dense kernels).
    """

    hf: str
    tf: str
    mlm: tuple[str, ...]
    kind: str
    dims: tuple[str | int, ...]
    tf_transposed: bool = False

    def hf_shape(self, fields: Mapping[str, Any]) -> tuple[int, ...]:
        """The Hugging Face array's shape for mlm model fields (`model_fields`)."""
        return tuple(fields[_MODEL_FIELDS[d]] if isinstance(d, str) else d for d in self.dims)


def _dense(
    hf: str,
    tf: str,
    mlm: tuple[str, ...],
    kind: str = LINEAR,
    out: str = "hidden_size",
    into: str = "hidden_size",
) -> list[TensorSpec]:
    bias_kind = HEADS_BIAS if kind == HEADS_IN else COPY
    return [
        TensorSpec(
            f"{hf}.weight", f"{tf}/kernel", (*mlm, "kernel"), kind, (out, into), tf_transposed=True
        ),
        TensorSpec(f"{hf}.bias", f"{tf}/bias", (*mlm, "bias"), bias_kind, (out,)),
    ]


def _layer_norm(hf: str, tf: str, mlm: tuple[str, ...]) -> list[TensorSpec]:
    return [
        TensorSpec(f"{hf}.weight", f"{tf}/gamma", (*mlm, "scale"), COPY, ("hidden_size",)),
        TensorSpec(f"{hf}.bias", f"{tf}/beta", (*mlm, "bias"), COPY, ("hidden_size",)),
    ]


def tensor_specs(num_layers: int, next_sentence: bool) -> list[TensorSpec]:
    """Lists every parameter of a BERT pretraining model under its three names.

    Args:
      num_layers: transformer layers.
      next_sentence: include the pooler and the next-sentence classifier.

    Returns:
      One TensorSpec per mlm parameter, embeddings first.
    """
    embeddings = [
        TensorSpec(
            f"bert.embeddings.{name}_embeddings.weight",
            f"bert/embeddings/{name}_embeddings",
            ("encoder", f"{ours}_embeddings", "embedding"),
            COPY,
            (rows, "hidden_size"),
        )
        for name, ours, rows in (
            ("word", "word", "vocab_size"),
            ("position", "position", "max_position_embeddings"),
            ("token_type", "type", "type_vocab_size"),
        )
    ]
    specs = embeddings + _layer_norm(
        "bert.embeddings.LayerNorm",
        "bert/embeddings/LayerNorm",
        ("encoder", "embeddings_layer_norm"),
    )
    for i in range(num_layers):
        hf, tf, mlm = (
            f"bert.encoder.layer.{i}",
            f"bert/encoder/layer_{i}",
            ("encoder", f"layer_{i}"),
        )
        for name in ("query", "key", "value"):
            specs += _dense(
                f"{hf}.attention.self.{name}",
                f"{tf}/attention/self/{name}",
                (*mlm, "attention", name),
                HEADS_IN,
            )
        specs += _dense(
            f"{hf}.attention.output.dense",
            f"{tf}/attention/output/dense",
            (*mlm, "attention", "output"),
            HEADS_OUT,
        )
        specs += _layer_norm(
            f"{hf}.attention.output.LayerNorm",
            f"{tf}/attention/output/LayerNorm",
            (*mlm, "attention_layer_norm"),
        )
        specs += _dense(
            f"{hf}.intermediate.dense",
            f"{tf}/intermediate/dense",
            (*mlm, "intermediate"),
            out="intermediate_size",
        )
        specs += _dense(
            f"{hf}.output.dense", f"{tf}/output/dense", (*mlm, "output"), into="intermediate_size"
        )
        specs += _layer_norm(
            f"{hf}.output.LayerNorm", f"{tf}/output/LayerNorm", (*mlm, "output_layer_norm")
        )
    specs += _dense(
        "cls.predictions.transform.dense", "cls/predictions/transform/dense", ("mlm_head", "dense")
    )
    specs += _layer_norm(
        "cls.predictions.transform.LayerNorm",
        "cls/predictions/transform/LayerNorm",
        ("mlm_head", "layer_norm"),
    )
    specs.append(
        TensorSpec(
            HF_MLM_BIAS,
            "cls/predictions/output_bias",
            ("mlm_head", "output_bias"),
            COPY,
            ("vocab_size",),
        )
    )
    if next_sentence:
        specs += _dense("bert.pooler.dense", "bert/pooler/dense", ("nsp_head", "pooler"))
        # The original release keeps this one as [2, H], like PyTorch.
        specs += [
            TensorSpec(
                HF_NSP_WEIGHT,
                "cls/seq_relationship/output_weights",
                ("nsp_head", "classifier", "kernel"),
                LINEAR,
                (2, "hidden_size"),
            ),
            TensorSpec(
                "cls.seq_relationship.bias",
                "cls/seq_relationship/output_bias",
                ("nsp_head", "classifier", "bias"),
                COPY,
                (2,),
            ),
        ]
    return specs


def to_mlm(kind: str, array: np.ndarray, num_heads: int) -> np.ndarray:
    """Turns a Hugging Face-layout array into mlm's layout.

    Args:
      kind: the TensorSpec kind.
      array: the Hugging Face array.
      num_heads: attention heads (for the HEADS_* kinds).

    Returns:
      The array in mlm's layout (a view where possible).
    """
    if kind == COPY:
        return array
    if kind == LINEAR:
        return array.T
    hidden = array.shape[0]
    if kind == HEADS_BIAS:
        return array.reshape(num_heads, hidden // num_heads)
    if kind == HEADS_IN:
        return array.T.reshape(array.shape[1], num_heads, hidden // num_heads)
    if kind == HEADS_OUT:
        return array.T.reshape(num_heads, hidden // num_heads, array.shape[0])
    raise ValueError(f"unknown tensor kind {kind!r}")


def from_mlm(kind: str, array: np.ndarray) -> np.ndarray:
    """Turns an mlm-layout array into Hugging Face's layout (the inverse of `to_mlm`).

    Args:
      kind: the TensorSpec kind.
      array: the mlm array.

    Returns:
      The array in Hugging Face's layout, C-contiguous.
    """
    if kind == COPY:
        out = array
    elif kind == LINEAR:
        out = array.T
    elif kind == HEADS_BIAS:
        out = array.reshape(-1)
    elif kind == HEADS_IN:
        out = array.reshape(array.shape[0], -1).T
    elif kind == HEADS_OUT:
        out = array.reshape(-1, array.shape[-1]).T
    else:
        raise ValueError(f"unknown tensor kind {kind!r}")
    return np.ascontiguousarray(out)


def _normalized(name: str) -> str:
    """Old checkpoints (e.g. bert-base-uncased's pytorch_model.bin) name LayerNorm weight/bias
    gamma/beta, as TF did."""
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def _require_all(names: Sequence[str], present: Mapping[str, Any], what: str, fix: str) -> None:
    """Raises a DataError naming the first of `names` not in `present` (and how many more)."""
    missing = [name for name in names if name not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{what} '{missing[0]}'{more} missing; {fix}")


def has_next_sentence(tensors: Mapping[str, Any]) -> bool:
    """Whether Hugging Face-named tensors include the next-sentence classifier."""
    return HF_NSP_WEIGHT in tensors


def params_from_hf(
    tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], list[str]]:
    """Builds mlm's params tree from Hugging Face-named tensors.

    Args:
      tensors: state-dict key -> array (any float dtype; converted to float32).
      fields: the model fields (`model_fields`): num_layers and num_heads are read.
      where: the source, for error messages.

    Returns:
      (params tree of float32 numpy arrays, names of tensors left out: heads of other tasks and
      the like; the tied decoder and the position-id buffer are checked and not listed).

    Raises:
      DataError: a tensor is missing or has another shape than the config gives, or the MLM
        decoder is not tied to the word embeddings.
    """
    tensors = {_normalized(name): array for name, array in tensors.items()}
    next_sentence = has_next_sentence(tensors)
    specs = tensor_specs(fields["num_layers"], next_sentence)
    _require_all(
        [spec.hf for spec in specs],
        tensors,
        f"{where}: tensor",
        "convert a BertForMaskedLM or BertForPreTraining checkpoint (with its MLM head)",
    )
    for spec in specs:
        shape, expected = tuple(np.shape(tensors[spec.hf])), spec.hf_shape(fields)
        if shape != expected:
            names = ", ".join(str(d) for d in spec.dims)
            raise DataError(
                f"{where}: tensor '{spec.hf}' has shape {shape} but the config gives {expected} "
                f"({names}); the weights and the config belong to different models: give the "
                "config the weights were saved with"
            )
    for tied, to in ((HF_DECODER_WEIGHT, HF_WORD_EMBEDDINGS), (HF_DECODER_BIAS, HF_MLM_BIAS)):
        if tied in tensors and not np.array_equal(tensors[tied], tensors[to]):
            raise DataError(
                f"{where}: '{tied}' differs from '{to}'; mlm's MLM head is tied to them, so "
                "this (untied) model cannot be converted"
            )
    params = {
        spec.mlm: to_mlm(spec.kind, np.asarray(tensors[spec.hf], np.float32), fields["num_heads"])
        for spec in specs
    }
    known = {spec.hf for spec in specs} | {HF_POSITION_IDS, HF_DECODER_WEIGHT, HF_DECODER_BIAS}
    left_out = sorted(name for name in tensors if name not in known)
    return traverse_util.unflatten_dict(params), left_out


def hf_from_params(params: Mapping[str, Any], num_layers: int) -> dict[str, np.ndarray]:
    """Names mlm's params as a Hugging Face BertForMaskedLM / BertForPreTraining state dict.

    The tied decoder is left out, as `save_pretrained` leaves it out.

    Args:
      params: mlm's params tree (numpy or jax arrays).
      num_layers: transformer layers.

    Returns:
      state-dict key -> C-contiguous float32 array.
    """
    flat = traverse_util.flatten_dict(params)
    specs = tensor_specs(num_layers, next_sentence=("nsp_head",) in {p[:1] for p in flat})
    return {spec.hf: from_mlm(spec.kind, np.asarray(flat[spec.mlm])) for spec in specs}


def hf_from_tf_bert(
    variables: Mapping[str, np.ndarray], num_layers: int, where: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Renames an original google-research/bert checkpoint's variables to Hugging Face's keys.

    Args:
      variables: TF1 variable name -> array (optimizer slots and counters may be present).
      num_layers: transformer layers.
      where: the checkpoint, for error messages.

    Returns:
      (Hugging Face state-dict key -> array; names of model variables left out, not counting
      Adam slots and global_step).

    Raises:
      DataError: a variable of the model is missing.
    """
    next_sentence = "cls/seq_relationship/output_weights" in variables
    specs = tensor_specs(num_layers, next_sentence)
    _require_all(
        [spec.tf for spec in specs],
        variables,
        f"{where}: variable",
        "is it a BERT pretraining checkpoint with num_hidden_layers as in its bert_config.json?",
    )
    known = {spec.tf for spec in specs}
    left_out = sorted(
        name
        for name in variables
        if name not in known and name != "global_step" and not name.endswith(("/adam_m", "/adam_v"))
    )
    tensors = {
        spec.hf: variables[spec.tf].T if spec.tf_transposed else variables[spec.tf]
        for spec in specs
    }
    return tensors, left_out
