"""Hugging Face BERT model directories: config.json, weights (safetensors or pytorch_model.bin)
and the WordPiece vocab, read into numpy and written back without transformers or torch.

Reading `pytorch_model.bin` needs torch (`pip install 'mlm[interop]'`); safetensors do not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
from tokenizers.implementations import BertWordPieceTokenizer

from mlm.data.tokenizer import (
    CLS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    SEP_TOKEN,
    UNK_TOKEN,
    read_vocab_text,
    vocab_tokens,
)
from mlm.errors import DataError

CONFIG_FILENAME = "config.json"
SAFETENSORS_FILENAME = "model.safetensors"
SAFETENSORS_INDEX_FILENAME = "model.safetensors.index.json"
TORCH_FILENAME = "pytorch_model.bin"
VOCAB_FILENAME = "vocab.txt"
TOKENIZER_FILENAME = "tokenizer.json"
SENTENCEPIECE_FILENAME = "spiece.model"  # ALBERT's and T5's tokenizer: not WordPiece.
TOKENIZER_CONFIG_FILENAME = "tokenizer_config.json"
SPECIAL_TOKENS_FILENAME = "special_tokens_map.json"
_SPECIAL_TOKENS = {
    "unk_token": UNK_TOKEN,
    "sep_token": SEP_TOKEN,
    "pad_token": PAD_TOKEN,
    "cls_token": CLS_TOKEN,
    "mask_token": MASK_TOKEN,
}


def read_json(path: str) -> dict[str, Any]:
    """Reads a JSON object file.

    Raises:
      DataError: missing, unreadable or not a JSON object; the message names the file and the fix.
    """
    fix = "give the file written with the model (save_pretrained writes it)"
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except FileNotFoundError:
        raise DataError(f"'{path}' not found; {fix}") from None
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError included.
        raise DataError(f"'{path}' cannot be read as JSON ({error}); {fix}") from None
    if not isinstance(content, dict):
        raise DataError(f"'{path}' is not a JSON object; {fix}")
    return content


def read_tensors(model_dir: str) -> dict[str, np.ndarray]:
    """Reads a model directory's weights: model.safetensors, its sharded index, or the .bin.

    Args:
      model_dir: a Hugging Face model directory.

    Returns:
      state-dict key -> numpy array.

    Raises:
      DataError: no weights file, an unreadable one, or a .bin without torch installed.
    """
    single = os.path.join(model_dir, SAFETENSORS_FILENAME)
    index = os.path.join(model_dir, SAFETENSORS_INDEX_FILENAME)
    torch_file = os.path.join(model_dir, TORCH_FILENAME)
    if os.path.isfile(single):
        return _read_safetensors([single])
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) for shard in weight_map.values()
        ):
            raise DataError(
                f"'{index}': weight_map is not an object of tensor name -> file name; give the "
                "index written with the shards (save_pretrained writes it)"
            )
        shards = sorted(set(weight_map.values()))
        return _read_safetensors([os.path.join(model_dir, shard) for shard in shards])
    if os.path.isfile(torch_file):
        return _read_torch(torch_file)
    raise DataError(
        f"'{model_dir}' holds no {SAFETENSORS_FILENAME}, {SAFETENSORS_INDEX_FILENAME} or "
        f"{TORCH_FILENAME}; give a directory written by save_pretrained"
    )


def _read_safetensors(paths: list[str]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        try:
            # The flax reader, unlike the numpy one, knows bfloat16 (as ml_dtypes' numpy dtype).
            with safetensors.safe_open(path, framework="flax") as file:
                for name in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[name] = np.asarray(file.get_tensor(name))
        except (OSError, ValueError, TypeError, safetensors.SafetensorError) as error:
            raise DataError(f"'{path}' cannot be read as safetensors ({error})") from None
    return tensors


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise DataError(
            f"reading '{path}' needs torch: pip install 'mlm[interop]' (or save the model as "
            "safetensors)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises many kinds for bad files)
        raise DataError(f"'{path}' cannot be read by torch.load ({error})") from None
    return {
        name: tensor.detach().float().numpy() if tensor.is_floating_point() else tensor.numpy()
        for name, tensor in state.items()
    }


def read_vocab(model_dir: str) -> str:
    """Returns the WordPiece vocab as vocab.txt text: from vocab.txt, else from tokenizer.json.

    Raises:
      DataError: neither file, a tokenizer.json that is not WordPiece, or a vocab that is not a
        BERT vocab (not UTF-8, a duplicate or blank token, a special token missing).
    """
    path = os.path.join(model_dir, VOCAB_FILENAME)
    if os.path.isfile(path):
        text = read_vocab_text(path)
        vocab_tokens(text, path)
        return text
    tokenizer_path = os.path.join(model_dir, TOKENIZER_FILENAME)
    if not os.path.isfile(tokenizer_path):
        if os.path.isfile(os.path.join(model_dir, SENTENCEPIECE_FILENAME)):
            raise DataError(
                f"'{model_dir}' has a SentencePiece tokenizer ({SENTENCEPIECE_FILENAME}); mlm's "
                "vocabs are WordPiece, so only models with a WordPiece vocab.txt or "
                "tokenizer.json convert"
            )
        raise DataError(
            f"'{model_dir}' holds no {VOCAB_FILENAME} or {TOKENIZER_FILENAME}; save the "
            "tokenizer next to the model (tokenizer.save_pretrained)"
        )
    model = read_json(tokenizer_path).get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict) or model.get("type") != "WordPiece":
        kind = model.get("type") if isinstance(model, dict) else None
        raise DataError(
            f"'{tokenizer_path}' is a {kind or 'non-WordPiece'} tokenizer, not WordPiece; mlm's "
            "vocabs are WordPiece, so models with BPE, Unigram or SentencePiece tokenizers do "
            "not convert"
        )
    ids = list(vocab.values())
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids) or sorted(ids) != list(
        range(len(ids))
    ):
        raise DataError(
            f"'{tokenizer_path}': the WordPiece vocab's ids are not 0, 1, ..., {len(ids) - 1}; "
            "give the tokenizer saved with the model, or its vocab.txt"
        )
    text = "".join(f"{token}\n" for token in sorted(vocab, key=vocab.get))
    vocab_tokens(text, f"{tokenizer_path} (its vocab, one token a line)")
    return text


def read_lowercase(model_dir: str) -> bool:
    """Whether the tokenizer lowercases (tokenizer_config.json's do_lower_case; default True)."""
    path = os.path.join(model_dir, TOKENIZER_CONFIG_FILENAME)
    if os.path.isfile(path):
        config = read_json(path)
        if "do_lower_case" in config:
            return _flag(config["do_lower_case"], path, "do_lower_case")
    tokenizer_path = os.path.join(model_dir, TOKENIZER_FILENAME)
    if os.path.isfile(tokenizer_path):
        normalizer = read_json(tokenizer_path).get("normalizer") or {}
        if isinstance(normalizer, dict) and "lowercase" in normalizer:
            return _flag(normalizer["lowercase"], tokenizer_path, "normalizer.lowercase")
    return True


def _flag(value: Any, path: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise DataError(
            f"'{path}': {key} is {value!r}, not true or false; fix it or pass --lowercase "
            "true/false"
        )
    return value


def write_model_dir(
    model_dir: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    vocab_text: str,
    lowercase: bool,
) -> None:
    """Writes a directory `from_pretrained` and `AutoTokenizer.from_pretrained` load.

    config.json, model.safetensors, vocab.txt, tokenizer.json (BERT's WordPiece pipeline, the
    [CLS] / [SEP] template included), tokenizer_config.json and special_tokens_map.json.

    Args:
      model_dir: an existing, empty directory.
      config: the config.json content (`layout.hf_bert_config`).
      tensors: the state dict (`layout.hf_from_params`).
      vocab_text: vocab.txt's content.
      lowercase: the tokenizer's do_lower_case.
    """
    with open(os.path.join(model_dir, CONFIG_FILENAME), "w", encoding="utf-8") as file:
        json.dump(dict(config), file, indent=2, sort_keys=True)
    safetensors.numpy.save_file(
        dict(tensors), os.path.join(model_dir, SAFETENSORS_FILENAME), metadata={"format": "pt"}
    )
    vocab_path = os.path.join(model_dir, VOCAB_FILENAME)
    with open(vocab_path, "w", encoding="utf-8") as file:
        file.write(vocab_text)
    # The fast tokenizer's own file: AutoTokenizer reads it whatever tokenizer class the
    # model_type maps to (ModernBERT's and ALBERT's are not WordPiece classes).
    BertWordPieceTokenizer(vocab_path, lowercase=lowercase).save(
        os.path.join(model_dir, TOKENIZER_FILENAME)
    )
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "model_max_length": config["max_position_embeddings"],
        **_SPECIAL_TOKENS,
    }
    for name, content in (
        (TOKENIZER_CONFIG_FILENAME, tokenizer_config),
        (SPECIAL_TOKENS_FILENAME, _SPECIAL_TOKENS),
    ):
        with open(os.path.join(model_dir, name), "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2)
