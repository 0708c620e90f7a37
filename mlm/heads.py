"""Classification heads on the [CLS] token: `model.cls_heads` (Model Garden's `ClsHeadConfig`).

Each head pools one token of the sequence output (`cls_token_idx`), applies a dense layer of
`inner_dim` units and its activation, dropout, then a dense layer to `num_classes` logits, as Model
Garden's `ClassificationHead`. Next-sentence prediction is the head named `next_sentence`: it
trains on the batch's `next_sentence_labels`, keeps the parameter names of mlm's earlier fixed head
(`nsp_head/pooler`, `nsp_head/classifier`), the output `nsp_logits` and the metrics
`next_sentence_loss` / `next_sentence_accuracy`. Any other head NAME trains on `NAME_labels`, has
its parameters under `cls_heads/NAME`, its logits as `NAME_logits` and its metrics as `NAME_loss` /
`NAME_accuracy`.

This module holds the specs and the naming, without JAX (the config schema imports it); the flax
layer is `mlm.model.ClassificationHead`.
"""

from __future__ import annotations

import dataclasses
import keyword
from collections.abc import Mapping, Sequence
from typing import Any

NEXT_SENTENCE = "next_sentence"
# Activations a head may use: Model Garden's default tanh and the model's own set
# (mlm.config.ACTIVATIONS).
ACTIVATIONS = ("tanh", "gelu_tanh", "gelu", "relu", "silu")
# The fields of one `model.cls_heads` entry and their defaults (None: required).
FIELDS = {
    "name": None,
    "num_classes": None,
    "inner_dim": 0,  # 0: model.hidden_size.
    "activation": "tanh",
    "dropout_rate": 0.0,
    "cls_token_idx": 0,
}
# Names whose metric or sum keys would collide with the masked-LM ones or other logs.
RESERVED_NAMES = ("lm", "mlm", "nsp", "lm_example", "masked_lm", "validation", "dp", "num")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One classification head, resolved (hashable: it is a field of the flax module).

    Attributes:
      name: the head's name (a Python identifier).
      num_classes: logits per example.
      inner_dim: units of the pooler dense layer (never 0 here).
      activation: the pooler's activation (`ACTIVATIONS`).
      dropout_rate: dropout between the pooler and the classifier.
      cls_token_idx: the position of the pooled token.
    """

    name: str
    num_classes: int
    inner_dim: int
    activation: str = "tanh"
    dropout_rate: float = 0.0
    cls_token_idx: int = 0


def next_sentence_spec(hidden_size: int) -> HeadSpec:
    """The next-sentence head of `data.use_next_sentence_label` without `model.cls_heads`."""
    return HeadSpec(NEXT_SENTENCE, num_classes=2, inner_dim=hidden_size)


def label_key(name: str) -> str:
    """The batch key of a head's int labels [B]."""
    return "next_sentence_labels" if name == NEXT_SENTENCE else f"{name}_labels"


def logits_key(name: str) -> str:
    """The model output key of a head's float32 logits [B, num_classes]."""
    return "nsp_logits" if name == NEXT_SENTENCE else f"{name}_logits"


def head_of_logits_key(key: str) -> str | None:
    """The head whose logits a model output key holds, or None (the masked-LM logits)."""
    if key == "nsp_logits":
        return NEXT_SENTENCE
    if key == "mlm_logits" or not key.endswith("_logits"):
        return None
    return key[: -len("_logits")]


def sums_prefix(name: str) -> str:
    """The prefix of a head's metric sums (`PREFIX_loss_sum`, `_correct_sum`, `_count`)."""
    return "nsp" if name == NEXT_SENTENCE else name


def metric_prefix(prefix: str) -> str:
    """The prefix of a head's reported metrics (`PREFIX_loss`, `_accuracy`) from its sums'."""
    return NEXT_SENTENCE if prefix == "nsp" else prefix


def _as_dict(entry: Any) -> Any:
    """A head entry as a dict (config files may write ConfigDicts); other values as they are."""
    return entry.to_dict() if hasattr(entry, "to_dict") else entry


def entries(cls_heads: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`model.cls_heads` entries with the defaults filled in (no checks)."""
    return [{**FIELDS, **_as_dict(entry)} for entry in cls_heads]


def specs(
    cls_heads: Sequence[Mapping[str, Any]], hidden_size: int, use_next_sentence: bool
) -> tuple[HeadSpec, ...]:
    """The heads a model has.

    Args:
      cls_heads: `model.cls_heads` (validated).
      hidden_size: model.hidden_size (the default inner_dim).
      use_next_sentence: data.use_next_sentence_label; without `cls_heads` it adds the
        default next-sentence head.

    Returns:
      The head specs, in config order.
    """
    if not cls_heads:
        return (next_sentence_spec(hidden_size),) if use_next_sentence else ()
    return tuple(
        HeadSpec(
            name=entry["name"],
            num_classes=int(entry["num_classes"]),
            inner_dim=int(entry["inner_dim"]) or hidden_size,
            activation=entry["activation"],
            dropout_rate=float(entry["dropout_rate"]),
            cls_token_idx=int(entry["cls_token_idx"]),
        )
        for entry in entries(cls_heads)
    )


def record_labels(cls_heads: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, int], ...]:
    """(TFRecord feature, num_classes) of the heads other than next_sentence."""
    return tuple(
        (label_key(entry["name"]), int(entry["num_classes"]))
        for entry in entries(cls_heads)
        if entry["name"] != NEXT_SENTENCE
    )


def check(
    cls_heads: Any, *, seq_length: int, use_next_sentence: bool, tfrecords: bool
) -> list[str]:
    """Problems of `model.cls_heads`, as one-line messages (empty: fine).

    Args:
      cls_heads: the config value.
      seq_length: data.seq_length (cls_token_idx must be below it).
      use_next_sentence: data.use_next_sentence_label.
      tfrecords: the data source is data.tfrecord_files (the one source of other heads' labels).
    """
    if not isinstance(cls_heads, (list, tuple)):
        return [f"model.cls_heads must be a list of head dicts, got {cls_heads!r}"]
    problems, names = [], []
    for index, entry in enumerate(cls_heads):
        where = f"model.cls_heads[{index}]"
        entry = _as_dict(entry)
        if not isinstance(entry, Mapping):
            return [f"{where} must be a dict of {', '.join(FIELDS)}, got {entry!r}"]
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            return [f"{where} has unknown field '{unknown[0]}'; the fields are {', '.join(FIELDS)}"]
        missing = [
            field for field, default in FIELDS.items() if default is None and field not in entry
        ]
        if missing:
            return [f"{where} needs '{missing[0]}' (e.g. name='next_sentence', num_classes=2)"]
        head = {**FIELDS, **dict(entry)}
        name = head["name"]
        where = f"model.cls_heads[{index}] ('{name}')"
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            problems.append(
                f"model.cls_heads[{index}].name must be a Python identifier, got {name!r}"
            )
            continue
        if name in RESERVED_NAMES:
            problems.append(
                f"{where}: the name '{name}' is reserved (its metrics would collide with "
                f"{', '.join(RESERVED_NAMES)}); choose another name"
            )
        if name in names:
            problems.append(f"{where}: two heads are named '{name}'; head names must be unique")
        names.append(name)
        for field in ("num_classes", "inner_dim", "cls_token_idx"):
            if not isinstance(head[field], int) or isinstance(head[field], bool):
                problems.append(f"{where}.{field} must be an int, got {head[field]!r}")
        if not isinstance(head["dropout_rate"], (int, float)) or isinstance(
            head["dropout_rate"], bool
        ):
            problems.append(f"{where}.dropout_rate must be a number, got {head['dropout_rate']!r}")
        if problems:
            continue
        if head["num_classes"] < 2:
            problems.append(f"{where}.num_classes must be >= 2, got {head['num_classes']}")
        if head["inner_dim"] < 0:
            problems.append(
                f"{where}.inner_dim must be >= 0 (0: model.hidden_size), got {head['inner_dim']}"
            )
        if head["activation"] not in ACTIVATIONS:
            problems.append(
                f"{where}.activation must be one of {', '.join(ACTIVATIONS)}, got "
                f"{head['activation']!r}"
            )
        if not 0.0 <= head["dropout_rate"] < 1.0:
            problems.append(f"{where}.dropout_rate must be in [0, 1), got {head['dropout_rate']}")
        if not 0 <= head["cls_token_idx"] < seq_length:
            problems.append(
                f"{where}.cls_token_idx must be in [0, data.seq_length={seq_length}), got "
                f"{head['cls_token_idx']}"
            )
        if name == NEXT_SENTENCE and not use_next_sentence:
            problems.append(
                f"{where} trains on next_sentence_labels, which need "
                "data.use_next_sentence_label=True; set it or rename the head"
            )
        if name != NEXT_SENTENCE and not tfrecords:
            problems.append(
                f"{where} trains on the int64 feature {name}_labels of data.tfrecord_files, the "
                "only source with per-example labels; set data.tfrecord_files or drop the head"
            )
    if cls_heads and use_next_sentence and NEXT_SENTENCE not in names and not problems:
        problems.append(
            "data.use_next_sentence_label is True but model.cls_heads has no head named "
            "next_sentence; add {'name': 'next_sentence', 'num_classes': 2} or set "
            "data.use_next_sentence_label=False"
        )
    return problems


def metric_names(cls_heads: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The eval metrics of the heads other than next_sentence (train.best_metric may name them)."""
    return tuple(
        f"{entry['name']}_{kind}"
        for entry in entries(cls_heads)
        if entry.get("name") != NEXT_SENTENCE
        for kind in ("loss", "accuracy")
    )
