"""Model Garden's `build_inputs`: from the `data` config to train / eval datasets and a vocab.

Text files (or the built-in corpus written into the workdir) are read, tokenized with the
workdir's `vocab.txt` (trained on the train split, or copied from `data.vocab_file`) and fed to
the grain pipeline of `mlm.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import grain
import ml_collections

from mlm.data.builtin_corpus import write_builtin_corpus
from mlm.data.corpus import expand_globs, read_documents
from mlm.data.pipeline import build_dataset
from mlm.data.tokenizer import Vocab, encode_documents, load_vocab, train_wordpiece
from mlm.errors import ConfigError, DataError

VOCAB_FILENAME = "vocab.txt"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the driver feeds on.

    Attributes:
      train: batches for training (infinite, resumable), or None when not needed.
      eval: batches for evaluation (one pass, the same on every `iter()`), or None without eval
        files or when not needed.
      vocab: the vocabulary (also saved as WORKDIR/vocab.txt).
    """

    train: grain.IterDataset | None
    eval: grain.IterDataset | None
    vocab: Vocab


def corpus_files(data: ml_collections.ConfigDict, workdir: str) -> tuple[list[str], list[str]]:
    """Returns (train files, eval files): the configured globs or the built-in corpus.

    Args:
      data: the `data` config section.
      workdir: where the built-in corpus is written (`WORKDIR/corpus`) when no files are given.

    Returns:
      Train files and eval files (eval may be empty when only train files are configured).
    """
    if not data.train_files:
        if data.eval_files:
            raise ConfigError(
                "data.eval_files is set but data.train_files is empty; set both, or neither to "
                "use the built-in corpus"
            )
        train_path, eval_path = write_builtin_corpus(os.path.join(workdir, "corpus"))
        return [train_path], [eval_path]
    train_files = expand_globs(data.train_files, "data.train_files")
    eval_files = expand_globs(data.eval_files, "data.eval_files") if data.eval_files else []
    return train_files, eval_files


def workdir_vocab(config: ml_collections.ConfigDict, workdir: str, train_files: list[str]) -> Vocab:
    """Loads WORKDIR/vocab.txt, creating it first from `data.vocab_file` or by training WordPiece.

    An existing WORKDIR/vocab.txt always wins, so a resumed run tokenizes exactly as before.

    Args:
      config: the full config (`data` and `model.vocab_size` are read).
      workdir: the run directory.
      train_files: text to train a vocab on when there is none.

    Returns:
      The vocab.

    Raises:
      DataError: the vocab has more tokens than `model.vocab_size`.
    """
    path = os.path.join(workdir, VOCAB_FILENAME)
    if not os.path.exists(path):
        if config.data.vocab_file:
            if not os.path.isfile(config.data.vocab_file):
                raise DataError(
                    f"data.vocab_file '{config.data.vocab_file}' does not exist; give a BERT "
                    "vocab.txt or leave it empty to train one"
                )
            shutil.copyfile(config.data.vocab_file, path + ".tmp")
            os.replace(path + ".tmp", path)
        else:
            train_wordpiece(train_files, config.model.vocab_size, config.data.lowercase, path)
    vocab = load_vocab(path, config.data.lowercase)
    if vocab.size > config.model.vocab_size:
        raise DataError(
            f"vocab '{path}' has {vocab.size} tokens but model.vocab_size is "
            f"{config.model.vocab_size}; set --config.model.vocab_size={vocab.size} or use a "
            "smaller vocab"
        )
    return vocab


def build_inputs(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    need_train: bool = True,
    need_eval: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Inputs:
    """Builds the train and eval datasets for this process.

    Args:
      config: the full validated config.
      workdir: the run directory (vocab.txt, built-in corpus).
      need_train: build the train dataset (False for `--mode eval`).
      need_eval: build the eval dataset when eval files exist (False for `--mode train`).
      shard_index: this process's index; each process reads a disjoint shard.
      shard_count: number of processes.

    Returns:
      The Inputs; each batch holds global_batch_size / shard_count rows.
    """
    data = config.data
    train_files, eval_files = corpus_files(data, workdir)
    vocab = workdir_vocab(config, workdir, train_files)
    options = dict(
        seq_length=data.seq_length,
        max_predictions=data.max_predictions_per_seq,
        masking_rate=data.masking_rate,
        whole_word_masking=data.whole_word_masking,
        use_next_sentence_label=data.use_next_sentence_label,
        short_seq_prob=data.short_seq_prob,
        batch_size=config.train.global_batch_size // shard_count,
        seed=config.train.seed,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    train = None
    if need_train:
        train_docs = encode_documents(vocab, read_documents(train_files))
        train = build_dataset(train_docs, vocab, train=True, **options)
    evaluation = None
    if eval_files and need_eval:
        eval_docs = encode_documents(vocab, read_documents(eval_files))
        evaluation = build_dataset(eval_docs, vocab, train=False, **options)
    return Inputs(train=train, eval=evaluation, vocab=vocab)
