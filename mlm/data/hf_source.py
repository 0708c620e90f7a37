"""Pretraining documents from a Hugging Face `datasets` dataset, by random access.

`data.hf_dataset` names a local dataset; nothing is downloaded (the Hub is switched to offline
mode while it is opened):

- a directory written by `save_to_disk` (a `Dataset`, read as the split `train`, or a
  `DatasetDict` with its splits), opened with `load_from_disk`;
- a directory of Parquet / JSON lines / Arrow files, or a glob (or one file) of them: converted
  once by `load_dataset` into an Arrow cache under `$MLM_CACHE_DIR/hf_datasets` (default
  `~/.cache/mlm/hf_datasets`; a rerun reuses it, changed files are converted again). A glob or
  file is the split `train`; a directory's splits come from its file names as `datasets` infers
  them (`train-*.parquet`, `validation/...`), all files being `train` when none is named;
- a Hub dataset name, `NAME` or `ORG/NAME` with an optional `:CONFIG`, found in the local
  Hugging Face datasets cache (`$HF_DATASETS_CACHE`) where an earlier `load_dataset` put it.

Each of these is Arrow, memory-mapped: `len` and indexing, so grain shuffles, shards per host by
index and resumes batch-exactly from the iterator state in the checkpoint. Streaming datasets
(remote URLs, `IterableDataset`) are refused: with no random access a resumed run could only
skip as many examples as were read, and the order of a remote stream is not fixed; materialise
them once with `save_to_disk`. `datasets` is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from mlm.data.sentences import TokenizeText, write_sentence_sample
from mlm.data.tfrecord_source import default_cache_dir
from mlm.data.tokenizer import Vocab
from mlm.errors import ConfigError, DataError

DEFAULT_TEXT_FIELD = "text"
# File formats read from a directory or glob, by extension: the `datasets` builder for each.
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # What save_to_disk writes.
_MATERIALISE = (
    "materialise it once where there is network: "
    "datasets.load_dataset(NAME).save_to_disk(DIR), then set data.hf_dataset=DIR"
)


# ------------------------------------------------------------------------------------ opening


def _datasets() -> Any:
    """Imports `datasets`; ConfigError with the install command when it is missing."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data.hf_dataset needs the `datasets` package, which is not installed; "
            "pip install 'mlm[hf]'"
        ) from None
    return datasets


@contextlib.contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """Switches `datasets` and the Hub client to offline mode for the block."""
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def files_cache_dir() -> str:
    """Where Parquet / JSON lines / Arrow files are converted: `$MLM_CACHE_DIR/hf_datasets`."""
    return os.path.join(default_cache_dir(), "hf_datasets")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _file_builder(files: list[str], path: str) -> str:
    """The `datasets` builder of the files (one format); ConfigError for other or mixed files."""
    builders = set()
    for name in files:
        builder = FILE_BUILDERS.get(os.path.splitext(name)[1].lower())
        if builder is None:
            raise ConfigError(
                f"data.hf_dataset={path!r} matches '{name}', which is not Parquet, JSON lines or "
                f"Arrow ({', '.join(FILE_BUILDERS)}); narrow the glob to those files"
            )
        builders.add(builder)
    if len(builders) > 1:
        raise ConfigError(
            f"data.hf_dataset={path!r} matches files of several formats "
            f"({', '.join(sorted(builders))}); narrow the glob to one format"
        )
    return builders.pop()


def _looks_like_path(path: str) -> bool:
    """Whether a missing `path` was meant as a file path rather than a Hub name."""
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or os.path.splitext(path)[1].lower() in FILE_BUILDERS
    )


def _load(datasets: Any, path: str) -> Any:
    """Loads `path` (see the module docstring) without network: a Dataset or DatasetDict."""
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if any(os.path.exists(os.path.join(local, m)) for m in _SAVED_MARKERS):
            return datasets.load_from_disk(local)
        try:
            loaded = datasets.load_dataset(local, cache_dir=files_cache_dir())
        except (FileNotFoundError, ValueError) as error:
            raise DataError(
                f"data.hf_dataset={path!r}: the directory holds no dataset "
                f"({_first_line(error)}); give a save_to_disk directory or one of Parquet, JSON "
                "lines or Arrow files"
            ) from None
        builder = next(iter(loaded.values())).info.builder_name
        if builder not in FILE_BUILDERS.values():
            raise ConfigError(
                f"data.hf_dataset={path!r}: the directory holds {builder} files; mlm reads "
                "Parquet, JSON lines or Arrow files, or a save_to_disk directory (for text "
                "files use data.train_files)"
            )
        return loaded
    if any(char in local for char in "*?[") or os.path.isfile(local):
        files = sorted(f for f in glob.glob(local, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(
                f"data.hf_dataset: no file matches '{path}'; check the glob (Parquet, JSON lines "
                "or Arrow files)"
            )
        return datasets.load_dataset(
            _file_builder(files, path), data_files={"train": files}, cache_dir=files_cache_dir()
        )
    if _looks_like_path(path):
        raise DataError(
            f"data.hf_dataset: '{path}' does not exist; give a save_to_disk directory, a "
            "directory or glob of Parquet, JSON lines or Arrow files, or a cached Hub name"
        )
    name, _, config_name = path.partition(":")
    cache = os.environ.get("HF_DATASETS_CACHE") or None
    try:
        return datasets.load_dataset(name, config_name or None, cache_dir=cache)
    except (OSError, ValueError) as error:  # ConnectionError and FileNotFoundError included.
        # A ValueError says what the cache lacks (a config); the others only that it is offline.
        detail = f": {_first_line(error)}" if isinstance(error, ValueError) else ""
        raise DataError(
            f"data.hf_dataset={path!r} is no local path and not in the local Hugging Face cache "
            f"({cache or datasets.config.HF_DATASETS_CACHE}{detail}); nothing is downloaded: "
            f"on a machine with network run datasets.load_dataset({name!r}"
            f"{f', {config_name!r}' if config_name else ''}).save_to_disk(DIR), then set "
            "data.hf_dataset=DIR"
        ) from None


def open_splits(path: str) -> dict[str, Any]:
    """Opens a local dataset without network and returns its splits.

    Args:
      path: `data.hf_dataset` (see the module docstring).

    Returns:
      {split name: memory-mapped `datasets.Dataset`}; a saved single `Dataset` is `train`.

    Raises:
      ConfigError: `datasets` is not installed, the path is remote (streaming), or files of
        other formats.
      DataError: the path does not exist, the glob matches nothing, or a Hub name is not in
        the local cache.
    """
    datasets = _datasets()
    if "://" in path:
        raise ConfigError(
            f"data.hf_dataset={path!r} is remote: mlm reads local datasets by random access "
            f"(streaming gives no exact resume); {_MATERIALISE}"
        )
    with _offline(datasets):
        loaded = _load(datasets, path)
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    if not isinstance(loaded, datasets.DatasetDict):
        raise ConfigError(
            f"data.hf_dataset={path!r} is a streaming {type(loaded).__name__} (no random "
            f"access); {_MATERIALISE}"
        )
    return dict(loaded)


def _select_split(datasets: Any, splits: Mapping[str, Any], split: str, where: str) -> Any:
    """The split (expression: `train[:99%]`, `train+validation`) of the splits, concatenated.

    Raises:
      ConfigError: naming `where` (`data.hf_split=...`): unknown split or bad expression.
    """
    names = ", ".join(sorted(splits))
    try:
        instruction = datasets.ReadInstruction.from_spec(split)
        parts = instruction.to_absolute({name: len(d) for name, d in splits.items()})
    except (ValueError, KeyError, AssertionError) as error:
        problem = _first_line(error)
        if problem.startswith("Unknown split"):
            problem = "no such split"
        raise ConfigError(
            f"{where}: {problem}; use one of the splits ({names}), optionally sliced like "
            "'train[:1%]'"
        ) from None
    pieces = [
        splits[part.splitname].select(range(part.from_, max(part.from_, part.to))) for part in parts
    ]
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def _string_columns(datasets: Any, features: Mapping[str, Any]) -> list[str]:
    return sorted(
        name
        for name, feature in features.items()
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    )


class HFTextSource:
    """A grain random-access data source of the texts (str) of one column of a `datasets` split.

    Picklable for grain worker processes: a memory-mapped dataset pickles as its file paths.
    A null text reads as an empty document.
    """

    def __init__(self, dataset: Any, text_field: str, description: str):
        """Wraps a `datasets.Dataset`, keeping only the `text_field` column."""
        self._dataset = dataset.select_columns([text_field])
        self._text_field = text_field
        self._description = description

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range [0, {len(self)}) of {self}")
        return self._dataset[int(index)][self._text_field] or ""

    def __repr__(self) -> str:
        return f"HFTextSource({self._description}, {self._text_field!r}, {len(self)} examples)"


def hf_text_source(
    path: str,
    split: str,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    split_field: str = "data.hf_split",
) -> HFTextSource:
    """Opens the texts of a split of a local `datasets` dataset for random access.

    Args:
      path: `data.hf_dataset` (see the module docstring).
      split: a split or split expression: `train`, `train[:99%]`, `train+validation`.
      text_field: the string column holding the document text.
      split_field: the config field `split` comes from, for messages.

    Returns:
      A grain random-access source: `source[i]` is the i-th text of the split, in its stored
      order; wrap it with `grain.MapDataset.source`.

    Raises:
      ConfigError: unknown split, an empty split, a text field that is not a string column,
        or see `open_splits`.
      DataError: see `open_splits`.
    """
    datasets = _datasets()
    where = f"{split_field}={split!r}"
    splits = open_splits(path)
    dataset = _select_split(datasets, splits, split, f"{where} of {path}")
    columns = _string_columns(datasets, dataset.features)
    if text_field not in columns:
        raise ConfigError(
            f"data.text_field={text_field!r} is not a string column of {path}; set it to one of: "
            f"{', '.join(columns) or '(none: the dataset has no string column)'}"
        )
    if not len(dataset):
        raise ConfigError(
            f"{where} selects no examples of {path}; widen it (splits: "
            f"{', '.join(f'{name} ({len(d)})' for name, d in sorted(splits.items()))})"
        )
    return HFTextSource(dataset, text_field, f"{path} split {split!r}")


# ------------------------------------------------------------------------------------ documents


def hf_documents(
    path: str,
    split: str,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    split_field: str = "data.hf_split",
    vocab: Vocab,
) -> grain.MapDataset:
    """Returns the tokenized documents of a `datasets` split, tokenized lazily on access.

    Args:
      path, split, text_field, split_field: see `hf_text_source`.
      vocab: the WordPiece vocabulary.

    Returns:
      A grain MapDataset whose element `i` is document `i`: one int32 id array per sentence,
      without special tokens; a document of no text is an empty list (the pipeline skips it).
    """
    source = hf_text_source(path, split, text_field=text_field, split_field=split_field)
    return grain.MapDataset.source(source).map(TokenizeText(vocab))


def write_vocab_sample(
    path: str,
    split: str,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    out_path: str,
    max_documents: int,
) -> str:
    """Writes documents spread evenly over a split as a text file to train a vocabulary on.

    A `datasets` split is stored in the order it was written (often sorted by title or
    source), so the sample takes every k-th document rather than the first ones. The layout is
    the BERT one: one sentence per line and a blank line between documents; documents without
    sentences are skipped. The file is written atomically.

    Args:
      path, split, text_field: see `hf_text_source`.
      out_path: the text file to write; its directory must exist.
      max_documents: the most documents to write (all of a smaller split).

    Returns:
      `out_path`.

    Raises:
      DataError: the sampled documents hold no sentences.
    """
    if max_documents < 1:
        raise ConfigError(f"max_documents={max_documents}: must be at least 1")
    source = hf_text_source(path, split, text_field=text_field)
    count = min(max_documents, len(source))
    indices = np.linspace(0, len(source) - 1, count).round().astype(np.int64)

    return write_sentence_sample(
        (source[index] for index in dict.fromkeys(indices.tolist())),
        out_path,
        source=f"data.hf_dataset={path!r} split {split!r}",
        no_sentences=(
            f"data.hf_dataset={path!r} split {split!r}: the {count} sampled documents hold "
            f"no sentences in {text_field!r}; check data.text_field"
        ),
    )
