"""Step benchmark: times the real jitted train (or eval) step and reports model FLOPs and MFU.

The step is the one training compiles (`mlm.experiment.Experiment`: the same shardings and state
donation), run on the first batches of the synthetic data source (`mlm.data.synthetic`, what
`data.synthetic=True` trains on): the configured shapes, random ids and a realistic fraction of
padding. `bench_step_with_reference` also times TF Model Garden's train step on the
same batches, with the repository's standalone script `benchmarks/model_garden_step.py` run in a
Python of its own. `python -m mlm.bench step --config configs/NAME.py` is the command line.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlm import config as config_lib
from mlm import parallel
from mlm.data.synthetic import (  # synthetic_batch: also imported from here.
    DEFAULT_REAL_FRACTION,
    synthetic_batch,  # noqa: F401
    synthetic_batches,
)
from mlm.errors import ConfigError
from mlm.experiment import Experiment
from mlm.kernels import cpu_host_memory

# Dense bfloat16 peak FLOP/s per device by `device_kind` substring (vendor data sheets; the
# first match wins, so specific names come before their family).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)
# The custom-call target of cuDNN's fused attention in a compiled GPU module (jax's
# `jax.nn.dot_product_attention(implementation='cudnn')` lowers to `__cudnn$fmha...`).
CUDNN_ATTENTION_TARGET = "__cudnn$fmha"
# Distinct synthetic batches a step benchmark cycles through (already on the devices).
NUM_BATCHES = 4


def model_flops_per_token(
    model: ml_collections.ConfigDict,
    seq_length: int,
    max_predictions: int,
    next_sentence: bool,
    train: bool = True,
) -> float:
    """Model FLOPs per sequence position of one step (matmuls only, as in MFU accounting).

    With H = hidden_size, I = intermediate_size, L = num_layers, V = vocab_size, S = seq_length,
    P = max_predictions, E = embedding_size (H when 0), for BERT and ALBERT:

      train = 6 * N + 12 * L * H * S + 6 * (P / S) * (H * E + E * V) [+ 6 * E * H]
              [+ 6 * (H * H + 2 * H) / S]

    where N = L * (4 * H * H + 2 * H * I) are the encoder's matmul weights (Kaplan et al.'s
    non-embedding count: Q, K, V, output and the two feed-forward kernels; biases and
    LayerNorm, under 1%, are left out; ALBERT's shared layers count once per layer they run
    in); 12 * L * H * S is QK^T and PV (2 * 2 * S * H per token per layer forward, times 3 for
    forward + backward); the masked-LM head (dense H x E and the tied E x V projection) runs on
    the P gathered slots of a row only, so its cost per position is scaled by P / S; E * H is
    the projection of factorised embeddings; the last bracket is the next-sentence pooler and
    classifier, once per row. ModernBERT's blocks have N = L * (4 * H * H + 3 * H * I) (GeGLU:
    H x 2I in, I x H out), and a local layer's query attends to at most
    `modernbert.local_attention` + 1 keys, so its attention term uses that instead of S.
    Embedding lookups are gathers (no FLOPs). Forward only (eval) is a third of this: 2 instead
    of 6 per weight, 4 instead of 12 for attention.

    Args:
      model: the `model` config section.
      seq_length: S, positions per row (padding included: the step computes on all of them).
      max_predictions: P, gathered masked-LM slots per row.
      next_sentence: whether the next-sentence head runs.
      train: forward + backward (True) or forward only.

    Returns:
      FLOPs per position; times rows x S per step gives the step's FLOPs.
    """
    h, i, v = model.hidden_size, model.intermediate_size, model.vocab_size
    n_layers = model.num_layers
    e = h if model.encoder == "modernbert" else (model.embedding_size or h)
    if model.encoder == "modernbert":
        every = model.modernbert.global_attn_every_n_layers
        n_global = len(range(0, n_layers, every))
        local_keys = min(seq_length, model.modernbert.local_attention + 1)
        encoder_weights = n_layers * (4 * h * h + 3 * h * i)
        attended = n_global * seq_length + (n_layers - n_global) * local_keys
    else:
        encoder_weights = n_layers * (4 * h * h + 2 * h * i) + (e * h if e != h else 0)
        attended = n_layers * seq_length
    flops = 6 * encoder_weights + 12 * h * attended
    flops += 6 * (max_predictions / seq_length) * (h * e + e * v)
    if next_sentence:
        flops += 6 * (h * h + 2 * h) / seq_length
    return flops if train else flops / 3


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Measures this process's float32 matmul FLOP/s with one large jitted matmul.

    Args:
      size: n of the n x n @ n x n product (2 n^3 FLOPs).
      repeats: timed calls after one warm-up; the fastest counts (a peak).

    Returns:
      FLOP/s of the fastest call.
    """
    keys = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(keys[0], (size, size), jnp.float32)
    b = jax.random.normal(keys[1], (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    times = time_calls(lambda: matmul(a, b), repeats, warmup=1)
    return 2 * size**3 / min(times)


def table_peak(device_kind: str) -> float | None:
    """Returns the dense bfloat16 peak FLOP/s of a device kind from PEAK_BF16_FLOPS, or None."""
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def device_peak(
    device: jax.Device, measured: Callable[[], float] = lambda: measure_matmul_peak()
) -> dict:
    """The peak FLOP/s MFU is measured against, and where it came from.

    Args:
      device: the first device of the mesh.
      measured: returns the measured matmul peak, used when the table has no entry (CPU).

    Returns:
      `peak` (FLOP/s per device) and `peak_source`: 'table: bf16 dense, KIND' or
      'measured: float32 matmul, this process'.
    """
    peak = table_peak(device.device_kind)
    if peak is not None:
        return dict(peak=peak, peak_source=f"table: bf16 dense, {device.device_kind}")
    return dict(peak=measured(), peak_source="measured: float32 matmul, this process")


def peak_memory_bytes(device: jax.Device) -> int | None:
    """The device's peak bytes in use so far, where the backend reports it (None on CPU)."""
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def time_calls(call: Callable[[], Any], num_calls: int, warmup: int) -> list[float]:
    """Runs `call` `warmup` times untimed, then `num_calls` times, each until its result is ready.

    Args:
      call: a function returning jax arrays (or pytrees of them).
      num_calls: timed calls.
      warmup: untimed calls first.

    Returns:
      The seconds of each timed call.
    """
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(num_calls):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def _check_arguments(steps: int, warmup: int, real_fraction: float) -> None:
    if steps < 1:
        raise ConfigError(f"--steps={steps} must be at least 1")
    if warmup < 0:
        raise ConfigError(f"--warmup={warmup} must be at least 0")
    if not 0.5 < real_fraction <= 1.0:
        raise ConfigError(f"--real_fraction={real_fraction} must be in (0.5, 1]")


def bench_step(
    config: ml_collections.ConfigDict,
    *,
    steps: int = 20,
    warmup: int = 3,
    eval_step: bool = False,
    real_fraction: float = DEFAULT_REAL_FRACTION,
    num_batches: int = NUM_BATCHES,
    measure_peak: Callable[[], float] = measure_matmul_peak,
    interleave: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Compiles the configured train (or eval) step and times it on synthetic batches.

    Each timed step runs until its outputs are ready; the synthetic source's first
    `num_batches` train batches (`synthetic_batches`), already on the devices, are used in turn
    (input cost is excluded: see `mlm.bench input`). Without a table peak (CPU), the matmul peak
    is measured before and after the steps and the larger counts, so a moment of load from other
    processes does not lower it.

    Args:
      config: a config from `configs/`; its model, data shapes, optimizer and mesh are used.
      steps: timed steps.
      warmup: untimed steps after compilation.
      eval_step: time the eval step (forward only) instead of the train step.
      real_fraction: mean fraction of non-pad tokens per synthetic row.
      num_batches: distinct synthetic batches.
      measure_peak: the CPU peak measurement (a device without a table entry).
      interleave: called between two halves of the timed steps (e.g. a reference run), so
        both see the same machine load; None: one block of steps.

    Returns:
      `mode` ('train' / 'eval'), `device_kind`, `num_devices`, `batch_size`, `seq_length`,
      `max_predictions_per_seq`, `dtype`, `num_layers`, `hidden_size`,
      `attention_dropout_rate`, `real_token_fraction` (of the synthetic batches),
      `steps`, `compile_s` (lowering + compilation), `step_time_s` (median), `step_time_min_s`,
      `tokens_per_s` (non-pad tokens / median step), `model_flops_per_token`
      (`model_flops_per_token`, per position), `achieved_flops_per_s` (FLOPs per position x
      rows x S / median step, per device for a table peak, per process for a measured CPU
      peak), `peak`, `peak_source`, `mfu` (achieved / peak), `peak_memory_bytes` (first
      device; None where not reported), `kernels` (the kernel set that ran),
      `cudnn_attention` (the compiled step calls cuDNN's fused attention), and
      `keep_freed_host_memory` (`mlm.kernels.cpu_host_memory` settings in effect: the command
      line applies them on CPU).
    """
    _check_arguments(steps, warmup, real_fraction)
    config = config_lib.validate(config)
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(
        config.train.global_batch_size, config.optimizer.grad_accum_steps, mesh
    )
    data = config.data
    batch_size, seq_length = config.train.global_batch_size, data.seq_length
    host_batches = synthetic_batches(config, real_fraction, num_batches)
    batches = [parallel.global_batch(batch, mesh) for batch in host_batches]
    real_tokens = [int(batch["input_mask"].sum()) for batch in host_batches]
    device = mesh.devices.flat[0]
    cpu_peaks = [] if table_peak(device.device_kind) else [measure_peak()]
    experiment = Experiment.build(config, mesh)
    train_fn, eval_fn = experiment.train_step, experiment.eval_step
    state = experiment.init_state()
    jax.block_until_ready(state)
    start = time.perf_counter()
    if eval_step:
        compiled = eval_fn.lower(state.params, batches[0]).compile()
    else:
        compiled = train_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    cudnn_attention = CUDNN_ATTENTION_TARGET in compiled.as_text()
    counter = iter(range(10**9))

    def call() -> Any:
        nonlocal state
        batch = batches[next(counter) % num_batches]
        if eval_step:
            return compiled(state.params, batch)
        state, logs = compiled(state, batch)
        return state, logs

    if interleave is None:
        times = time_calls(call, steps, warmup)
    else:
        times = time_calls(call, steps // 2, warmup)
        interleave()
        times += time_calls(call, steps - steps // 2, warmup=1)
    if cpu_peaks:
        cpu_peaks.append(measure_peak())
    step_time = statistics.median(times)
    flops = model_flops_per_token(
        config.model,
        seq_length,
        data.max_predictions_per_seq,
        data.use_next_sentence_label,
        train=not eval_step,
    )
    # A table peak is per device; a measured one is this process's, over all its CPU devices
    # (they share the host's cores).
    peak_devices = jax.process_count() if cpu_peaks else mesh.size
    achieved = flops * batch_size * seq_length / step_time / peak_devices
    peak = device_peak(device, lambda: max(cpu_peaks))
    return dict(
        mode="eval" if eval_step else "train",
        device_kind=device.device_kind,
        num_devices=mesh.size,
        batch_size=batch_size,
        seq_length=seq_length,
        max_predictions_per_seq=data.max_predictions_per_seq,
        dtype=config.model.dtype,
        num_layers=config.model.num_layers,
        hidden_size=config.model.hidden_size,
        attention_dropout_rate=config.model.attention_dropout_rate,
        real_token_fraction=sum(real_tokens) / (num_batches * batch_size * seq_length),
        steps=steps,
        compile_s=compile_s,
        step_time_s=step_time,
        step_time_min_s=min(times),
        tokens_per_s=statistics.mean(real_tokens) / step_time,
        model_flops_per_token=flops,
        achieved_flops_per_s=achieved,
        **peak,
        mfu=achieved / peak["peak"],
        peak_memory_bytes=peak_memory_bytes(device),
        kernels=experiment.model.kernels.name,
        cudnn_attention=cudnn_attention,
        keep_freed_host_memory=cpu_host_memory.in_effect(),
    )


# Model Garden's side of the comparison is a script of the repository, not of the package: it
# may not import mlm, and it runs in a venv of its own (TensorFlow, tf-models-official).
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_GARDEN_SCRIPT = os.path.join("benchmarks", "model_garden_step.py")
# The features Model Garden's MaskedLMTask reads: what `write_model_garden_batches` stores.
MODEL_GARDEN_FEATURES = (
    "input_word_ids",
    "input_mask",
    "input_type_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "masked_lm_weights",
    "next_sentence_labels",
)


def model_garden_script(repository: str | None = None) -> str:
    """Returns the path of Model Garden's step benchmark, `benchmarks/model_garden_step.py`.

    Args:
      repository: the directory holding the `mlm` package and `benchmarks/`; None: REPOSITORY,
        the parent of this package's directory (a clone, or an editable install of one).

    Raises:
      ConfigError: the script is not there (`mlm` installed without its repository).
    """
    path = os.path.join(repository or REPOSITORY, MODEL_GARDEN_SCRIPT)
    if not os.path.isfile(path):
        raise ConfigError(
            f"--model-garden-python: the Model Garden script '{path}' does not exist (mlm is "
            "installed without its repository); run from a clone of the repository, installed "
            "with pip install -e ."
        )
    return path


def write_model_garden_batches(path: str, batches: Sequence[dict[str, np.ndarray]]) -> None:
    """Writes batches for the Model Garden script's `--batches FILE`.

    Args:
      path: the `.npz` file to write.
      batches: batches in the contract's format (`synthetic_batches`); the features Model
        Garden reads (MODEL_GARDEN_FEATURES) are stored, each stacked over the batches.
    """
    arrays = {name: np.stack([batch[name] for batch in batches]) for name in MODEL_GARDEN_FEATURES}
    np.savez(path, **arrays)


def model_garden_command(
    python: str,
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    warmup: int,
    batches_path: str,
) -> list[str]:
    """The command that runs `benchmarks/model_garden_step.py` on the config's model.

    Args:
      python: a Python with tf-models-official installed (its own venv).
      config: the validated config; model dimensions, dropout, the next-sentence head and the
        seed are passed.
      steps, warmup: as for `bench_step`.
      batches_path: the batches (`write_model_garden_batches`); their shapes are the step's.

    Returns:
      The argv list.

    Raises:
      ConfigError: the script is missing (`model_garden_script`).
    """
    model = config.model
    values = dict(
        batches=batches_path,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        intermediate_size=model.intermediate_size,
        steps=steps,
        warmup=warmup,
        seed=config.train.seed,
        next_sentence=int(config.data.use_next_sentence_label),
        dropout_rate=model.dropout_rate,
        attention_dropout_rate=model.attention_dropout_rate,
    )
    script = model_garden_script()
    return [python, script, *(f"--{name}={value}" for name, value in values.items())]


def run_model_garden(command: list[str], timeout_s: float = 1800) -> dict[str, Any]:
    """Runs the Model Garden benchmark and returns the JSON object of its last output line.

    Raises:
      ConfigError: the Python cannot be run, or the script fails (the last lines of its
        output are in the message).
    """
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except OSError as error:
        raise ConfigError(
            f"--model-garden-python: cannot run '{command[0]}' ({error.strerror}); pass a Python "
            "with tf-models-official installed"
        ) from None
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise ConfigError(
            f"--model-garden-python: the Model Garden benchmark failed (exit "
            f"{result.returncode}: {tail[-400:]}); install tf-models-official==2.20.0 in that "
            "Python's venv"
        )
    return json.loads(lines[-1])


def bench_step_with_reference(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    warmup: int,
    eval_step: bool,
    real_fraction: float,
    model_garden_python: str | None,
) -> dict[str, Any]:
    """`bench_step`, plus Model Garden's train step timed between its two halves.

    Model Garden's script reads the very batches ours is timed on (`synthetic_batches`, written
    to a temporary `.npz`).

    Args:
      config: the benchmark config.
      steps, warmup, eval_step, real_fraction: as for `bench_step`.
      model_garden_python: a Python with tf-models-official, or None for ours alone.

    Returns:
      The `bench_step` record; with Model Garden also `model_garden` (its record),
      `model_garden_tokens_per_s` and `speedup` (our tokens/s over Model Garden's).
    """
    config = config_lib.validate(copy.deepcopy(config))
    if model_garden_python is None:
        return bench_step(
            config, steps=steps, warmup=warmup, eval_step=eval_step, real_fraction=real_fraction
        )
    if eval_step:
        raise ConfigError("--model-garden-python compares train steps; drop --eval")
    reference: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mlm_bench_model_garden_") as scratch:
        batches_path = os.path.join(scratch, "batches.npz")
        command = model_garden_command(
            model_garden_python, config, steps=steps, warmup=warmup, batches_path=batches_path
        )
        write_model_garden_batches(
            batches_path, synthetic_batches(config, real_fraction, NUM_BATCHES)
        )
        record = bench_step(
            config,
            steps=steps,
            warmup=warmup,
            real_fraction=real_fraction,
            num_batches=NUM_BATCHES,
            interleave=lambda: reference.update(run_model_garden(command)),
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
