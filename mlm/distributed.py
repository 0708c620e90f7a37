"""Multi-host start-up: `jax.distributed.initialize` from the environment a launcher sets.

`initialize_from_environment()` must run once, before any other JAX call touches a device. It
reads the environment (`detect_setup`, a pure function) and starts JAX's distributed runtime:

- explicit: `MLM_COORDINATOR_ADDRESS` (host:port), `MLM_NUM_PROCESSES`, `MLM_PROCESS_ID`, as
  `launch/local.sh` sets them; any machine, CPU included (cross-process CPU collectives: gloo).
- slurm: a job step started by `srun` with more than one task (`SLURM_STEP_NUM_TASKS`). The
  values are derived here, not by JAX's own SLURM detection, which would make each process use
  one GPU only (`local_device_ids=[SLURM_LOCALID]`); here a process uses every GPU it sees, so
  `launch/slurm_gpu.sbatch` runs one process per node with all 8 GPUs.
- tpu: a Cloud TPU VM (libtpu and TPU chips present, as JAX detects it at import):
  `jax.distributed.initialize()` with no arguments; JAX reads the slice's workers from the TPU
  metadata server (GCE) or `TPU_WORKER_HOSTNAMES` (GKE). A single-host slice is 1 process.
- single: none of these; nothing is started.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Literal

import jax

from mlm.errors import ConfigError

EXPLICIT_VARIABLES = ("MLM_COORDINATOR_ADDRESS", "MLM_NUM_PROCESSES", "MLM_PROCESS_ID")
# JAX's SLURM convention: a port in [61440, 65535] derived from the job id, unless overridden.
_SLURM_PORT_BASE = 65535 - 2**12 + 1
_PORT_OVERRIDE = "JAX_COORDINATOR_PORT"

How = Literal["single", "explicit", "slurm", "tpu"]


@dataclasses.dataclass(frozen=True)
class DistributedSetup:
    """How this process joins a multi-process run.

    Attributes:
      how: `single`, `explicit` (MLM_* variables), `slurm` or `tpu`.
      coordinator_address: host:port of process 0's coordinator; None for `single` and `tpu`
        (JAX finds it on a TPU slice).
      num_processes: processes in the run; None for `tpu` (known after initialization as
        `jax.process_count()`).
      process_id: this process's index; None for `tpu` (`jax.process_index()` after it).
    """

    how: How
    coordinator_address: str | None = None
    num_processes: int | None = 1
    process_id: int | None = 0


_applied: DistributedSetup | None = None


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """Returns the variable's value, treating unset and empty alike (None)."""
    value = environ.get(name, "").strip()
    return value or None


def _parse_int(environ: Mapping[str, str], name: str, minimum: int, fix: str) -> int:
    """Returns an integer variable, or raises ConfigError naming it.

    Args:
      environ: the environment.
      name: the variable (it must be set).
      minimum: the smallest allowed value.
      fix: what the user should set instead, for the message.

    Returns:
      The value.
    """
    text = environ[name].strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) < minimum:
        raise ConfigError(f"{name}={text!r} is not an integer >= {minimum}; {fix}")
    return int(text)


def check_address(name: str, address: str) -> str:
    """Checks that a coordinator address is `host:port` with a port in 1..65535.

    Args:
      name: the variable the address came from, for the message.
      address: the address (`10.0.0.1:1234`, `node001:1234`, `[::1]:1234`).

    Returns:
      The address, unchanged.
    """
    host, _, port = address.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]+", port) or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"{name}={address!r} is not host:port; set it to process 0's address and a free "
            "port, e.g. 10.0.0.1:12345"
        )
    return address


def explicit_setup(environ: Mapping[str, str]) -> DistributedSetup | None:
    """Reads MLM_COORDINATOR_ADDRESS, MLM_NUM_PROCESSES and MLM_PROCESS_ID (all or none).

    Args:
      environ: the environment.

    Returns:
      The explicit setup, or None when none of the three is set.
    """
    present = [name for name in EXPLICIT_VARIABLES if _get(environ, name)]
    if not present:
        return None
    missing = [name for name in EXPLICIT_VARIABLES if name not in present]
    if missing:
        raise ConfigError(
            f"{missing[0]} is not set but {' and '.join(present)} "
            f"{'is' if len(present) == 1 else 'are'}; set all of "
            f"{', '.join(EXPLICIT_VARIABLES)}, or none"
        )
    address = check_address(EXPLICIT_VARIABLES[0], environ[EXPLICIT_VARIABLES[0]].strip())
    num = _parse_int(environ, "MLM_NUM_PROCESSES", 1, "set it to the number of processes")
    process_id = _parse_int(environ, "MLM_PROCESS_ID", 0, f"set it to 0..{num - 1}")
    if process_id >= num:
        raise ConfigError(
            f"MLM_PROCESS_ID={process_id} is not below MLM_NUM_PROCESSES={num}; set it to "
            f"0..{num - 1}"
        )
    return DistributedSetup("explicit", address, num, process_id)


def first_slurm_host(nodelist: str) -> str:
    """Returns the first host of a SLURM node list.

    Args:
      nodelist: e.g. `node001`, `node[001-016],gpu7`, `rack[1-2]-node[07,09]`.

    Returns:
      The first host: `node001`, `node001`, `rack1-node07`.
    """
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    first = nodelist[:end].strip()
    # Each bracketed range list contributes its first value: `[07,09-12]` -> `07`.
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", first)


def slurm_setup(environ: Mapping[str, str]) -> DistributedSetup | None:
    """Derives the setup of a multi-task SLURM job step from SLURM's variables.

    Args:
      environ: the environment.

    Returns:
      The setup (coordinator on the step's first node), or None outside SLURM or when the job
      has a single task.
    """
    if not _get(environ, "SLURM_JOB_ID"):
        return None
    if not _get(environ, "SLURM_STEP_NUM_TASKS"):
        tasks = _get(environ, "SLURM_NTASKS")
        if tasks and _parse_int(environ, "SLURM_NTASKS", 1, "request --ntasks >= 1") > 1:
            raise ConfigError(
                f"SLURM_NTASKS={tasks} but this process was not started by srun "
                "(SLURM_STEP_NUM_TASKS is unset); run `srun python -m mlm.train ...`"
            )
        return None
    fix = "start each process with srun"
    num = _parse_int(environ, "SLURM_STEP_NUM_TASKS", 1, fix)
    if num == 1:
        return None
    if not _get(environ, "SLURM_PROCID"):
        raise ConfigError(f"SLURM_PROCID is not set in a {num}-task SLURM step; {fix}")
    process_id = _parse_int(environ, "SLURM_PROCID", 0, fix)
    if process_id >= num:
        raise ConfigError(
            f"SLURM_PROCID={process_id} is not below SLURM_STEP_NUM_TASKS={num}; {fix}"
        )
    nodelist = next(
        (
            value
            for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
            if (value := _get(environ, name))
        ),
        None,
    )
    if nodelist is None:
        raise ConfigError(f"SLURM_STEP_NODELIST is not set in a {num}-task SLURM step; {fix}")
    host = first_slurm_host(nodelist)
    if not host:
        raise ConfigError(f"SLURM_STEP_NODELIST={nodelist!r} names no host; {fix}")
    if _get(environ, _PORT_OVERRIDE):
        port = _parse_int(environ, _PORT_OVERRIDE, 1, "set it to a free port")
        check_address(_PORT_OVERRIDE, f"{host}:{port}")
    else:
        job_id = _parse_int(environ, "SLURM_JOB_ID", 0, fix)
        port = job_id % 2**12 + _SLURM_PORT_BASE
    address = f"{host}:{port}"
    return DistributedSetup("slurm", address, num, process_id)


def tpu_slice_present(environ: Mapping[str, str], tpu_vm: bool) -> bool:
    """Tells whether JAX's TPU cluster detection applies (without querying the metadata server).

    Args:
      environ: the environment.
      tpu_vm: whether this is a Cloud TPU VM (libtpu and TPU chips, see `running_on_tpu_vm`).

    Returns:
      True on a GKE TPU pod (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES) or a GCE TPU VM
      (whose metadata JAX reads unless TPU_SKIP_MDS_QUERY is set).
    """
    if not tpu_vm:
        return False
    gke = any(_get(environ, name) for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"))
    return gke or environ.get("TPU_SKIP_MDS_QUERY") is None


def detect_setup(environ: Mapping[str, str], *, tpu_vm: bool = False) -> DistributedSetup:
    """Decides how this process starts, from the environment alone.

    Precedence: explicit MLM_* variables, then a multi-task SLURM step, then a TPU VM.

    Args:
      environ: the environment (os.environ).
      tpu_vm: whether this machine is a Cloud TPU VM.

    Returns:
      The setup.

    Raises:
      ConfigError: a variable is partial or malformed (the message names it).
    """
    setup = explicit_setup(environ) or slurm_setup(environ)
    if setup is not None:
        return setup
    if tpu_slice_present(environ, tpu_vm):
        return DistributedSetup("tpu", None, None, None)
    return DistributedSetup("single")


def running_on_tpu_vm() -> bool:
    """Returns JAX's own verdict, made at import: libtpu installed and TPU chips attached."""
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _use_gloo_on_cpu() -> None:
    """Selects gloo for cross-process CPU collectives unless an implementation is chosen.

    jax 0.10 defaults to gloo already; older versions had none, and then a computation that
    spans the CPU devices of several processes fails.
    """
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize_from_environment(environ: Mapping[str, str] = os.environ) -> DistributedSetup:
    """Starts JAX's distributed runtime as the environment says; call before other JAX use.

    A second call (or a runtime someone else started) is a no-op.

    Args:
      environ: the environment (os.environ).

    Returns:
      The setup that was applied.

    Raises:
      ConfigError: a variable is partial or malformed.
    """
    global _applied
    if _applied is not None:
        return _applied
    setup = detect_setup(environ, tpu_vm=running_on_tpu_vm())
    if setup.how != "single" and not jax.distributed.is_initialized():
        _use_gloo_on_cpu()
        if setup.how == "tpu":
            jax.distributed.initialize()
        else:
            # "deactivate": JAX's own detection would otherwise fill local_device_ids from
            # SLURM_LOCALID (one GPU per process) even with explicit values.
            jax.distributed.initialize(
                coordinator_address=setup.coordinator_address,
                num_processes=setup.num_processes,
                process_id=setup.process_id,
                cluster_detection_method="deactivate",
            )
    _applied = setup
    return setup
