"""Ahead-of-time compilation for a TPU slice on a CPU host: will this config fit, and how fast?

Compiles the train step and the eval step that `mlm.train` would run (the same `Experiment`:
shardings, kernels and donation) for the compile-only devices of a named TPU topology, with
the real TPU compiler (`jax[tpu]`: `pip install -e '.[tpu]'`), on a machine with no TPU. It
reports each chip's HBM as the compiler assigned it, whether that fits, and the step's FLOPs
as XLA counts them next to the model-FLOP formula of `mlm.bench`.

Run:
  python -m mlm.aot --config configs/bert_base.py --topology v5e-8 [--config.x=y ...]

Progress goes to stderr; the last line of stdout is one JSON object. A config that does not fit
exits with status 1 and a line saying by how much and what to try.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections

from mlm import config as config_lib
from mlm import config_file as config_file_lib
from mlm import heads, parallel, task
from mlm.errors import ConfigError
from mlm.experiment import Experiment
from mlm.step_bench import model_flops_per_token

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What a TPU generation's public slice names mean.

    Attributes:
      topology_prefix: the generation in libtpu's topology names ('v5e' in 'v5e:2x4').
      counts_cores: the slice name counts TensorCores, two per (megacore) chip: v4-8 is 4 chips.
      dims: 3 for the 3D torus generations (v4, v5p), 2 for v5e / v6e.
      chips_per_host: chips on one host of a multi-host slice.
      single_host_chips: the most chips a slice can have on one host.
      hbm_capacity_bytes: HBM per chip that the TPU compiler reports available (libtpu 0.0.42:
        the figure in its out-of-memory message), a little under the data sheet's.
    """

    topology_prefix: str
    counts_cores: bool
    dims: int
    chips_per_host: int
    single_host_chips: int
    hbm_capacity_bytes: int


GENERATIONS = {
    "v4": TpuGeneration("v4", True, 3, 4, 4, int(30.75 * GIB)),
    "v5p": TpuGeneration("v5", True, 3, 4, 4, int(95.74 * GIB)),
    "v5e": TpuGeneration("v5e", False, 2, 4, 8, int(15.75 * GIB)),
    "v6e": TpuGeneration("v6e", False, 2, 4, 8, int(31.25 * GIB)),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named TPU slice resolved for `jax.experimental.topologies.get_topology_desc`.

    Attributes:
      name: the public name, e.g. 'v5e-8'.
      generation: the TpuGeneration.
      chips: TPU chips (one JAX device each).
      shape: the chip grid, e.g. (2, 4) or (2, 2, 4).
      chips_per_host_bounds: the chip grid of one host.
    """

    name: str
    generation: TpuGeneration
    chips: int
    shape: tuple[int, ...]
    chips_per_host_bounds: tuple[int, int, int]

    @property
    def topology_name(self) -> str:
        """libtpu's name, e.g. 'v5e:2x4'."""
        return f"{self.generation.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def hosts(self) -> int:
        """The hosts of the slice."""
        return self.chips // math.prod(self.chips_per_host_bounds)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The most even power-of-two grid of `chips` in `dims` dimensions: 2x4, 2x2x1, 2x2x4."""
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        shape[shape.index(min(shape))] *= 2
    return tuple(sorted(shape, key=lambda size: (size == 1, size)))


def parse_topology(name: str) -> Topology:
    """Resolves a public TPU slice name ('v4-8', 'v5e-16', 'v5p-8', 'v6e-8', ...).

    v4 and v5p names count TensorCores (two per chip), v5e and v6e names count chips.

    Args:
      name: the slice name.

    Returns:
      The Topology.

    Raises:
      ConfigError: an unknown generation or a size that is not a power of two.
    """
    match = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", name.strip().lower())
    if not match or match.group(1) not in GENERATIONS:
        raise ConfigError(
            f"--topology '{name}' is not a TPU slice name; use GENERATION-SIZE with generation "
            f"{', '.join(GENERATIONS)}, e.g. v5e-8, v4-8, v5p-8, v6e-16"
        )
    generation = GENERATIONS[match.group(1)]
    size = int(match.group(2))
    chips = size // 2 if generation.counts_cores else size
    if chips < 1 or chips & (chips - 1) or (generation.counts_cores and size % 2):
        unit = "TensorCores (2 per chip)" if generation.counts_cores else "chips"
        raise ConfigError(
            f"--topology '{name}': the size counts {unit} and must give a power-of-two number "
            f"of chips, e.g. {match.group(1)}-8"
        )
    shape = _grid(chips, generation.dims)
    if chips <= generation.single_host_chips:
        per_host = (*shape, 1, 1)[:3] if generation.dims == 2 else shape
    else:
        per_host = (2, 2, 1)
    return Topology(name.lower(), generation, chips, shape, tuple(per_host))


def topology_devices(topology: Topology) -> list[jax.Device]:
    """The compile-only TPU devices of a slice, on any host (needs libtpu: the `tpu` extra).

    Raises:
      ConfigError: libtpu is not installed.
    """
    from jax.experimental import topologies

    # libtpu lets one process at a time load it unless told otherwise; compiling touches no TPU,
    # so several compilations (or a compilation beside training on a TPU VM) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs: dict[str, Any] = dict(chips_per_host_bounds=topology.chips_per_host_bounds)
    if topology.generation.counts_cores:
        kwargs["chip_config_name"] = "megacore"  # One JAX device per chip, as on a real slice.
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.topology_name, **kwargs
        )
    except (RuntimeError, ValueError, ImportError) as error:
        if "tpu" in str(error).lower():  # libtpu missing or refusing to load
            raise ConfigError(
                f"cannot load the TPU compiler ({' '.join(str(error).split())[:160]}); install "
                "the tpu extra: pip install -e '.[tpu]'"
            ) from None
        raise
    return list(description.devices)


def abstract_batch(
    config: ml_collections.ConfigDict, sharding: jax.sharding.NamedSharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the train and eval steps take, as sharded ShapeDtypeStructs."""
    example = task.dummy_batch(
        config.train.global_batch_size,
        config.data.seq_length,
        config.data.max_predictions_per_seq,
        heads.record_labels(config.model.cls_heads),
    )
    return {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
        for name, value in example.items()
    }


def hbm_bytes_from_dump(dump_dir: str) -> int:
    """The per-chip HBM total of a compiled module, from XLA's memory-usage report.

    `compiled.memory_analysis()` reports no temporaries for TPU; the buffer assignment's report
    (`*memory-usage-report.txt`, written with `xla_dump_to`) starts each memory space with
    `Total bytes: N`: arguments, outputs and temporaries of one chip. The default space (HBM,
    color 0) is summed.

    Args:
      dump_dir: the `xla_dump_to` directory of one compilation.

    Returns:
      Bytes of HBM per chip.

    Raises:
      RuntimeError: no report was written.
    """
    reports = sorted(glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt")))
    if not reports:
        raise RuntimeError(f"XLA wrote no memory-usage report in {dump_dir}")
    with open(reports[-1]) as file:
        text = file.read()
    sections = re.split(r"^Memory Space: ", text, flags=re.MULTILINE)[1:] or [text]
    for section in sections:
        if section.startswith("default") or "color=0" in section.splitlines()[0]:
            return int(re.search(r"Total bytes: (\d+)", section).group(1))
    return int(re.search(r"Total bytes: (\d+)", text).group(1))


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(error: Exception) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from the TPU compiler's out-of-memory error, or None."""
    text = " ".join(str(error).split())
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    sizes = re.findall(r"\(([\d.]+)([KMGT])\)", text)
    if len(sizes) < 2:
        return None
    needed, available = (int(float(value) * _UNITS[unit]) for value, unit in sizes[:2])
    return needed, available


def _cost(compiled: Any, key: str) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get(key, 0.0))


def compile_step(lowered: Any) -> dict[str, Any]:
    """Compiles a lowered step and measures it.

    Args:
      lowered: `jax.jit(...).lower(...)` of the step.

    Returns:
      `compile_s`, `hbm_bytes_per_chip` and `xla_flops_per_chip`; or, where the compiler ran
      out of HBM, `compile_s`, `hbm_bytes_per_chip` (the compiler's figure for what it needed)
      and `out_of_memory: True`.
    """
    with tempfile.TemporaryDirectory(prefix="mlm_aot_") as dump_dir:
        start = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump_dir})
        except Exception as error:  # noqa: BLE001 (the runtime raises XlaRuntimeError)
            oom = out_of_memory(error)
            if oom is None:
                raise
            return dict(
                compile_s=time.perf_counter() - start,
                hbm_bytes_per_chip=oom[0],
                out_of_memory=True,
            )
        compile_s = time.perf_counter() - start
        return dict(
            compile_s=compile_s,
            hbm_bytes_per_chip=hbm_bytes_from_dump(dump_dir),
            xla_flops_per_chip=_cost(compiled, "flops"),
        )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_for_topology(config: ml_collections.ConfigDict, topology_name: str) -> dict[str, Any]:
    """Compiles the config's train and eval steps for a TPU slice and reports the figures.

    Args:
      config: a config from `configs/` (validated here); its mesh is laid over the slice's chips.
      topology_name: a public slice name ('v5e-8', 'v4-32', ...).

    Returns:
      The JSON record: `topology`, `device_kind`, `chips`, `hosts`, `mesh`, `kernels`, `dtype`,
      `remat`, `grad_accum_steps`, `global_batch_size`, `seq_length`, `hbm_bytes_per_chip`
      (train step), `hbm_capacity_bytes`, `fits` (train and eval steps), `compile_s`,
      `xla_flops_per_chip` and `model_flops_per_chip` (train step, per step and chip),
      `flops_ratio` (XLA / model), and `eval_hbm_bytes_per_chip`, `eval_compile_s`,
      `eval_xla_flops_per_chip`, `eval_model_flops_per_chip`.
    """
    config = config_lib.validate(config)
    topology = parse_topology(topology_name)
    devices = topology_devices(topology)
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    parallel.check_batch_size(
        config.train.global_batch_size, config.optimizer.grad_accum_steps, mesh
    )
    experiment = Experiment.build(config, mesh)
    state = experiment.restore_target()
    batch = abstract_batch(config, experiment.batch_sharding)
    data = config.data
    tokens = config.train.global_batch_size * data.seq_length
    capacity = topology.generation.hbm_capacity_bytes
    _progress(
        f"{topology.name}: {topology.chips} x {devices[0].device_kind} on {topology.hosts} "
        f"host(s), mesh {dict(mesh.shape)}, {experiment.model.kernels.name} kernels; compiling the "
        "train step (minutes for large models)..."
    )
    train = compile_step(experiment.train_step.lower(state, batch))
    _progress(_summary("train", train, capacity))
    _progress("compiling the eval step...")
    evaluation = compile_step(experiment.eval_step.lower(state.params, batch))
    _progress(_summary("eval", evaluation, capacity))

    def model_flops(train_step: bool) -> float:
        per_token = model_flops_per_token(
            config.model,
            data.seq_length,
            data.max_predictions_per_seq,
            data.use_next_sentence_label,
            train=train_step,
        )
        return per_token * tokens / topology.chips

    record = dict(
        topology=topology.name,
        device_kind=devices[0].device_kind,
        chips=topology.chips,
        hosts=topology.hosts,
        mesh=dict(mesh.shape),
        kernels=experiment.model.kernels.name,
        dtype=config.model.dtype,
        remat=config.model.remat,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        global_batch_size=config.train.global_batch_size,
        seq_length=data.seq_length,
        hbm_bytes_per_chip=train["hbm_bytes_per_chip"],
        hbm_capacity_bytes=capacity,
        fits=all(
            not step.get("out_of_memory") and step["hbm_bytes_per_chip"] <= capacity
            for step in (train, evaluation)
        ),
        compile_s=train["compile_s"],
        xla_flops_per_chip=train.get("xla_flops_per_chip"),
        model_flops_per_chip=model_flops(True),
        eval_hbm_bytes_per_chip=evaluation["hbm_bytes_per_chip"],
        eval_compile_s=evaluation["compile_s"],
        eval_xla_flops_per_chip=evaluation.get("xla_flops_per_chip"),
        eval_model_flops_per_chip=model_flops(False),
    )
    if record["xla_flops_per_chip"]:
        record["flops_ratio"] = record["xla_flops_per_chip"] / record["model_flops_per_chip"]
    return record


def _summary(name: str, step: dict[str, Any], capacity: int) -> str:
    if step.get("out_of_memory"):
        return (
            f"{name} step: out of HBM: the compiler needs {step['hbm_bytes_per_chip'] / GIB:.2f}"
            f" GiB per chip, {capacity / GIB:.2f} GiB available"
        )
    return (
        f"{name} step: compiled in {step['compile_s']:.1f} s, "
        f"{step['hbm_bytes_per_chip'] / GIB:.2f} GiB of {capacity / GIB:.2f} GiB HBM per chip, "
        f"{step['xla_flops_per_chip'] / 1e12:.3f} TFLOP per chip"
    )


def advice(record: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The one-line message for a config that does not fit: by how much, and what to try."""
    needed = max(record["hbm_bytes_per_chip"], record["eval_hbm_bytes_per_chip"])
    over = needed - record["hbm_capacity_bytes"]
    tries = []
    if record["mesh"]["fsdp"] < record["chips"]:
        tries.append(f"--config.mesh.fsdp={record['chips']} (shard the state over the chips)")
    accum = config.optimizer.grad_accum_steps
    if config.train.global_batch_size % (2 * accum * record["chips"]) == 0:
        tries.append(f"--config.optimizer.grad_accum_steps={2 * accum} (half the activations)")
    if config.model.remat == "none":
        tries.append("--config.model.remat=full (recompute activations)")
    if not tries:
        tries.append("a smaller train.global_batch_size or a topology with more chips or HBM")
    return (
        f"{record['topology']}: the step needs {needed / GIB:.2f} GiB of HBM per chip but a "
        f"{record['device_kind']} chip has {record['hbm_capacity_bytes'] / GIB:.2f} GiB "
        f"({over / GIB:.2f} GiB over); try {', or '.join(tries)}"
    )


def run() -> None:
    """The command line: compiles, prints the JSON line; exit 1 when it does not fit."""
    from absl import flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    topology_flag = flags.DEFINE_string(
        "topology", None, "TPU slice: v4-8, v4-32, v5e-8, v5e-16, v5p-8, v6e-8, ..."
    )
    flags.mark_flags_as_required(["config", "topology"])

    def main(argv: list[str]) -> None:
        del argv
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        # Compile-only TPU devices come from libtpu directly; computation stays on the CPU.
        jax.config.update("jax_platforms", "cpu")
        # Executables for compile-only devices cannot be loaded back from JAX's persistent
        # compilation cache (JAX_COMPILATION_CACHE_DIR): each read would warn and recompile, and
        # each write would store megabytes that no run can use. A cache hit would also skip the
        # compilation whose memory report gives the HBM figure.
        jax.config.update("jax_enable_compilation_cache", False)
        config = config_flag.value
        record = compile_for_topology(config, topology_flag.value)
        print(json.dumps(record), flush=True)
        if not record["fits"]:
            print(f"error: {advice(record, config)}", file=sys.stderr)
            sys.exit(1)

    config_file_lib.run_with_config(main)


if __name__ == "__main__":
    run()
