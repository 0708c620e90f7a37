"""Benchmarks: the train step (default) or eval step (`--eval`) with MFU, the host input pipeline
alone (`--input-only`), the train state's memory per device on a mesh (`--state-memory`) and the
cost of a checkpoint save (`--checkpoint-cost`).

Run:
  python -m mlm.bench --config configs/NAME.py [--config.x=y ...] [--steps 20] [--warmup 3] \
      [--eval] [--real_fraction 0.94] [--model-garden-python PYTHON]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mlm.bench --state-memory \
      --config configs/bert_large.py --config.mesh.fsdp=8
  python -m mlm.bench --input-only --seq_lengths 128,512 [--config configs/NAME.py] \
      [--config.data.use_next_sentence_label=False ...] [--num_batches 50] [--warmup_batches 5] \
      [--config.data.num_workers=2] [--config.data.prefetch_batches=0] [--workdir DIR] \
      [--json_out FILE]

Without `--config` the config is `mlm.config.base_config()` (BERT-base data settings: batch 256,
next-sentence pairs, the built-in corpus); `--config.x=y` overrides work either way, so every data
source (`data.train_files`, `data.prepared_dir`, `data.tfds_name`, `data.tfrecord_files`) can be
measured. The datasets come from `mlm.data.inputs.build_inputs`, exactly as training builds them.
With `data.num_workers`, time a few hundred batches: the workers' buffers, filled during warmup,
make a short run look faster than the steady state.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mlm import config as config_lib
from mlm import config_file as config_file_lib
from mlm import kernels, step_bench
from mlm.data.inputs import VOCAB_FILENAME, build_inputs
from mlm.data.pipeline import prefetch
from mlm.errors import ConfigError, DataError, MlmError
from mlm.step_bench import DEFAULT_REAL_FRACTION

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
      `real_token_fraction`, `masked_per_example`, `vocab_size`.
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
)


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


def bench_state_memory(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Creates the train state sharded on the configured mesh and measures its bytes per device.

    The state is created already sharded (init jitted with the state's out_shardings), as
    training creates it, and the bytes are summed from the arrays' addressable shards.

    Args:
      config: a config whose `model`, `optimizer` and `mesh` are measured.

    Returns:
      `mesh` (axis sizes), `num_devices`, `state_bytes` (the unsharded state: every array once),
      `max_device_bytes` and `min_device_bytes` (what the shardings put on one device), and
      `fraction` (max_device_bytes / state_bytes).
    """
    from mlm import parallel
    from mlm.experiment import Experiment

    config = config_lib.validate(copy.deepcopy(config))
    mesh = parallel.make_mesh(config.mesh)
    state = Experiment.build(config, mesh).init_state()
    per_device = parallel.state_bytes_per_device(state)
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    return dict(
        mesh=dict(mesh.shape),
        num_devices=mesh.size,
        state_bytes=state_bytes,
        max_device_bytes=max(per_device.values()),
        min_device_bytes=min(per_device.values()),
        fraction=max(per_device.values()) / state_bytes,
    )


def bench_checkpoint_cost(
    config: ml_collections.ConfigDict, directory: str, repeats: int = 2
) -> dict[str, Any]:
    """Times how long a checkpoint save holds up the training loop, async vs blocking.

    The train state is created as training creates it and saved with `mlm.checkpoint.save`
    (the manager training uses) `repeats` times each way; a step in between keeps the timings
    apart from first-call costs.

    Args:
      config: a config whose `model`, `optimizer` and `mesh` are measured.
      directory: an empty scratch directory for the checkpoints.
      repeats: saves timed per mode.

    Returns:
      `state_bytes`, `async_blocking_s` (the mean time `save` takes to return: the
      device-to-host copy), `async_total_s` (until the files are written), and
      `blocking_s` (save + wait, what a synchronous save would cost the loop).
    """
    from mlm import checkpoint, parallel
    from mlm.experiment import Experiment

    config = config_lib.validate(copy.deepcopy(config))
    mesh = parallel.make_mesh(config.mesh)
    state = Experiment.build(config, mesh).init_state()
    jax.block_until_ready(state)
    manager = checkpoint.make_manager(directory, keep=1)
    checkpoint.save(manager, 0, state, None)  # Warm-up: first-call costs.
    manager.wait_until_finished()
    returned, total, blocking = [], [], []
    try:
        for index in range(repeats):
            start = time.perf_counter()
            checkpoint.save(manager, 2 * index + 1, state, None)
            returned.append(time.perf_counter() - start)
            manager.wait_until_finished()
            total.append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint.save(manager, 2 * index + 2, state, None)
            manager.wait_until_finished()
            blocking.append(time.perf_counter() - start)
    finally:
        manager.close()
    return dict(
        state_bytes=sum(leaf.nbytes for leaf in jax.tree.leaves(state)),
        repeats=repeats,
        async_blocking_s=float(np.mean(returned)),
        async_total_s=float(np.mean(total)),
        blocking_s=float(np.mean(blocking)),
    )


def bench_step_with_reference(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    warmup: int,
    eval_step: bool,
    real_fraction: float,
    model_garden_python: str | None,
) -> dict[str, Any]:
    """`step_bench.bench_step`, plus Model Garden's train step timed between its two halves.

    Args:
      config: the benchmark config.
      steps, warmup, eval_step, real_fraction: as for `step_bench.bench_step`.
      model_garden_python: a Python with tf-models-official, or None for ours alone.

    Returns:
      The `bench_step` record; with Model Garden also `model_garden` (its record),
      `model_garden_tokens_per_s` and `speedup` (our tokens/s over Model Garden's).
    """
    config = config_lib.validate(copy.deepcopy(config))
    if model_garden_python is None:
        return step_bench.bench_step(
            config, steps=steps, warmup=warmup, eval_step=eval_step, real_fraction=real_fraction
        )
    if eval_step:
        raise ConfigError("--model-garden-python compares train steps; drop --eval")
    command = step_bench.model_garden_command(
        model_garden_python, config, steps=steps, warmup=warmup, real_fraction=real_fraction
    )
    reference: dict[str, Any] = {}
    record = step_bench.bench_step(
        config,
        steps=steps,
        warmup=warmup,
        real_fraction=real_fraction,
        interleave=lambda: reference.update(step_bench.run_model_garden(command)),
    )
    record["model_garden"] = reference
    record["model_garden_tokens_per_s"] = reference["tokens_per_s"]
    record["speedup"] = record["tokens_per_s"] / reference["tokens_per_s"]
    return record


def format_step(record: dict[str, Any]) -> str:
    """One human-readable line for a step benchmark record."""
    memory = record["peak_memory_bytes"]
    text = (
        f"{record['mode']} step ({record['kernels']} kernels) on {record['num_devices']} x "
        f"{record['device_kind']}: "
        f"{record['step_time_s'] * 1000:.1f} ms (median of {record['steps']}), "
        f"{record['tokens_per_s']:,.0f} non-pad tokens/s, compile {record['compile_s']:.1f} s, "
        f"MFU {record['mfu']:.1%} of {record['peak'] / 1e12:.3f} TFLOP/s "
        f"({record['peak_source']})"
        + (f", peak memory {memory / 2**30:.2f} GiB" if memory is not None else "")
        + (", cuDNN attention" if record.get("cudnn_attention") else "")
    )
    if "speedup" in record:
        text += (
            f"; Model Garden {record['model_garden_tokens_per_s']:,.0f} tokens/s "
            f"({record['model_garden']['step_time_s'] * 1000:.1f} ms): {record['speedup']:.2f}x"
        )
    return text


def write_json_lines(path: str, records: Sequence[dict[str, Any]]) -> None:
    """Appends one JSON line per record to `path` (so several runs can share one file)."""
    with open(path, "a", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def _parse_seq_lengths(values: Sequence[str]) -> list[int]:
    """Parses the `--seq_lengths` list ('128,512' arrives as ['128', '512'])."""
    try:
        return [int(value) for value in values]
    except ValueError:
        raise ConfigError(
            f"--seq_lengths={','.join(values)} must be comma-separated integers, e.g. 128,512"
        ) from None


def run() -> None:
    """The command line: parses flags and runs; user mistakes exit 2 with a one-line error."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    try:
        config_path = config_file_lib.config_file_from_argv(sys.argv)
        if config_path:
            config_file_lib.check_overrides(config_file_lib.load_config_file(config_path), sys.argv)
            config_flag = config_flags.DEFINE_config_file("config", None, "Config file.")
        else:
            # No file: base_config() (BERT-base data settings), still open to --config.x=y.
            config_file_lib.check_overrides(config_lib.base_config(), sys.argv)
            config_flag = config_flags.DEFINE_config_dict("config", config_lib.base_config())
    except MlmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    input_only = flags.DEFINE_bool("input-only", False, "Measure the input pipeline alone.")
    checkpoint_cost = flags.DEFINE_bool(
        "checkpoint-cost", False, "Time how long a save blocks the loop, async vs blocking."
    )
    state_memory = flags.DEFINE_bool(
        "state-memory", False, "Measure the train state's bytes per device on config.mesh."
    )
    seq_lengths = flags.DEFINE_list("seq_lengths", [], "Sequence lengths; empty: the config's.")
    num_batches = flags.DEFINE_integer("num_batches", 50, "Timed batches per sequence length.")
    warmup_batches = flags.DEFINE_integer("warmup_batches", 5, "Untimed batches read first.")
    workdir = flags.DEFINE_string("workdir", None, "Corpus and vocab; default: a temp dir.")
    json_out = flags.DEFINE_string("json_out", None, "Append the JSON record(s) here.")
    steps = flags.DEFINE_integer("steps", 20, "Step benchmark: timed steps.")
    warmup = flags.DEFINE_integer("warmup", 3, "Step benchmark: untimed steps after compiling.")
    eval_step = flags.DEFINE_bool("eval", False, "Step benchmark: time the eval step instead.")
    real_fraction = flags.DEFINE_float(
        "real_fraction", DEFAULT_REAL_FRACTION, "Mean non-pad fraction of the synthetic rows."
    )
    model_garden_python = flags.DEFINE_string(
        "model-garden-python",
        None,
        "A Python with tf-models-official: also time Model Garden's train step on the same "
        "model, between two halves of ours.",
    )

    def main(argv: list[str]) -> None:
        del argv
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        kernels.skip_absent_tpu()
        kernels.tune_host(jax.devices()[0].platform)  # As mlm.train's command line does.
        if checkpoint_cost.value:
            with tempfile.TemporaryDirectory(prefix="mlm_bench_ckpt_") as scratch:
                record = bench_checkpoint_cost(config_flag.value, os.path.join(scratch, "c"))
            print(
                f"state {record['state_bytes'] / 2**30:.3f} GiB: an async save holds the loop "
                f"{record['async_blocking_s']:.3f} s (written after {record['async_total_s']:.3f}"
                f" s); a blocking save {record['blocking_s']:.3f} s"
            )
            if json_out.value:
                write_json_lines(json_out.value, [record])
            return
        if state_memory.value:
            record = bench_state_memory(config_flag.value)
            gib = 2**30
            print(
                f"mesh {record['mesh']}: state {record['state_bytes'] / gib:.3f} GiB, per device "
                f"{record['max_device_bytes'] / gib:.3f} GiB (max) / "
                f"{record['min_device_bytes'] / gib:.3f} GiB (min) = "
                f"{record['fraction']:.4f} of the state"
            )
            if json_out.value:
                write_json_lines(json_out.value, [record])
            return
        if not input_only.value:
            record = bench_step_with_reference(
                config_flag.value,
                steps=steps.value,
                warmup=warmup.value,
                eval_step=eval_step.value,
                real_fraction=real_fraction.value,
                model_garden_python=model_garden_python.value,
            )
            print(format_step(record))
            print(json.dumps(record))
            if json_out.value:
                write_json_lines(json_out.value, [record])
            return
        with tempfile.TemporaryDirectory(prefix="mlm_bench_") as scratch:
            records = bench_input(
                config_flag.value,
                workdir.value or scratch,
                seq_lengths=_parse_seq_lengths(seq_lengths.value),
                num_batches=num_batches.value,
                warmup_batches=warmup_batches.value,
            )
        print(format_table(records))
        if json_out.value:
            write_json_lines(json_out.value, records)

    try:
        app.run(main)
    except MlmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
