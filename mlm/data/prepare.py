"""Tokenize text corpora once into sharded ArrayRecord files: `python -m mlm.data.prepare`.

Run:
  python -m mlm.data.prepare --input 'corpus/*.txt' --eval_input 'heldout/*.txt' \
      --output /data/prepared --vocab_size 30522 --num_workers 16

Input files are in the BERT pretraining layout (one sentence per line, a blank line between
documents). Each file is cut into byte ranges that end at blank lines, so one huge file is
tokenized by several worker processes too; the parent writes the documents, in input order,
into ``DIR/{train,eval}-NNNNN.array_record`` shards of ``--documents_per_shard`` documents, then
``DIR/metadata.json`` last (see `mlm.data.prepared` for the format and the reader). The output
depends only on the inputs and the vocab, never on the number of workers.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from mlm.data.corpus import document_boundary, expand_globs, iter_file_documents
from mlm.data.prepared import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILENAME,
    SHARD_SUFFIX,
    VOCAB_FILENAME,
    WRITER_OPTIONS,
    encode_document,
    shard_filename,
    token_dtype,
)
from mlm.data.tokenizer import (
    SPECIAL_TOKENS,
    Vocab,
    encode_documents,
    load_vocab,
    train_wordpiece,
)
from mlm.errors import ConfigError, DataError, MlmError, WorkdirError
from mlm.paths import write_text_atomically

DEFAULT_VOCAB_SIZE = 30522
DEFAULT_DOCUMENTS_PER_SHARD = 100_000
ENCODE_BATCH_SENTENCES = 8192  # sentences tokenized per call in a worker
MIN_TASK_BYTES = 1 << 20
MAX_TASK_BYTES = 16 << 20  # bounds the tokenized text a worker hands back at once
TASKS_PER_WORKER = 4  # aim for this many tasks per worker, for balance
SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Task:
    """A byte range of one input file, starting at a line start right after a blank line.

    Attributes:
      path: the file.
      start: first byte.
      end: one past the last byte.
      last: whether the range ends the file.
    """

    path: str
    start: int
    end: int
    last: bool


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """The tokenized documents of a task.

    Attributes:
      records: one record per non-empty tokenized document, in order.
      num_text_documents: documents in the text (before dropping those that tokenize to nothing).
      num_sentences: non-empty tokenized sentences.
      num_tokens: tokens.
    """

    records: list[bytes]
    num_text_documents: int
    num_sentences: int
    num_tokens: int


# ------------------------------------------------------------------------------ reading text


def split_file(path: str, target_bytes: int) -> list[tuple[int, int]]:
    """Cuts a file into byte ranges of about ``target_bytes``, each ending after a blank line.

    A range boundary is the start of the line after a blank one, so the documents of the ranges,
    read one after the other, are those of the whole file. A file without blank lines stays one
    range; the file is read only between a target offset and the next blank line.

    Args:
      path: a text file.
      target_bytes: the wanted range size.

    Returns:
      ``(start, end)`` ranges covering the file, in order.
    """
    size = _file_size(path)
    bounds = [0]
    while bounds[-1] + target_bytes < size:
        boundary = document_boundary(path, bounds[-1] + target_bytes)
        if boundary >= size:
            break
        bounds.append(boundary)
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as error:
        raise DataError(
            f"{path}: cannot read ({error.strerror or error}); check the path and its permissions"
        ) from None


def plan_tasks(files: Sequence[str], task_bytes: int) -> Iterator[Task]:
    """Yields the tasks of a split in input order, cutting each file lazily.

    Args:
      files: the split's text files, in order.
      task_bytes: the wanted task size.

    Yields:
      Tasks covering every file, file after file.
    """
    for path in files:
        ranges = split_file(path, task_bytes)
        for number, (start, end) in enumerate(ranges, start=1):
            yield Task(path=path, start=start, end=end, last=number == len(ranges))


# ---------------------------------------------------------------------------------- tokenizing


def tokenize_task(vocab: Vocab, task: Task, dtype: np.dtype) -> TaskResult:
    """Tokenizes the documents of one task into records.

    Args:
      vocab: the vocabulary.
      task: the byte range to read.
      dtype: the stored token dtype.

    Returns:
      The TaskResult.
    """
    records: list[bytes] = []
    counts = collections.Counter()

    def flush(batch: list[list[str]]) -> None:
        for document in encode_documents(vocab, batch):
            records.append(encode_document(document, dtype))
            counts["sentences"] += len(document)
            counts["tokens"] += sum(len(sentence) for sentence in document)

    batch: list[list[str]] = []
    batch_sentences = 0
    for document in iter_file_documents(task.path, task.start, task.end):
        counts["text_documents"] += 1
        batch.append(document)
        batch_sentences += len(document)
        if batch_sentences >= ENCODE_BATCH_SENTENCES:
            flush(batch)
            batch, batch_sentences = [], 0
    flush(batch)
    return TaskResult(
        records=records,
        num_text_documents=counts["text_documents"],
        num_sentences=counts["sentences"],
        num_tokens=counts["tokens"],
    )


_worker_state: dict[str, Any] = {}


def _init_worker(vocab_path: str, lowercase: bool, dtype: np.dtype) -> None:
    """Loads the vocab once per worker process; one tokenizer thread per process."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state["vocab"] = load_vocab(vocab_path, lowercase)
    _worker_state["dtype"] = dtype


def _run_task(task: Task) -> TaskResult:
    return tokenize_task(_worker_state["vocab"], task, _worker_state["dtype"])


def _results(
    tasks: Iterator[Task], vocab_path: str, lowercase: bool, dtype: np.dtype, num_workers: int
) -> Iterator[tuple[Task, TaskResult]]:
    """Yields each task with its result, in task order, tokenizing on ``num_workers`` processes.

    At most ``2 * num_workers`` tasks are in flight, so memory stays bounded. With one worker
    the tasks run in this process.
    """
    if num_workers == 1:
        vocab = load_vocab(vocab_path, lowercase)
        for task in tasks:
            yield task, tokenize_task(vocab, task, dtype)
        return
    pool = futures.ProcessPoolExecutor(
        num_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(vocab_path, lowercase, dtype),
    )
    try:
        pending: collections.deque[tuple[Task, futures.Future]] = collections.deque()
        for task in tasks:
            pending.append((task, pool.submit(_run_task, task)))
            if len(pending) >= 2 * num_workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------ writing


class ShardWriter:
    """Writes records into ``SPLIT-NNNNN.array_record`` files of at most N records each."""

    def __init__(self, output_dir: str, split: str, documents_per_shard: int):
        self._output_dir = output_dir
        self._split = split
        self._documents_per_shard = documents_per_shard
        self._writer: ArrayRecordWriter | None = None
        self.shards: list[dict[str, Any]] = []

    def write(self, record: bytes) -> None:
        """Appends a record, starting a new shard when the current one is full."""
        if self._writer is None or self.shards[-1]["num_documents"] >= self._documents_per_shard:
            self._close_shard()
            name = shard_filename(self._split, len(self.shards))
            self._writer = ArrayRecordWriter(os.path.join(self._output_dir, name), WRITER_OPTIONS)
            self.shards.append({"file": name, "num_documents": 0})
        self._writer.write(record)
        self.shards[-1]["num_documents"] += 1

    def close(self) -> list[dict[str, Any]]:
        """Finishes the last shard; returns ``[{"file", "num_documents"}, ...]``."""
        self._close_shard()
        return self.shards

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def prepare_split(
    split: str,
    files: Sequence[str],
    output_dir: str,
    *,
    vocab_path: str,
    lowercase: bool,
    dtype: np.dtype,
    num_workers: int,
    documents_per_shard: int,
    task_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenizes a split's files into shards; returns the split's metadata.

    Args:
      split: ``"train"`` or ``"eval"``, the shard name prefix.
      files: the text files, in order.
      output_dir: where the shards go.
      vocab_path: the vocab.txt to tokenize with.
      lowercase: lowercase before tokenizing.
      dtype: the stored token dtype.
      num_workers: tokenizer processes.
      documents_per_shard: records per shard file.
      task_bytes: text bytes per task; None: the total / (4 * num_workers), within 1-16 MiB.
      progress: show a progress bar (text bytes done) on stderr.

    Returns:
      ``input_files``, ``input_bytes``, ``num_documents``, ``num_sentences``, ``num_tokens``,
      ``shards``.
    """
    total_bytes = sum(_file_size(path) for path in files)
    if task_bytes is None:
        task_bytes = total_bytes // (TASKS_PER_WORKER * num_workers)
        task_bytes = min(max(task_bytes, MIN_TASK_BYTES), MAX_TASK_BYTES)
    writer = ShardWriter(output_dir, split, documents_per_shard)
    totals = collections.Counter()
    file_documents = 0
    results = _results(plan_tasks(files, task_bytes), vocab_path, lowercase, dtype, num_workers)
    with (
        contextlib.closing(results),
        tqdm.tqdm(
            total=total_bytes,
            desc=f"{split} ({len(files)} files)",
            unit="B",
            unit_scale=True,
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        try:
            for task, result in results:
                for record in result.records:
                    writer.write(record)
                totals["sentences"] += result.num_sentences
                totals["tokens"] += result.num_tokens
                file_documents += result.num_text_documents
                if task.last:
                    if not file_documents:
                        raise DataError(
                            f"{task.path}: holds no sentences; write one sentence per line "
                            "with a blank line between documents, or leave the file out"
                        )
                    file_documents = 0
                bar.update(task.end - task.start)
        finally:
            shards = writer.close()
    num_documents = sum(shard["num_documents"] for shard in shards)
    if not num_documents:
        raise DataError(f"{split} input: no text that tokenizes to anything; check the files")
    return {
        "input_files": list(files),
        "input_bytes": total_bytes,
        "num_documents": num_documents,
        "num_sentences": totals["sentences"],
        "num_tokens": totals["tokens"],
        "shards": shards,
    }


# ------------------------------------------------------------------------------------ prepare


def prepare(
    input_files: Sequence[str],
    output_dir: str,
    *,
    eval_files: Sequence[str] = (),
    vocab_file: str | None = None,
    vocab_size: int | None = None,
    lowercase: bool = True,
    num_workers: int = 1,
    documents_per_shard: int = DEFAULT_DOCUMENTS_PER_SHARD,
    overwrite: bool = False,
    task_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenizes text files once into a prepared directory (see the module docstring).

    Args:
      input_files: train text files in the BERT layout, in order.
      output_dir: the directory to write (created if needed).
      eval_files: eval text files; none: no eval split.
      vocab_file: a BERT vocab.txt to copy to ``DIR/vocab.txt``; None: train a WordPiece vocab.
      vocab_size: the size of the vocab to train (default 30522); not with ``vocab_file``.
      lowercase: lowercase and strip accents before tokenizing ("uncased").
      num_workers: tokenizer processes (1: tokenize in this process). More than one are
        spawned, so a script calling this needs the usual ``if __name__ == "__main__":`` guard.
      documents_per_shard: documents per ArrayRecord file.
      overwrite: replace a finished preparation in ``output_dir``.
      task_bytes: text bytes per worker task (None: automatic); does not change the output.
      progress: show progress bars on stderr.

    Returns:
      The metadata written to ``DIR/metadata.json``.
    """
    _check_arguments(input_files, vocab_file, vocab_size, num_workers, documents_per_shard)
    vocab_text = _read_vocab_text(vocab_file, lowercase) if vocab_file else None
    _clear_output(output_dir, overwrite)
    vocab_path = os.path.join(output_dir, VOCAB_FILENAME)
    if vocab_text is not None:
        write_text_atomically(vocab_path, vocab_text)
    else:
        train_wordpiece(input_files, vocab_size or DEFAULT_VOCAB_SIZE, lowercase, vocab_path)
    size = load_vocab(vocab_path, lowercase).size
    dtype = token_dtype(size)
    options = dict(
        vocab_path=vocab_path,
        lowercase=lowercase,
        dtype=dtype,
        num_workers=num_workers,
        documents_per_shard=documents_per_shard,
        task_bytes=task_bytes,
        progress=progress,
    )
    splits = {"train": prepare_split("train", input_files, output_dir, **options)}
    if eval_files:
        splits["eval"] = prepare_split("eval", eval_files, output_dir, **options)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vocab_size": size,
        "lowercase": lowercase,
        "token_dtype": dtype.str,
        "splits": splits,
    }
    write_text_atomically(
        os.path.join(output_dir, METADATA_FILENAME), json.dumps(metadata, indent=1) + "\n"
    )
    return metadata


def _check_arguments(
    input_files: Sequence[str],
    vocab_file: str | None,
    vocab_size: int | None,
    num_workers: int,
    documents_per_shard: int,
) -> None:
    """Raises ConfigError / DataError for arguments that cannot work."""
    if not input_files:
        raise DataError("--input: no text files given; set comma-separated globs of text files")
    if vocab_file and vocab_size is not None:
        raise ConfigError(
            "--vocab_file and --vocab_size both given; give --vocab_file to use a vocab, or "
            "--vocab_size to train one"
        )
    if vocab_size is not None and vocab_size < len(SPECIAL_TOKENS) + 2:
        raise ConfigError(f"--vocab_size={vocab_size} is too small; use e.g. 30522 (BERT)")
    if num_workers < 1:
        raise ConfigError(f"--num_workers={num_workers}; use at least 1")
    if documents_per_shard < 1:
        raise ConfigError(f"--documents_per_shard={documents_per_shard}; use at least 1")


def _read_vocab_text(vocab_file: str, lowercase: bool) -> str:
    """Checks a vocab.txt and returns its exact text (read before the output is cleared, since
    it may be the output's own vocab.txt)."""
    load_vocab(vocab_file, lowercase)
    with open(vocab_file, encoding="utf-8", newline="") as file:
        return file.read()


def _clear_output(output_dir: str, overwrite: bool) -> None:
    """Creates the output directory, refusing or clearing a finished preparation there.

    Shards and the vocab of an earlier (finished with ``overwrite``, or unfinished) preparation
    are removed, metadata.json first, so an interrupted run never looks finished.
    """
    metadata_path = os.path.join(output_dir, METADATA_FILENAME)
    if os.path.exists(metadata_path) and not overwrite:
        raise WorkdirError(
            f"{output_dir}: already holds a finished preparation ({METADATA_FILENAME}); pass "
            "--overwrite to replace it or choose another --output"
        )
    try:
        os.makedirs(output_dir, exist_ok=True)
        stale = [metadata_path, os.path.join(output_dir, VOCAB_FILENAME)]
        for split in SPLITS:
            stale += glob.glob(os.path.join(glob.escape(output_dir), f"{split}-*{SHARD_SUFFIX}"))
        for path in stale:
            if os.path.exists(path):
                os.remove(path)
    except OSError as error:
        raise WorkdirError(
            f"{output_dir}: cannot prepare the output directory ({error.strerror or error}); "
            "choose a writable --output"
        ) from None


# -------------------------------------------------------------------------------- command line


def run() -> None:
    """The command line: parses flags and prepares; user mistakes exit 2 with a one-line error."""
    from absl import app, flags

    input_flag = flags.DEFINE_string("input", None, "Comma-separated globs of train text files.")
    output_flag = flags.DEFINE_string("output", None, "Directory to write.")
    eval_flag = flags.DEFINE_string("eval_input", None, "Comma-separated globs of eval files.")
    vocab_file_flag = flags.DEFINE_string("vocab_file", None, "BERT vocab.txt to tokenize with.")
    vocab_size_flag = flags.DEFINE_integer(
        "vocab_size", None, f"Size of the WordPiece vocab to train (default {DEFAULT_VOCAB_SIZE})."
    )
    lowercase_flag = flags.DEFINE_boolean("lowercase", True, "Lowercase and strip accents.")
    workers_flag = flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Tokenizer processes.")
    shard_flag = flags.DEFINE_integer(
        "documents_per_shard", DEFAULT_DOCUMENTS_PER_SHARD, "Documents per ArrayRecord file."
    )
    overwrite_flag = flags.DEFINE_boolean(
        "overwrite", False, "Replace a finished preparation in --output."
    )
    flags.mark_flags_as_required(["input", "output"])

    def main(argv: list[str]) -> None:
        del argv
        eval_files = expand_globs(eval_flag.value, "--eval_input", "") if eval_flag.value else []
        metadata = prepare(
            expand_globs(input_flag.value, "--input", ""),
            output_flag.value,
            eval_files=eval_files,
            vocab_file=vocab_file_flag.value,
            vocab_size=vocab_size_flag.value,
            lowercase=lowercase_flag.value,
            num_workers=workers_flag.value,
            documents_per_shard=shard_flag.value,
            overwrite=overwrite_flag.value,
        )
        for split, info in metadata["splits"].items():
            print(
                f"{split}: {len(info['input_files'])} files, {info['num_documents']} documents, "
                f"{info['num_sentences']} sentences, {info['num_tokens']} tokens in "
                f"{len(info['shards'])} shards"
            )
        print(f"wrote {os.path.join(output_flag.value, METADATA_FILENAME)}")

    try:
        app.run(main)
    except MlmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
