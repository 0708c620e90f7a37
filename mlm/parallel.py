"""Device mesh, state shardings and global batch assembly.

This is what `pmap` did, written the way JAX now recommends: one `jax.jit` over a `Mesh` with a
`data` and an `fsdp` axis. Batches are split over both axes (FSDP is data parallel too); large
parameters and their optimizer state are split along their largest divisible dimension over
`fsdp` (ZeRO-3 style: XLA gathers them for the matmuls and reduce-scatters the gradients), small
ones are replicated. With `fsdp = 1` this is plain data parallelism with a replicated state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlm.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch (example) dimension is split over every axis.
BATCH_AXES = MESH_AXES


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves the configured axis sizes (-1: all remaining devices) for `num_devices`.

    Args:
      mesh_config: the `mesh` config section (`data`, `fsdp`).
      num_devices: the devices of all processes.

    Returns:
      {axis: size} whose product is `num_devices`.

    Raises:
      ConfigError: more than one -1, a size below 1, or sizes that do not use every device.
    """
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(
            f"mesh sizes {sizes} must be positive, with at most one -1 (all remaining "
            "devices); e.g. --config.mesh.data=-1 --config.mesh.fsdp=8"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {sizes}: {num_devices} devices are not divisible by {fixed}; pick sizes "
                f"that divide the device count"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh {sizes} uses {math.prod(sizes.values())} devices but there are "
            f"{num_devices}; set one axis to -1 or make the sizes multiply to {num_devices}"
        )
    return sizes


def make_mesh(
    mesh_config: ml_collections.ConfigDict | None = None,
    devices: list[jax.Device] | None = None,
) -> Mesh:
    """Builds the `data` x `fsdp` mesh.

    Args:
      mesh_config: the `mesh` config section; None: all devices on `data` (fsdp 1).
      devices: the devices to use; default all devices of all processes.

    Returns:
      A Mesh with axes (`data`, `fsdp`), devices laid out by `jax.make_mesh` so that the
      `fsdp` axis (the innermost, with the most traffic) spans nearby devices.
    """
    devices = jax.devices() if devices is None else devices
    if mesh_config is None:
        mesh_config = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    # Auto axes: XLA propagates the shardings set on the step's inputs and outputs.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Returns the sharding of batch arrays: leading (example) axis split over all axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Returns the sharding of a fully replicated array (small params, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def array_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp_min_size: int) -> NamedSharding:
    """Returns the sharding rule for one state array, from its shape.

    Arrays of at least `fsdp_min_size` elements are split over `fsdp` along their largest
    dimension that the axis size divides; smaller ones (biases, LayerNorm scales, scalars) are
    replicated.

    Args:
      shape: the array's shape.
      mesh: the device mesh.
      fsdp_min_size: the smallest array (in elements) worth splitting.

    Returns:
      The array's NamedSharding.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    if fsdp == 1 or math.prod(shape) < fsdp_min_size:
        return replicated_sharding(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated_sharding(mesh)


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int) -> Any:
    """Returns the shardings of every array of a state, given its abstract shapes.

    Args:
      abstract_state: the state's `jax.ShapeDtypeStruct`s (from `jax.eval_shape`).
      mesh: the device mesh.
      fsdp_min_size: the smallest array (in elements) worth splitting over `fsdp`.

    Returns:
      A pytree of NamedShardings with the state's structure.
    """
    return jax.tree.map(
        lambda leaf: array_sharding(leaf.shape, mesh, fsdp_min_size), abstract_state
    )


def state_bytes_per_device(state: Any) -> dict[str, int]:
    """Returns the bytes of a state's arrays held on each addressable device.

    Measured from the arrays' own shards, so it shows what a sharding really costs.

    Args:
      state: a pytree of jax Arrays.

    Returns:
      {device name: bytes}.
    """
    totals: dict[str, int] = {}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            name = str(shard.device)
            totals[name] = totals.get(name, 0) + shard.data.nbytes
    return totals


def check_batch_size(global_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Raises ConfigError unless each device gets a whole number of examples per micro-batch.

    Args:
      global_batch_size: examples per optimizer step over all devices.
      grad_accum_steps: micro-batches per optimizer step.
      mesh: the device mesh.
    """
    num_devices = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if global_batch_size % (num_devices * grad_accum_steps):
        raise ConfigError(
            f"train.global_batch_size ({global_batch_size}) must be divisible by the number of "
            f"devices ({num_devices}) x optimizer.grad_accum_steps ({grad_accum_steps}); "
            "change the batch size or the accumulation steps"
        )


def local_batch_size(global_batch_size: int) -> int:
    """Returns the number of examples this process loads per step."""
    return global_batch_size // jax.process_count()


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global arrays sharded along the batch axes.

    Args:
      local_batch: this process's rows of every batch field.
      mesh: the device mesh.

    Returns:
      The batch as global jax Arrays whose leading axis is split over the mesh.
    """
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, value)
        for name, value in local_batch.items()
    }
