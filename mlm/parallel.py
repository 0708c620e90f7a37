"""Device mesh, shardings and global batch assembly (data parallel over all devices).

This is what `pmap` did, written the way JAX now recommends: one `jax.jit` over a `Mesh`, the
batch sharded along the `data` axis and the train state replicated; XLA inserts the gradient
all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlm.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """Builds a one-axis data-parallel mesh.

    Args:
      devices: the devices to use; default all devices of all processes.

    Returns:
      A Mesh with axis `data` over the devices.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Returns the sharding of batch arrays: leading (example) axis split over `data`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Returns the sharding of a fully replicated array (params, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Raises ConfigError unless each device gets a whole number of examples per micro-batch.

    Args:
      global_batch_size: examples per optimizer step over all devices.
      grad_accum_steps: micro-batches per optimizer step.
      mesh: the device mesh.
    """
    num_devices = mesh.shape[DATA_AXIS]
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
    """Assembles per-process numpy batches into global arrays sharded along `data`.

    Args:
      local_batch: this process's rows of every batch field.
      mesh: the device mesh.

    Returns:
      The batch as global jax Arrays whose leading axis is split over the `data` axis.
    """
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, value)
        for name, value in local_batch.items()
    }
