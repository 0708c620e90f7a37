"""Benchmarks, one subcommand each: the train or eval step with MFU (`step`), the host input
pipeline alone (`input`), the train state's memory per device on a mesh (`memory`) and the cost
of a checkpoint save (`checkpoint`). Each builds what it measures with the training code
(`mlm.experiment.Experiment`, `mlm.data.inputs.build_inputs`, `mlm.checkpoint`).

Run:
  python -m mlm.bench step --config configs/NAME.py [--config.x=y ...] [--steps 20]
      [--warmup 3] [--eval] [--real_fraction 0.94] [--model-garden-python PYTHON]
  python -m mlm.bench input --seq_lengths 128,512 [--config configs/NAME.py]
      [--config.data.num_workers=2 ...] [--num_batches 50] [--warmup_batches 5] [--workdir DIR]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mlm.bench memory
      --config configs/bert_large.py --config.mesh.fsdp=8
  python -m mlm.bench checkpoint --config configs/bert_base.py [--repeats 2]
  python -m mlm.bench SUBCOMMAND --help

Every subcommand takes `--json_out FILE` (append its JSON records) and prints a summary, then its
JSON record(s), one per line, last. Without `--config` the config is `mlm.config.base_config()`
(BERT-base data settings: batch 256, next-sentence pairs, the built-in corpus); `--config.x=y`
overrides work either way, so every data source (`data.train_files`, `data.prepared_dir`,
`data.tfds_name`, `data.tfrecord_files`) can be measured. The old spellings still run: no
subcommand is `step`, and `--input-only`, `--state-memory` and `--checkpoint-cost` select
`input`, `memory` and `checkpoint`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mlm import config as config_lib
from mlm import config_file as config_file_lib
from mlm import kernels, step_bench
from mlm.errors import ConfigError, MlmError
from mlm.input_bench import bench_input, format_table
from mlm.step_bench import DEFAULT_REAL_FRACTION


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
      repeats: saves timed per mode (at least 1).

    Returns:
      `state_bytes`, `async_blocking_s` (the mean time `save` takes to return: the
      device-to-host copy), `async_total_s` (until the files are written), and
      `blocking_s` (save + wait, what a synchronous save would cost the loop).
    """
    from mlm import checkpoint, parallel
    from mlm.experiment import Experiment

    if repeats < 1:
        raise ConfigError(f"--repeats={repeats} must be at least 1")
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


def format_state_memory(record: dict[str, Any]) -> str:
    """One human-readable line for a `bench_state_memory` record."""
    gib = 2**30
    return (
        f"mesh {record['mesh']}: state {record['state_bytes'] / gib:.3f} GiB, per device "
        f"{record['max_device_bytes'] / gib:.3f} GiB (max) / "
        f"{record['min_device_bytes'] / gib:.3f} GiB (min) = {record['fraction']:.4f} of the state"
    )


def format_checkpoint_cost(record: dict[str, Any]) -> str:
    """One human-readable line for a `bench_checkpoint_cost` record."""
    return (
        f"state {record['state_bytes'] / 2**30:.3f} GiB: an async save holds the loop "
        f"{record['async_blocking_s']:.3f} s (written after {record['async_total_s']:.3f} s); "
        f"a blocking save {record['blocking_s']:.3f} s"
    )


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


# --- The command line: one subcommand per benchmark, each with its own flags. ---

# What a subcommand runs: config -> (the summary to print, the JSON records).
Measure = Callable[[ml_collections.ConfigDict], tuple[str, list[dict[str, Any]]]]


def _define_step() -> Measure:
    """Defines the flags of `step` and returns its measurement."""
    from absl import flags

    steps = flags.DEFINE_integer("steps", 20, "Timed steps.")
    warmup = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
    eval_step = flags.DEFINE_bool("eval", False, "Time the eval step (forward only) instead.")
    real_fraction = flags.DEFINE_float(
        "real_fraction", DEFAULT_REAL_FRACTION, "Mean non-pad fraction of the synthetic rows."
    )
    model_garden_python = flags.DEFINE_string(
        "model-garden-python",
        None,
        "A Python with tf-models-official: also time Model Garden's train step on the same "
        "batches, between two halves of ours (from a clone of the repository).",
    )

    def measure(config: ml_collections.ConfigDict) -> tuple[str, list[dict[str, Any]]]:
        record = step_bench.bench_step_with_reference(
            config,
            steps=steps.value,
            warmup=warmup.value,
            eval_step=eval_step.value,
            real_fraction=real_fraction.value,
            model_garden_python=model_garden_python.value,
        )
        return step_bench.format_step(record), [record]

    return measure


def _define_input() -> Measure:
    """Defines the flags of `input` and returns its measurement."""
    from absl import flags

    seq_lengths = flags.DEFINE_list("seq_lengths", [], "Sequence lengths; empty: the config's.")
    num_batches = flags.DEFINE_integer(
        "num_batches", 50, "Timed batches per length (with data.num_workers: a few hundred)."
    )
    warmup_batches = flags.DEFINE_integer("warmup_batches", 5, "Untimed batches read first.")
    workdir = flags.DEFINE_string("workdir", None, "Corpus and vocab; default: a temp dir.")

    def measure(config: ml_collections.ConfigDict) -> tuple[str, list[dict[str, Any]]]:
        lengths = _parse_seq_lengths(seq_lengths.value)
        with tempfile.TemporaryDirectory(prefix="mlm_bench_") as scratch:
            records = bench_input(
                config,
                workdir.value or scratch,
                seq_lengths=lengths,
                num_batches=num_batches.value,
                warmup_batches=warmup_batches.value,
            )
        return format_table(records), records

    return measure


def _define_memory() -> Measure:
    """`memory` has no flags of its own; returns its measurement."""

    def measure(config: ml_collections.ConfigDict) -> tuple[str, list[dict[str, Any]]]:
        record = bench_state_memory(config)
        return format_state_memory(record), [record]

    return measure


def _define_checkpoint() -> Measure:
    """Defines the flags of `checkpoint` and returns its measurement."""
    from absl import flags

    repeats = flags.DEFINE_integer("repeats", 2, "Saves timed per mode (async, blocking).")

    def measure(config: ml_collections.ConfigDict) -> tuple[str, list[dict[str, Any]]]:
        with tempfile.TemporaryDirectory(prefix="mlm_bench_ckpt_") as scratch:
            directory = os.path.join(scratch, "checkpoints")
            record = bench_checkpoint_cost(config, directory, repeats=repeats.value)
        return format_checkpoint_cost(record), [record]

    return measure


# Subcommand: (what it measures, the definer of its flags).
SUBCOMMANDS: dict[str, tuple[str, Callable[[], Measure]]] = {
    "step": ("the train step (--eval: the eval step) with tokens/s and MFU", _define_step),
    "input": ("the train input pipeline alone, at each sequence length", _define_input),
    "memory": ("the train state's bytes per device on config.mesh", _define_memory),
    "checkpoint": ("how long a checkpoint save holds up the loop", _define_checkpoint),
}
# The spellings from before subcommands: one boolean flag per benchmark but the step.
OLD_FLAGS = {"input-only": "input", "state-memory": "memory", "checkpoint-cost": "checkpoint"}
_OLD_FLAG = re.compile(r"^--?(no)?(input-only|state-memory|checkpoint-cost)(?:=(.*))?$")
_HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
_USAGE = "python -m mlm.bench {} [--config FILE] [--config.FIELD=VALUE ...] [flags]"


def split_subcommand(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Reads the subcommand of a command line, in its new or its old spelling.

    `python -m mlm.bench SUBCOMMAND [flags]` names it first. The old flags still select one:
    `--input-only`, `--state-memory` and `--checkpoint-cost` (absl booleans: also `--flag=true`,
    `--noflag`) choose `input`, `memory` and `checkpoint`.

    Args:
      argv: the command line, program name first.

    Returns:
      (the subcommand, or None when neither spelling names one: `step` runs; the argv absl
      parses, without the subcommand and the old flags).

    Raises:
      ConfigError: an unknown subcommand, an old flag next to a subcommand or with a value
        that is not a boolean, or old flags choosing two benchmarks.
    """
    args, name, chosen = list(argv[1:]), None, set()
    if args and not args[0].startswith("-"):
        name = args.pop(0)
        if name not in SUBCOMMANDS:
            hint = config_lib.did_you_mean(name, list(SUBCOMMANDS))
            raise ConfigError(
                f"unknown subcommand '{name}'{hint}; choose one of {', '.join(SUBCOMMANDS)} "
                "(python -m mlm.bench --help)"
            )
    end = args.index("--") if "--" in args else len(args)  # absl's end of flags.
    old = [(arg, _OLD_FLAG.match(arg)) for arg in args[:end]]
    for arg, match in old:
        if match and name is not None:
            raise ConfigError(f"drop '{arg}': the subcommand '{name}' says what to measure")
        value = (match[3] or "true").lower() if match else ""
        if match and value not in ("true", "t", "1", "false", "f", "0"):
            raise ConfigError(f"'{arg}' takes true or false; better, run '{OLD_FLAGS[match[2]]}'")
        if match and not match[1] and value in ("true", "t", "1"):
            chosen.add(OLD_FLAGS[match[2]])
    if len(chosen) > 1:
        raise ConfigError(
            f"the flags choose {' and '.join(sorted(chosen))} at once; run one subcommand: "
            + _USAGE.format("|".join(SUBCOMMANDS))
        )
    rest = [arg for arg, match in old if not match] + args[end:]
    return name or next(iter(chosen), None), [argv[0], *rest]


def help_text(name: str | None, flag_help: str = "") -> str:
    """`--help`: the subcommands (name None), or a subcommand's usage and its flags.

    Args:
      name: the subcommand, or None for `python -m mlm.bench --help`.
      flag_help: absl's help for the subcommand's flags (`FlagValues.module_help`).
    """
    if name is None:
        width = max(map(len, SUBCOMMANDS))
        return "\n".join(
            [
                "Benchmarks of mlm's training code, one subcommand each.",
                "",
                "usage: " + _USAGE.format("SUBCOMMAND"),
                "",
                *(f"  {key.ljust(width)}  {about}" for key, (about, _) in SUBCOMMANDS.items()),
                "",
                "Each prints a summary, then its JSON record(s), one per line; a subcommand's",
                "flags: python -m mlm.bench SUBCOMMAND --help. Without a subcommand, step runs;",
                "the old flags --input-only, --state-memory and --checkpoint-cost run input,",
                "memory and checkpoint.",
            ]
        )
    flag_lines = [line for line in flag_help.splitlines() if line.startswith(" ")]
    return "\n".join(
        [
            f"python -m mlm.bench {name}: {SUBCOMMANDS[name][0]}.",
            "",
            "usage: " + _USAGE.format(name),
            "",
            "flags:",
            *flag_lines,
            "",
            "Config fields: docs/reference.md 'Config reference'; absl's own flags: --helpfull.",
        ]
    )


def _define_config_flag(argv: list[str]) -> Any:
    """Defines `--config` (a file, or `base_config()`) after checking the overrides in argv.

    A shipped config named by `--config` is rewritten in `argv` (in place) to its file's path.
    """
    from absl import flags
    from ml_collections import config_flags

    help_string = (
        "Config file (configs/*.py), then --config.FIELD=VALUE overrides; default: "
        "mlm.config.base_config() (BERT-base data settings)."
    )
    config_path = config_file_lib.config_file_from_argv(argv)
    if config_path:
        # A shipped config's name becomes its file's path, for absl to load the same file.
        config_path = config_file_lib.resolve_config_path(config_path)
        config_file_lib.check_overrides(config_file_lib.load_config_file(config_path), argv)
        argv[:] = config_file_lib.with_config_path(argv, config_path)
        holder = config_flags.DEFINE_config_file("config", None, help_string)
    else:
        config_file_lib.check_overrides(config_lib.base_config(), argv)
        holder = config_flags.DEFINE_config_dict("config", config_lib.base_config(), help_string)
    # The help string names the default; absl would print the whole config, a line a field.
    flags.FLAGS["config"].default_as_str = None
    return holder


def run() -> None:
    """The command line: the subcommand and its flags; a user mistake exits 2 with one line."""
    from absl import app, flags, logging

    try:
        name, argv = split_subcommand(sys.argv)
        wants_help = any(arg in _HELP_FLAGS for arg in argv[1:])
        if name is None and wants_help:
            print(help_text(None))
            return
        name = name or "step"
        config_flag = _define_config_flag(argv)
        measure = SUBCOMMANDS[name][1]()
        json_out = flags.DEFINE_string("json_out", None, "Also append the JSON record(s) here.")
        if wants_help:
            module = flags.FLAGS.find_module_defining_flag("json_out")
            print(help_text(name, flags.FLAGS.module_help(module)))
            return

        def parse(args: list[str]) -> list[str]:
            try:
                return flags.FLAGS(args)
            except flags.Error as error:
                raise ConfigError(
                    f"{' '.join(str(error).split())}; python -m mlm.bench {name} --help lists "
                    "its flags"
                ) from None

        def main(args: list[str]) -> None:
            if len(args) > 1:
                raise ConfigError(
                    f"unexpected argument '{args[1]}'; the subcommand comes first: "
                    + _USAGE.format("|".join(SUBCOMMANDS))
                )
            if not flags.FLAGS["verbosity"].present:
                logging.set_verbosity(logging.WARNING)
            kernels.skip_absent_tpu()
            # The records time compilation (compile_s): a hit in JAX's persistent compilation
            # cache (JAX_COMPILATION_CACHE_DIR) would time reading the executable instead.
            jax.config.update("jax_enable_compilation_cache", False)
            kernels.tune_host(jax.devices()[0].platform)  # As mlm.train's command line does.
            text, records = measure(config_flag.value)
            print(text)
            for record in records:
                print(json.dumps(record))
            if json_out.value:
                write_json_lines(json_out.value, records)

        app.run(main, argv=argv, flags_parser=parse)
    except MlmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
