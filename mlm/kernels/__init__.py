"""Backend-specific kernels, chosen in one place.

The model asks a `KernelSet` for its Dense product, vocab projection and bias, dropout and
attention; it never branches on the backend itself. Two sets compute the same function:

- `cpu` (`mlm.kernels.cpu`, `cpu_dropout`): custom-VJP products whose gradients XLA:CPU runs
  without large transposes, a dropout that takes four 16-bit draws from one unrolled threefry
  hash, and attention with the heads moved in front of the sequence axis. Measured on CPU only
  (docs/performance.md), so used only there.
- `standard` (`mlm.kernels.standard`): flax's Dense, `flax.linen.Dropout`, and
  `jax.nn.dot_product_attention` (cuDNN's fused attention on GPU for 16-bit inputs, XLA's
  otherwise); with attention dropout, XLA softmax attention with a `jax.random` dropout mask
  (`standard.dropout_attention`).

`model.kernels` picks the set: `auto` (the default) decides from the platform of the devices the
step is compiled for (the mesh's, not `jax.default_backend()`, so a CPU host compiling for a TPU
slice gets the TPU choice); `cpu` or `standard` force one. Both sets hold the same parameters,
so a checkpoint trained with one loads with the other; with dropout off they give equal losses
up to float32 rounding, and dropout draws differ between them (both are exact in expectation).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm.config import KERNEL_SETTINGS as SETTINGS  # 'auto' and the sets
from mlm.kernels import cpu, cpu_dropout, cpu_host_memory, standard

KERNEL_SETS = SETTINGS[1:]


def select_name(setting: str, platform: str) -> str:
    """Resolves a `model.kernels` setting for a platform.

    Args:
      setting: 'auto', 'cpu' or 'standard'.
      platform: the platform of the devices the step is compiled for ('cpu', 'gpu', 'tpu').

    Returns:
      'cpu' or 'standard'.
    """
    if setting not in SETTINGS:
        raise ValueError(f"model.kernels must be one of {', '.join(SETTINGS)}, got '{setting}'")
    if setting == "auto":
        return "cpu" if platform == "cpu" else "standard"
    return setting


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
    """The platform of a mesh's devices ('cpu', 'gpu', 'tpu')."""
    return mesh.devices.flat[0].platform


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """The kernels of one set, for the platform the step is compiled for.

    Attributes:
      name: 'cpu' or 'standard'.
      platform: the devices' platform; decides cuDNN attention (GPU) and float16 attention's
        float32 fallback (CPU, whose XLA has no float16 x float16 -> float32 product).
    """

    name: str = "standard"
    platform: str = "cpu"

    def __post_init__(self) -> None:
        if self.name not in KERNEL_SETS:
            raise ValueError(f"kernel set must be one of {', '.join(KERNEL_SETS)}: {self.name}")

    @property
    def dot_general(self):
        """The `dot_general` of the Dense layers (a `jax.lax.dot_general` signature)."""
        return cpu.kernel_dot_general if self.name == "cpu" else jax.lax.dot_general

    def vocab_logits(self, x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
        """float32 [M, V] logits of x [M, E] against the tied table [V, E] (E: embedding width)."""
        if self.name == "cpu":
            return cpu.tied_vocab_logits(x, word_embeddings)
        return standard.vocab_logits(x, word_embeddings)

    def add_vocab_bias(self, logits: jax.Array, bias: jax.Array) -> jax.Array:
        """logits [..., V] + bias [V]."""
        return cpu.add_vocab_bias(logits, bias) if self.name == "cpu" else logits + bias

    def dropout(self, rate: float, name: str | None = None, **kwargs) -> nn.Module:
        """A dropout layer (`flax.linen.Dropout`'s interface) of this set.

        Args:
          rate: the drop probability.
          name: the submodule's name (None: flax's automatic name).
          **kwargs: `deterministic`.

        Returns:
          `cpu_dropout.Dropout` (cpu) or `flax.linen.Dropout` (standard); neither has params.
        """
        layer = cpu_dropout.Dropout if self.name == "cpu" else nn.Dropout
        return layer(rate, name=name, **kwargs)

    def attention(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array,
        *,
        dropout_rate: float = 0.0,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Softmax attention with optional dropout on the probabilities.

        Args:
          query, key, value: [B, T, N, D] in the compute dtype.
          mask: bool, broadcastable to [B, N, T, T].
          dropout_rate: dropout on the attention probabilities (with `dropout_rng`).
          dropout_rng: PRNG key; None: no dropout.

        Returns:
          [B, T, N, D] in the input dtype.
        """
        dtype = query.dtype
        if dtype == jnp.float16 and self.platform == "cpu":
            query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
        if dropout_rng is not None and dropout_rate > 0:
            attend = cpu.dropout_attention if self.name == "cpu" else standard.dropout_attention
            out = attend(
                query, key, value, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng
            )
        else:
            implementation = standard.attention_implementation(self.platform, query.dtype)
            out = standard.fused_attention(query, key, value, mask, implementation)
        return out.astype(dtype)


def select(setting: str, platform: str) -> KernelSet:
    """The kernel set for a `model.kernels` setting and the step's platform.

    Args:
      setting: 'auto', 'cpu' or 'standard'.
      platform: the platform of the devices the step is compiled for.

    Returns:
      The KernelSet.
    """
    return KernelSet(select_name(setting, platform), platform)


def tune_host(platform: str) -> bool:
    """Applies the host settings measured for a platform: glibc malloc reuse on CPU only.

    For the command-line entry points; a library caller's process is left as it is. See
    `cpu_host_memory`.

    Args:
      platform: the platform the run computes on.

    Returns:
      True if host settings are in effect in this process.
    """
    if platform != "cpu":
        return False
    return cpu_host_memory.keep_freed_host_memory()


def _tpu_chips_visible() -> bool:
    """Whether this host has TPU chips (JAX's own PCI check; True if it cannot be asked)."""
    try:
        from jax._src import hardware_utils  # JAX's check, as its TPU initialisation uses it.

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        return True


def skip_absent_tpu() -> bool:
    """Keeps JAX from starting a TPU runtime on a host that has no TPU.

    With the `tpu` extra (libtpu) installed on a machine without TPU chips, JAX tries the TPU
    backend first, and libtpu prints several lines of errors before JAX falls back to the CPU.
    Where libtpu is installed but no TPU chip and no GPU plugin is present, this sets
    `jax_platforms` to 'cpu', the backend JAX would have chosen anyway. Compile-only TPU devices
    (`mlm.aot`) load libtpu by themselves and still work. The command-line entry points call it
    before JAX starts; a `JAX_PLATFORMS` the user set is left as it is.

    Returns:
      True if `jax_platforms` was set.
    """
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return False
    if importlib.util.find_spec("libtpu") is None:
        return False
    if importlib.util.find_spec("jax_plugins") is not None:  # A GPU plugin (CUDA / ROCm).
        return False
    if _tpu_chips_visible():
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
