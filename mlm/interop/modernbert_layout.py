"""The correspondence between mlm's ModernBERT parameters and Hugging Face's ModernBERT.

Hugging Face's `ModernBertForMaskedLM` keeps PyTorch `nn.Linear` weights as [out, in], the
attention projections fused as Wqkv [3H, H] (rows: q, k, v, each heads x head_dim) and the GeGLU
input as Wi [2I, H] (rows: the activated half, then the gate). mlm keeps them as [H, 3, N, D]
and [H, 2, I] kernels (`mlm.modernbert`), the attention output as [N, D, H]. Every conversion
is a transpose and a reshape, so weights round-trip bit for bit. The decoder weight is tied to
the word embeddings and left out on export, as `save_pretrained` leaves it out.

Config fields: Hugging Face >= 5 writes the layer pattern as `layer_types` and the rotary bases
under `rope_parameters`; earlier versions wrote `global_attn_every_n_layers`,
`global_rope_theta` and `local_rope_theta`. Both are read, and `hf_config` writes both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from mlm.errors import DataError
from mlm.interop.layout import HF_ACTIVATIONS, TO_HF_ACTIVATION

# How a tensor's Hugging Face layout becomes mlm's.
COPY = "copy"  # Embeddings, LayerNorm weights, the decoder bias: the same array.
LINEAR = "linear"  # [out, in] -> [in, out].
QKV = "qkv"  # Wqkv [3H, H] -> [H, 3, N, D].
HEADS_OUT = "heads_out"  # attention Wo [H, H] -> [N, D, H].
GATED = "gated"  # Wi [2I, H] -> [H, 2, I].

HF_WORD_EMBEDDINGS = "model.embeddings.tok_embeddings.weight"
HF_DECODER_WEIGHT = "decoder.weight"
HF_DECODER_BIAS = "decoder.bias"
FULL, SLIDING = "full_attention", "sliding_attention"
# ModernBertConfig's defaults, which apply to a field config.json leaves out.
DEFAULT_THETAS = {FULL: 160000.0, SLIDING: 10000.0}
_DEFAULTS = {
    "hidden_activation": "gelu",
    "classifier_activation": "gelu",
    "initializer_range": 0.02,
    "norm_eps": 1e-5,
    "local_attention": 128,
    "embedding_dropout": 0.0,
    "mlp_dropout": 0.0,
    "attention_dropout": 0.0,
}
# Sizes (whole numbers >= 1) config.json must give: Hugging Face's name -> mlm's.
_SIZES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}
# Flags of models mlm does not compute: name -> the value mlm's ModernBERT computes.
_FLAGS = {
    "attention_bias": False,
    "mlp_bias": False,
    "norm_bias": False,
    "classifier_bias": False,
    "decoder_bias": True,
    "tie_word_embeddings": True,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str, value: Any, where: str) -> float:
    if not _is_number(value) or not value > 0:
        raise DataError(f"{where}: {name} is {value!r}; it must be a positive number")
    return float(value)


def _activation(config: Mapping[str, Any], name: str, where: str) -> str:
    act = config.get(name, _DEFAULTS[name])
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise DataError(
            f"{where}: {name} {act!r} is not computed by mlm; only models with {name} "
            f"{', '.join(sorted(HF_ACTIVATIONS))} convert"
        )
    return HF_ACTIVATIONS[act]


def _check_flags_and_sizes(config: Mapping[str, Any], where: str) -> None:
    """Raises DataError naming the first field that is missing, ill-sized or not computed."""
    model_type = config.get("model_type", "modernbert")
    if model_type != "modernbert":
        raise DataError(
            f"{where}: model_type is '{model_type}'; this converts ModernBERT checkpoints only"
        )
    missing = [name for name in _SIZES if name not in config]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(missing)}; give the config.json the weights were "
            "saved with"
        )
    for name in _SIZES:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{where}: {name} is {value!r}; it must be a whole number >= 1")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads or (hidden // heads) % 2:
        raise DataError(
            f"{where}: hidden_size {hidden} / num_attention_heads {heads} is not an even "
            "whole head width; set the values the weights were saved with"
        )
    if config.get("head_dim") not in (None, hidden // heads):
        raise DataError(
            f"{where}: head_dim {config['head_dim']} differs from hidden_size / "
            f"num_attention_heads ({hidden // heads}); mlm computes that head width only"
        )
    for name, value in _FLAGS.items():
        if config.get(name, value) != value:
            raise DataError(
                f"{where}: {name} is {config[name]!r}; mlm's ModernBERT computes {name}="
                f"{value}, so this model does not convert"
            )


def _layer_pattern(config: Mapping[str, Any], where: str) -> int:
    """global_attn_every_n_layers from `layer_types` (Hugging Face >= 5) or the field itself."""
    num_layers = config["num_hidden_layers"]
    every = config.get("global_attn_every_n_layers", 3)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise DataError(f"{where}: global_attn_every_n_layers is {every!r}; it must be >= 1")
    types = config.get("layer_types")
    if types is None:
        return every
    globals_ = [i for i, kind in enumerate(types) if kind == FULL]
    if len(globals_) > 1:
        every = globals_[1]
    elif every < num_layers:
        every = num_layers
    if list(types) != [SLIDING if i % every else FULL for i in range(num_layers)]:
        raise DataError(
            f"{where}: layer_types {list(types)} is not every n-th layer global from layer 0; "
            "mlm computes layer i global iff i % global_attn_every_n_layers == 0"
        )
    return every


def _rope_theta(config: Mapping[str, Any], kind: str, legacy: str, where: str) -> float:
    """A layer kind's rotary base: rope_parameters[kind] (>= 5), else the legacy field."""
    if config.get("rope_scaling"):
        raise DataError(f"{where}: rope_scaling is set; mlm computes the default rotary only")
    params = (config.get("rope_parameters") or {}).get(kind) or {}
    if params.get("rope_type", "default") != "default":
        raise DataError(
            f"{where}: rope_parameters.{kind}.rope_type is '{params['rope_type']}'; mlm "
            "computes the 'default' rotary embedding only"
        )
    theta = params.get("rope_theta", config.get(legacy, DEFAULT_THETAS[kind]))
    return _positive(f"the {kind} rope_theta", theta, where)


def _rate(config: Mapping[str, Any], name: str, where: str) -> float:
    value = config.get(name, _DEFAULTS[name])
    if not _is_number(value) or not 0 <= value < 1:
        raise DataError(f"{where}: {name} is {value!r}; it must be a number in [0, 1)")
    return float(value)


def model_fields(hf_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Reads mlm's model fields from a Hugging Face ModernBertConfig (config.json).

    Args:
      hf_config: the parsed config.json.
      where: the file, for error messages.

    Returns:
      {model field: value} for every field of `config.model` a checkpoint determines, the
      ModernBERT ones under "modernbert". An odd local_attention becomes the even width with
      the same window (Hugging Face attends local_attention // 2 tokens each side).

    Raises:
      DataError: a size is missing or invalid, or the model is not one mlm computes (biases,
        an untied or bias-free decoder, another activation, rotary type, layer pattern, or
        embedding and MLP dropout rates that differ).
    """
    _check_flags_and_sizes(hf_config, where)
    fields: dict[str, Any] = {"encoder": "modernbert"}
    fields.update({ours: hf_config[theirs] for theirs, ours in _SIZES.items()})
    dropout = _rate(hf_config, "mlp_dropout", where)
    if _rate(hf_config, "embedding_dropout", where) != dropout:
        raise DataError(
            f"{where}: embedding_dropout {hf_config['embedding_dropout']} differs from "
            f"mlp_dropout {dropout}; mlm has one model.dropout_rate: set both to one value"
        )
    fields["dropout_rate"] = dropout
    fields["attention_dropout_rate"] = _rate(hf_config, "attention_dropout", where)
    fields["activation"] = _activation(hf_config, "hidden_activation", where)
    head = _activation(hf_config, "classifier_activation", where)
    fields["mlm_activation"] = "" if head == fields["activation"] else head
    stddev = hf_config.get("initializer_range", _DEFAULTS["initializer_range"])
    stddev = _positive("initializer_range", stddev, where)
    fields["initializer_range"] = fields["mlm_initializer_range"] = stddev
    local = hf_config.get("local_attention", _DEFAULTS["local_attention"])
    if isinstance(local, bool) or not isinstance(local, int) or local < 2:
        raise DataError(f"{where}: local_attention is {local!r}; it must be a whole number >= 2")
    fields["modernbert"] = {
        "global_attn_every_n_layers": _layer_pattern(hf_config, where),
        "local_attention": local - local % 2,
        "global_rope_theta": _rope_theta(hf_config, FULL, "global_rope_theta", where),
        "local_rope_theta": _rope_theta(hf_config, SLIDING, "local_rope_theta", where),
        "norm_eps": _positive("norm_eps", hf_config.get("norm_eps", _DEFAULTS["norm_eps"]), where),
    }
    return fields


def check_exportable(fields: Mapping[str, Any], next_sentence: bool) -> None:
    """Refuses a model Hugging Face's ModernBertForMaskedLM has no place for.

    Args:
      fields: `config.model` as a dict.
      next_sentence: the run trains the next-sentence head (data.use_next_sentence_label).

    Raises:
      DataError: the model has a next-sentence or `model.cls_heads` head.
    """
    if next_sentence or fields.get("cls_heads"):
        raise DataError(
            "the model has classification heads (model.cls_heads or "
            "data.use_next_sentence_label), which Hugging Face's ModernBertForMaskedLM has no "
            "place for; only masked-LM ModernBERT models export"
        )


def hf_config(fields: Mapping[str, Any], pad_id: int, cls_id: int, sep_id: int) -> dict[str, Any]:
    """Writes mlm's ModernBERT model fields as a Hugging Face ModernBertConfig dict.

    Args:
      fields: `config.model` as a dict, the ModernBERT fields under "modernbert".
      pad_id, cls_id, sep_id: the vocab's [PAD], [CLS] (also bos) and [SEP] (also eos) ids.

    Returns:
      The config.json content for `ModernBertForMaskedLM`.
    """
    modern = fields["modernbert"]
    every, num_layers = modern["global_attn_every_n_layers"], fields["num_layers"]
    activation = fields["activation"]
    config = {theirs: fields[ours] for theirs, ours in _SIZES.items()}
    config.update(
        architectures=["ModernBertForMaskedLM"],
        model_type="modernbert",
        hidden_activation=TO_HF_ACTIVATION[activation],
        classifier_activation=TO_HF_ACTIVATION[fields.get("mlm_activation") or activation],
        initializer_range=fields.get("initializer_range", 0.02),
        initializer_cutoff_factor=2.0,
        norm_eps=modern["norm_eps"],
        embedding_dropout=fields.get("dropout_rate", 0.0),
        mlp_dropout=fields.get("dropout_rate", 0.0),
        attention_dropout=fields.get("attention_dropout_rate", 0.0),
        local_attention=modern["local_attention"],
        layer_types=[SLIDING if i % every else FULL for i in range(num_layers)],
        rope_parameters={
            FULL: {"rope_theta": modern["global_rope_theta"], "rope_type": "default"},
            SLIDING: {"rope_theta": modern["local_rope_theta"], "rope_type": "default"},
        },
        # The same, as transformers < 5 reads them.
        global_attn_every_n_layers=every,
        global_rope_theta=modern["global_rope_theta"],
        local_rope_theta=modern["local_rope_theta"],
        pad_token_id=pad_id,
        cls_token_id=cls_id,
        bos_token_id=cls_id,
        sep_token_id=sep_id,
        eos_token_id=sep_id,
        dtype="float32",
        **_FLAGS,
    )
    return config


def tensor_specs(fields: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...], str, tuple]]:
    """Lists every parameter as (Hugging Face key, mlm path, kind, Hugging Face shape).

    Args:
      fields: the model fields (sizes as `model_fields` gives them).

    Returns:
      One entry per mlm parameter, embeddings first.
    """
    hidden, inner = fields["hidden_size"], fields["intermediate_size"]
    vocab = fields["vocab_size"]

    def norm(hf: str, *mlm: str) -> tuple[str, tuple[str, ...], str, tuple]:
        return f"{hf}.weight", (*mlm, "scale"), COPY, (hidden,)

    specs = [
        (HF_WORD_EMBEDDINGS, ("encoder", "word_embeddings", "embedding"), COPY, (vocab, hidden)),
        norm("model.embeddings.norm", "encoder", "embeddings_layer_norm"),
    ]
    for i in range(fields["num_layers"]):
        hf, mlm = f"model.layers.{i}", ("encoder", f"layer_{i}")
        if i:  # The first layer's attn_norm is the identity.
            specs.append(norm(f"{hf}.attn_norm", *mlm, "attention_layer_norm"))
        attention, mlp = (*mlm, "attention"), (*mlm, "mlp")
        specs += [
            (f"{hf}.attn.Wqkv.weight", (*attention, "qkv", "kernel"), QKV, (3 * hidden, hidden)),
            (f"{hf}.attn.Wo.weight", (*attention, "output", "kernel"), HEADS_OUT, (hidden, hidden)),
            norm(f"{hf}.mlp_norm", *mlm, "mlp_layer_norm"),
            (f"{hf}.mlp.Wi.weight", (*mlp, "intermediate", "kernel"), GATED, (2 * inner, hidden)),
            (f"{hf}.mlp.Wo.weight", (*mlp, "output", "kernel"), LINEAR, (hidden, inner)),
        ]
    return specs + [
        norm("model.final_norm", "encoder", "final_layer_norm"),
        ("head.dense.weight", ("mlm_head", "dense", "kernel"), LINEAR, (hidden, hidden)),
        norm("head.norm", "mlm_head", "layer_norm"),
        (HF_DECODER_BIAS, ("mlm_head", "output_bias"), COPY, (vocab,)),
    ]


def to_mlm(kind: str, array: np.ndarray, num_heads: int) -> np.ndarray:
    """Turns a Hugging Face-layout array into mlm's layout (a transpose and a reshape).

    Args:
      kind: COPY, LINEAR, QKV, HEADS_OUT or GATED.
      array: the Hugging Face array.
      num_heads: attention heads.

    Returns:
      The array in mlm's layout.
    """
    if kind == COPY:
        return array
    if kind == LINEAR:
        return array.T
    if kind == QKV:
        hidden = array.shape[1]
        return array.T.reshape(hidden, 3, num_heads, hidden // num_heads)
    if kind == HEADS_OUT:
        hidden = array.shape[0]
        return array.T.reshape(num_heads, hidden // num_heads, hidden)
    if kind == GATED:
        return array.T.reshape(array.shape[1], 2, array.shape[0] // 2)
    raise ValueError(f"unknown tensor kind {kind!r}")


def from_mlm(kind: str, array: np.ndarray) -> np.ndarray:
    """Turns an mlm-layout array into Hugging Face's layout (the inverse of `to_mlm`).

    Args:
      kind: COPY, LINEAR, QKV, HEADS_OUT or GATED.
      array: the mlm array.

    Returns:
      The array in Hugging Face's layout, C-contiguous.
    """
    if kind == COPY:
        out = array
    elif kind == LINEAR:
        out = array.T
    elif kind in (QKV, GATED):
        out = array.reshape(array.shape[0], -1).T
    elif kind == HEADS_OUT:
        out = array.reshape(-1, array.shape[-1]).T
    else:
        raise ValueError(f"unknown tensor kind {kind!r}")
    return np.ascontiguousarray(out)


def params_from_hf(
    tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], list[str]]:
    """Builds mlm's ModernBERT params tree from a `ModernBertForMaskedLM` state dict.

    Args:
      tensors: state-dict key -> array (any float dtype; converted to float32).
      fields: the model fields (`model_fields`).
      where: the source, for error messages.

    Returns:
      (params tree of float32 numpy arrays, sorted names of the tensors left out: heads of
      other tasks and the like; the tied decoder weight is checked and not listed).

    Raises:
      DataError: tensors are missing or have another shape than the config gives, or the
        decoder is not tied to the word embeddings.
    """
    specs = tensor_specs(fields)
    missing = [hf for hf, *_ in specs if hf not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"{where}: tensor '{missing[0]}'{more} missing; convert a ModernBertForMaskedLM "
            "checkpoint (with its MLM head) and the config.json it was saved with"
        )
    for hf, _, _, expected in specs:
        if tuple(np.shape(tensors[hf])) != expected:
            raise DataError(
                f"{where}: tensor '{hf}' has shape {tuple(np.shape(tensors[hf]))} but the "
                f"config gives {expected}; give the config.json the weights were saved with"
            )
    decoder = tensors.get(HF_DECODER_WEIGHT)
    if decoder is not None and not np.array_equal(decoder, tensors[HF_WORD_EMBEDDINGS]):
        raise DataError(
            f"{where}: '{HF_DECODER_WEIGHT}' differs from '{HF_WORD_EMBEDDINGS}'; mlm's MLM "
            "head is tied to the word embeddings, so this (untied) model cannot be converted"
        )
    params = {
        mlm: to_mlm(kind, np.asarray(tensors[hf], np.float32), fields["num_heads"])
        for hf, mlm, kind, _ in specs
    }
    known = {hf for hf, *_ in specs} | {HF_DECODER_WEIGHT}
    left_out = sorted(name for name in tensors if name not in known)
    return traverse_util.unflatten_dict(params), left_out


def hf_from_params(params: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Names mlm's ModernBERT params as a `ModernBertForMaskedLM` state dict.

    The tied decoder weight is left out, as `save_pretrained` leaves it out.

    Args:
      params: mlm's params tree (numpy or jax arrays).
      fields: the model fields.

    Returns:
      state-dict key -> C-contiguous float32 array.

    Raises:
      DataError: the params hold classification heads, which ModernBertForMaskedLM lacks.
    """
    heads = sorted(set(params) - {"encoder", "mlm_head"})
    if heads:
        raise DataError(
            f"params hold {', '.join(heads)}, which Hugging Face's ModernBertForMaskedLM has "
            "no place for; export a model without model.cls_heads / next-sentence head"
        )
    flat = traverse_util.flatten_dict(params)
    return {
        hf: from_mlm(kind, np.asarray(flat[mlm], np.float32))
        for hf, mlm, kind, _ in tensor_specs(fields)
    }
