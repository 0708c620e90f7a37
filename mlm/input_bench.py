"""The input-pipeline benchmark: batches per second of the host pipeline, without a model.

The datasets come from `mlm.data.inputs.build_inputs`, exactly as training builds them, for
each sequence length asked for. `python -m mlm.bench input` is the command line.
"""

from __future__ import annotations

import copy
import os
import resource
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mlm import config as config_lib
from mlm.data.inputs import build_inputs
from mlm.data.pipeline import prefetch
from mlm.errors import ConfigError, DataError
from mlm.paths import VOCAB_FILENAME

# BERT's max_predictions_per_seq for its two sequence lengths (create_pretraining_data.py flags);
# other lengths use round(seq_length * data.masking_rate).
BERT_MAX_PREDICTIONS = {128: 20, 512: 76}


def max_predictions_for(seq_length: int, masking_rate: float) -> int:
    """Returns BERT's `max_predictions_per_seq` for a sequence length.

    Args:
      seq_length: tokens per row.
      masking_rate: fraction of tokens to predict, for lengths BERT did not use.

    Returns:
      20 for 128, 76 for 512, else round(seq_length * masking_rate) (at least 1).
    """
    if seq_length in BERT_MAX_PREDICTIONS:
        return BERT_MAX_PREDICTIONS[seq_length]
    return max(1, round(seq_length * masking_rate))


def config_for_seq_length(
    config: ml_collections.ConfigDict, seq_length: int | None
) -> ml_collections.ConfigDict:
    """Returns a validated copy of `config` reading rows of `seq_length` tokens.

    Args:
      config: the benchmark's config (validated or not; left unchanged).
      seq_length: S; sets data.seq_length, data.max_predictions_per_seq (BERT's value) and
        raises model.max_position_embeddings to at least S. None keeps the config's data fields.

    Returns:
      The validated (locked) copy.
    """
    config = copy.deepcopy(config)
    if seq_length is not None:
        with config.unlocked():
            config.data.seq_length = seq_length
            config.data.max_predictions_per_seq = max_predictions_for(
                seq_length, config.data.masking_rate
            )
            config.model.max_position_embeddings = max(
                config.model.max_position_embeddings, seq_length
            )
    return config_lib.validate(config)


def time_batches(
    batches: Iterator[dict[str, np.ndarray]], num_batches: int, warmup_batches: int
) -> dict[str, float]:
    """Reads `warmup_batches` untimed, then times `num_batches` and counts what they hold.

    Args:
      batches: an iterator over batches in the contract's format.
      num_batches: timed batches.
      warmup_batches: batches read first and excluded (worker start-up, first reads).

    Returns:
      `warmup_s`, `elapsed_s`, `cpu_s` (CPU time of this process, all its threads, not of
      worker processes), `examples`, `tokens` (rows x S), `real_tokens` (input_mask ones) and
      `masked` (used prediction slots) of the timed batches.

    Raises:
      DataError: the iterator ends before `warmup_batches + num_batches` batches.
    """

    def take() -> dict[str, np.ndarray]:
        try:
            return next(batches)
        except StopIteration:
            raise DataError(
                f"the train data ended before {warmup_batches + num_batches} batches; lower "
                "--num_batches / --warmup_batches"
            ) from None

    start = time.perf_counter()
    for _ in range(warmup_batches):
        take()
    warmup_s = time.perf_counter() - start
    counts = dict(examples=0, tokens=0, real_tokens=0, masked=0.0)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = take()
        counts["examples"] += batch["input_mask"].shape[0]
        counts["tokens"] += batch["input_mask"].size
        counts["real_tokens"] += int(batch["input_mask"].sum())
        counts["masked"] += float(batch["masked_lm_weights"].sum())
    elapsed_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    return dict(warmup_s=warmup_s, elapsed_s=elapsed_s, cpu_s=cpu_s, **counts)


def _check_arguments(
    seq_lengths: Sequence[int],
    num_batches: int,
    warmup_batches: int,
) -> None:
    if num_batches < 1:
        raise ConfigError(f"--num_batches={num_batches} must be at least 1")
    if warmup_batches < 0:
        raise ConfigError(f"--warmup_batches={warmup_batches} must be at least 0")
    for seq_length in seq_lengths:
        if seq_length < 1:
            raise ConfigError(f"--seq_lengths: {seq_length} must be a positive length")


def bench_input(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    seq_lengths: Sequence[int] = (),
    num_batches: int = 50,
    warmup_batches: int = 5,
) -> list[dict[str, Any]]:
    """Measures the host input pipeline alone (no model) at each sequence length.

    The train dataset of this process is built with `build_inputs` (the setup: corpus, vocab,
    tokenizing), then `warmup_batches` are read untimed and `num_batches` timed.

    Args:
      config: a config from `base_config()` / `configs/`; its data source is what is measured,
        with `data.num_workers` worker processes and `data.prefetch_batches` as in training.
      workdir: where the built-in corpus and vocab.txt go; reused across lengths (the vocab is
        trained once, on the first).
      seq_lengths: S values to measure; each sets data.seq_length and BERT's
        max_predictions_per_seq (`config_for_seq_length`). Empty: the config's own data fields
        (what TFRecords, whose length is fixed when written, need).
      num_batches: timed batches per length.
      warmup_batches: untimed batches read first.

    Returns:
      One record per length: `seq_length`, `max_predictions_per_seq`, `batch_size` (per host),
      `source`, `next_sentence`, `num_workers`, `thread_prefetch`, `num_batches`,
      `warmup_batches`, `setup_s` (build_inputs), `vocab_built` (WORKDIR/vocab.txt was absent
      before the setup, which then trained or copied it), `warmup_s`, `ms_per_batch`,
      `cpu_ms_per_batch` (this process's CPU; with workers, the cost of receiving batches),
      `examples_per_s`, `tokens_per_s` (all S x rows), `real_tokens_per_s` (non-pad),
      `real_token_fraction`, `masked_per_example`, `vocab_size`, `peak_rss_mib` (this
      process's peak resident memory so far: setup included, worker processes not).
    """
    _check_arguments(seq_lengths, num_batches, warmup_batches)
    num_workers, thread_prefetch = config.data.num_workers, config.data.prefetch_batches
    os.makedirs(workdir, exist_ok=True)
    records = []
    for seq_length in seq_lengths or [None]:
        run_config = config_for_seq_length(config, seq_length)
        vocab_built = not os.path.exists(os.path.join(workdir, VOCAB_FILENAME))
        start = time.perf_counter()
        inputs = build_inputs(
            run_config,
            workdir,
            need_eval=False,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
        setup_s = time.perf_counter() - start
        batches = iter(prefetch(inputs.train, num_workers, thread_prefetch))
        try:
            counts = time_batches(batches, num_batches, warmup_batches)
        finally:
            batches.close()
        elapsed_s = counts["elapsed_s"]
        data = run_config.data
        records.append(
            dict(
                seq_length=data.seq_length,
                max_predictions_per_seq=data.max_predictions_per_seq,
                batch_size=counts["examples"] // num_batches,
                source=inputs.source,
                next_sentence=bool(data.use_next_sentence_label),
                num_workers=num_workers,
                thread_prefetch=thread_prefetch,
                num_batches=num_batches,
                warmup_batches=warmup_batches,
                setup_s=setup_s,
                vocab_built=vocab_built,
                warmup_s=counts["warmup_s"],
                ms_per_batch=1000 * elapsed_s / num_batches,
                cpu_ms_per_batch=1000 * counts["cpu_s"] / num_batches,
                examples_per_s=counts["examples"] / elapsed_s,
                tokens_per_s=counts["tokens"] / elapsed_s,
                real_tokens_per_s=counts["real_tokens"] / elapsed_s,
                real_token_fraction=counts["real_tokens"] / counts["tokens"],
                masked_per_example=counts["masked"] / counts["examples"],
                vocab_size=inputs.vocab.size if inputs.vocab is not None else None,
                peak_rss_mib=peak_rss_mib(),
            )
        )
    return records


_COLUMNS = (
    ("seq", "seq_length", "{:d}"),
    ("setup s", "setup_s", "{:.2f}"),
    ("warmup s", "warmup_s", "{:.2f}"),
    ("ms/batch", "ms_per_batch", "{:.1f}"),
    ("cpu ms/batch", "cpu_ms_per_batch", "{:.1f}"),
    ("examples/s", "examples_per_s", "{:,.0f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("real tokens/s", "real_tokens_per_s", "{:,.0f}"),
    ("real %", "real_token_fraction", "{:.1%}"),
    ("masked/ex", "masked_per_example", "{:.2f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:,.0f}"),
)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if os.uname().sysname == "Darwin" else peak / 1024


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """Formats `bench_input` records as a header line and an aligned table, one row per length.

    Args:
      records: what `bench_input` returned (non-empty).

    Returns:
      The text, without a trailing newline.
    """
    first = records[0]
    header = (
        f"input pipeline: {first['source']}, NSP {'on' if first['next_sentence'] else 'off'}, "
        f"{first['batch_size']} rows/batch, {first['num_workers']} workers, "
        f"thread prefetch {first['thread_prefetch']}, {first['num_batches']} batches after "
        f"{first['warmup_batches']} warmup, vocab {first['vocab_size']}"
    )
    cells = [[title for title, _, _ in _COLUMNS]]
    cells += [[form.format(record[key]) for _, key, form in _COLUMNS] for record in records]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    ]
    return "\n".join([header, *lines])
