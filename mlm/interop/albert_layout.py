"""The correspondence between mlm's parameters and Hugging Face ALBERT's config and tensors.

ALBERT is mlm's post-LN encoder with factorised embeddings (`model.embedding_size` E, projected up
to the hidden size by `encoder/embedding_projection`, Hugging Face's
`albert.encoder.embedding_hidden_mapping_in`) and cross-layer sharing (`num_hidden_groups` blocks,
`encoder/layer_G`, Hugging Face's `albert_layer_groups.G.albert_layers.0`). Its sentence-order head
(`albert.pooler` and `sop_classifier.classifier`) is mlm's next-sentence head (`nsp_head`).
Conversions are `mlm.interop.layout`'s transposes and reshapes, so weights round-trip bit for bit.
Pure numpy: neither torch nor transformers is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from mlm import heads
from mlm.errors import DataError
from mlm.interop import layout
from mlm.interop.layout import COPY, HEADS_BIAS, HEADS_IN, HEADS_OUT, LINEAR

HF_WORD_EMBEDDINGS = "albert.embeddings.word_embeddings.weight"
HF_MLM_BIAS = "predictions.bias"
HF_SOP_WEIGHT = "sop_classifier.classifier.weight"
# Tensors a checkpoint may hold that carry nothing of their own: the decoder tied to the word
# embeddings and the MLM bias (save_pretrained leaves it out), and older releases' id buffers.
HF_TIED = {
    "predictions.decoder.weight": HF_WORD_EMBEDDINGS,
    "predictions.decoder.bias": HF_MLM_BIAS,
}
HF_BUFFERS = ("albert.embeddings.position_ids", "albert.embeddings.token_type_ids")

# AlbertConfig fields -> mlm model fields (num_hidden_groups goes under "albert").
_MODEL_FIELDS = {**layout._MODEL_FIELDS, "embedding_size": "embedding_size"}
_REQUIRED = (*_MODEL_FIELDS, "num_hidden_groups")
HF_DEFAULT_ACTIVATION = "gelu_new"  # AlbertConfig's hidden_act default.


def _groups(fields: Mapping[str, Any]) -> int:
    """The number of parameter blocks: `albert.num_hidden_groups`, or num_layers for 0."""
    return (fields.get("albert") or {}).get("num_hidden_groups", 0) or fields["num_layers"]


def model_fields(hf_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Reads mlm's model fields from a Hugging Face AlbertConfig dict (config.json).

    Args:
      hf_config: the parsed config.json.
      where: the file, for error messages.

    Returns:
      {model field: value}: `encoder` 'albert', the sizes, dropout rates, activations, init
      stddevs, `embedding_size` and `albert` {"num_hidden_groups"}.

    Raises:
      DataError: a field is missing or invalid, or the model is not one mlm computes (another
        model_type, inner_group_num, activation, LayerNorm epsilon or position embedding type,
        or embedding_size equal to hidden_size).
    """
    model_type = hf_config.get("model_type")
    if model_type != "albert":
        raise DataError(
            f"{where}: model_type is {model_type!r}, not 'albert'; give an ALBERT config.json"
        )
    missing = [name for name in _REQUIRED if name not in hf_config]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(missing)}; give the config the weights were saved with"
        )
    layout._check_sizes(hf_config, where)
    for name in ("embedding_size", "num_hidden_groups"):
        value = hf_config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{where}: {name} is {value!r}; it must be a whole number >= 1")
    layers, groups = hf_config["num_hidden_layers"], hf_config["num_hidden_groups"]
    if layers % groups:
        raise DataError(
            f"{where}: num_hidden_groups {groups} does not divide num_hidden_layers {layers}; "
            "mlm shares each block across num_hidden_layers / num_hidden_groups layers"
        )
    if hf_config["embedding_size"] == hf_config["hidden_size"]:
        raise DataError(
            f"{where}: embedding_size equals hidden_size ({hf_config['hidden_size']}); mlm's "
            "encoder has no embedding_hidden_mapping_in then, so this model does not convert"
        )
    inner = hf_config.get("inner_group_num", 1)
    if inner != 1:
        raise DataError(
            f"{where}: inner_group_num is {inner!r}; mlm computes ALBERT with inner_group_num 1 "
            "(one layer per group)"
        )
    act = hf_config.get("hidden_act", HF_DEFAULT_ACTIVATION)
    if not isinstance(act, str) or act not in layout.HF_ACTIVATIONS:
        raise DataError(
            f"{where}: hidden_act {act!r} is not computed by mlm; only models with hidden_act "
            f"{', '.join(sorted(layout.HF_ACTIVATIONS))} convert"
        )
    stddev = hf_config.get("initializer_range", 0.02)
    if not layout._is_number(stddev) or not stddev > 0:
        raise DataError(f"{where}: initializer_range is {stddev!r}; it must be a positive number")
    epsilon = hf_config.get("layer_norm_eps", layout.LAYER_NORM_EPSILON)
    if not layout._is_number(epsilon) or not np.isclose(
        epsilon, layout.LAYER_NORM_EPSILON, rtol=1e-6, atol=0
    ):
        raise DataError(
            f"{where}: layer_norm_eps is {epsilon!r}; mlm's LayerNorms use "
            f"{layout.LAYER_NORM_EPSILON}, so this model does not convert"
        )
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise DataError(
            f"{where}: position_embedding_type {position_type!r}; mlm has absolute position "
            "embeddings only"
        )
    return {
        "encoder": "albert",
        **{ours: hf_config[theirs] for theirs, ours in _MODEL_FIELDS.items()},
        "activation": layout.HF_ACTIVATIONS[act],
        "mlm_activation": "",  # ALBERT's head uses hidden_act too.
        "initializer_range": float(stddev),
        "mlm_initializer_range": float(stddev),
        "albert": {"num_hidden_groups": groups},
    }


def check_exportable(fields: Mapping[str, Any]) -> float:
    """Refuses a model Hugging Face's ALBERT does not compute; returns the SOP head's dropout.

    Raises:
      DataError: pre-LN blocks, no factorised embeddings, another masked-LM head activation, or
        a `model.cls_heads` head other than the standard next-sentence one.
    """
    width = fields.get("embedding_size", 0)
    if fields.get("norm_first", False) or width in (0, fields["hidden_size"]):
        raise DataError(
            f"model.norm_first={fields.get('norm_first', False)}, model.embedding_size={width}: "
            "Hugging Face's ALBERT is post-LN with embedding_size other than hidden_size"
        )
    head = fields.get("mlm_activation", "")
    if head and head != fields["activation"]:
        raise DataError(
            f"model.mlm_activation={head!r} differs from model.activation="
            f"{fields['activation']!r}; Hugging Face's ALBERT head uses hidden_act for both"
        )
    dropout = 0.0
    for entry in heads.entries(fields.get("cls_heads", [])):
        if (
            entry["name"] != heads.NEXT_SENTENCE
            or entry["num_classes"] != 2
            or entry["inner_dim"] not in (0, fields["hidden_size"])
            or entry["activation"] != "tanh"
            or entry["cls_token_idx"] != 0
        ):
            raise DataError(
                f"model.cls_heads head '{entry['name']}' has no Hugging Face ALBERT counterpart "
                "(only next_sentence with num_classes 2, inner_dim hidden_size, tanh and "
                "cls_token_idx 0 exports, as sop_classifier)"
            )
        dropout = float(entry["dropout_rate"])
    return dropout


def hf_config(fields: Mapping[str, Any], sentence_order: bool, pad_id: int) -> dict[str, Any]:
    """Writes mlm's model fields as a Hugging Face AlbertConfig dict (config.json).

    bos/eos ids are None: ALBERT's defaults (2, 3) are its SentencePiece vocab's, not mlm's.

    Args:
      fields: `config.model` as a dict (`albert.num_hidden_groups` 0 exports as num_layers).
      sentence_order: the model has the sentence-order (next-sentence) head:
        AlbertForPreTraining, else AlbertForMaskedLM.
      pad_id: the vocab's [PAD] id.

    Returns:
      The config.json content.

    Raises:
      DataError: the model is not one Hugging Face's ALBERT computes (`check_exportable`).
    """
    classifier_dropout = check_exportable(fields)
    config = {theirs: fields[ours] for theirs, ours in _MODEL_FIELDS.items()}
    config.update(
        architectures=["AlbertForPreTraining" if sentence_order else "AlbertForMaskedLM"],
        model_type="albert",
        num_hidden_groups=_groups(fields),
        inner_group_num=1,
        hidden_act=layout.TO_HF_ACTIVATION[fields["activation"]],
        layer_norm_eps=layout.LAYER_NORM_EPSILON,
        initializer_range=fields.get("initializer_range", 0.02),
        classifier_dropout_prob=classifier_dropout,
        pad_token_id=pad_id,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
        dtype="float32",
    )
    return config


@dataclasses.dataclass(frozen=True)
class AlbertTensor:
    """One parameter under its two names.

    Attributes:
      hf: the Hugging Face state-dict key.
      mlm: the path in mlm's `params` tree.
      kind: how the Hugging Face array becomes mlm's (`layout` COPY, LINEAR, HEADS_*).
      dims: the Hugging Face array's shape: mlm model field names or numbers.
    """

    hf: str
    mlm: tuple[str, ...]
    kind: str
    dims: tuple[str | int, ...]

    def hf_shape(self, fields: Mapping[str, Any]) -> tuple[int, ...]:
        """The Hugging Face array's shape for mlm model fields."""
        return tuple(fields[d] if isinstance(d, str) else d for d in self.dims)


def _dense(
    hf: str, mlm: tuple[str, ...], out: str | int, into: str, kind: str = LINEAR
) -> list[AlbertTensor]:
    bias_kind = HEADS_BIAS if kind == HEADS_IN else COPY
    return [
        AlbertTensor(f"{hf}.weight", (*mlm, "kernel"), kind, (out, into)),
        AlbertTensor(f"{hf}.bias", (*mlm, "bias"), bias_kind, (out,)),
    ]


def _layer_norm(hf: str, mlm: tuple[str, ...], width: str) -> list[AlbertTensor]:
    return [
        AlbertTensor(f"{hf}.weight", (*mlm, "scale"), COPY, (width,)),
        AlbertTensor(f"{hf}.bias", (*mlm, "bias"), COPY, (width,)),
    ]


def tensor_specs(num_groups: int, sentence_order: bool) -> list[AlbertTensor]:
    """Lists every parameter of an ALBERT pretraining model under both names.

    Args:
      num_groups: parameter blocks (num_hidden_groups).
      sentence_order: include the pooler and the sentence-order classifier.

    Returns:
      One AlbertTensor per mlm parameter, embeddings first.
    """
    h, e = "hidden_size", "embedding_size"
    specs = [
        AlbertTensor(
            f"albert.embeddings.{name}_embeddings.weight",
            ("encoder", f"{ours}_embeddings", "embedding"),
            COPY,
            (rows, e),
        )
        for name, ours, rows in (
            ("word", "word", "vocab_size"),
            ("position", "position", "max_position_embeddings"),
            ("token_type", "type", "type_vocab_size"),
        )
    ]
    specs += _layer_norm("albert.embeddings.LayerNorm", ("encoder", "embeddings_layer_norm"), e)
    specs += _dense(
        "albert.encoder.embedding_hidden_mapping_in", ("encoder", "embedding_projection"), h, e
    )
    for g in range(num_groups):
        hf, mlm = (
            f"albert.encoder.albert_layer_groups.{g}.albert_layers.0",
            ("encoder", f"layer_{g}"),
        )
        for name in ("query", "key", "value"):
            specs += _dense(f"{hf}.attention.{name}", (*mlm, "attention", name), h, h, HEADS_IN)
        specs += _dense(f"{hf}.attention.dense", (*mlm, "attention", "output"), h, h, HEADS_OUT)
        specs += _layer_norm(f"{hf}.attention.LayerNorm", (*mlm, "attention_layer_norm"), h)
        specs += _dense(f"{hf}.ffn", (*mlm, "intermediate"), "intermediate_size", h)
        specs += _dense(f"{hf}.ffn_output", (*mlm, "output"), h, "intermediate_size")
        specs += _layer_norm(f"{hf}.full_layer_layer_norm", (*mlm, "output_layer_norm"), h)
    specs += _dense("predictions.dense", ("mlm_head", "dense"), e, h)
    specs += _layer_norm("predictions.LayerNorm", ("mlm_head", "layer_norm"), e)
    specs.append(AlbertTensor(HF_MLM_BIAS, ("mlm_head", "output_bias"), COPY, ("vocab_size",)))
    if sentence_order:
        specs += _dense("albert.pooler", ("nsp_head", "pooler"), h, h)
        specs += _dense("sop_classifier.classifier", ("nsp_head", "classifier"), 2, h)
    return specs


def params_from_hf(
    tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], list[str]]:
    """Builds mlm's params tree from AlbertForMaskedLM or AlbertForPreTraining tensors.

    The sentence-order head, if `sop_classifier.classifier.weight` is present, becomes the
    next-sentence head `nsp_head` (pooler and classifier).

    Args:
      tensors: state-dict key -> array (any float dtype; converted to float32).
      fields: the model fields (`model_fields`).
      where: the source, for error messages.

    Returns:
      (params tree of float32 numpy arrays, names of tensors left out: heads of other tasks and
      the like; the tied decoder and the id buffers are checked or skipped and not listed).

    Raises:
      DataError: a tensor is missing or has another shape than the config gives, or the MLM
        decoder is not tied to the word embeddings and the MLM bias.
    """
    tensors = {layout._normalized(name): array for name, array in tensors.items()}
    specs = tensor_specs(_groups(fields), HF_SOP_WEIGHT in tensors)
    layout._require_all(
        [spec.hf for spec in specs],
        tensors,
        f"{where}: tensor",
        "convert an AlbertForMaskedLM or AlbertForPreTraining checkpoint (with its MLM head)",
    )
    for spec in specs:
        shape, expected = tuple(np.shape(tensors[spec.hf])), spec.hf_shape(fields)
        if shape != expected:
            raise DataError(
                f"{where}: tensor '{spec.hf}' has shape {shape} but the config gives {expected}; "
                "give the config the weights were saved with"
            )
    for tied, to in HF_TIED.items():
        if tied in tensors and not np.array_equal(tensors[tied], tensors[to]):
            raise DataError(
                f"{where}: '{tied}' differs from '{to}'; mlm's MLM head is tied to them, so "
                "this (untied) model cannot be converted"
            )
    params = {
        spec.mlm: layout.to_mlm(
            spec.kind, np.asarray(tensors[spec.hf], np.float32), fields["num_heads"]
        )
        for spec in specs
    }
    known = {spec.hf for spec in specs} | set(HF_TIED) | set(HF_BUFFERS)
    left_out = sorted(name for name in tensors if name not in known)
    return traverse_util.unflatten_dict(params), left_out


def hf_from_params(params: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Names mlm's params as a Hugging Face ALBERT state dict.

    AlbertForPreTraining's keys when the params have `nsp_head` (as the sentence-order head),
    else AlbertForMaskedLM's. The tied decoder is left out, as `save_pretrained` leaves it out.

    Args:
      params: mlm's params tree (numpy or jax arrays).
      fields: the model fields (`albert.num_hidden_groups` is read).

    Returns:
      state-dict key -> C-contiguous float32 array.
    """
    flat = traverse_util.flatten_dict(params)
    sentence_order = ("nsp_head",) in {path[:1] for path in flat}
    return {
        spec.hf: layout.from_mlm(spec.kind, np.asarray(flat[spec.mlm]))
        for spec in tensor_specs(_groups(fields), sentence_order)
    }
