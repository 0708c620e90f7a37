"""Differentially private SGD: per-row gradient clipping, Gaussian noise and the privacy accountant.

DP-SGD (Abadi et al. 2016) as the train step runs it: every row of the global batch gets its own
gradient (`jax.vmap`), each is clipped to an L2 norm of at most `privacy.l2_clip`
(`optax.per_example_global_norm_clip`), the clipped gradients are summed (over micro-batches too),
Gaussian noise of standard deviation `noise_multiplier * l2_clip` is added once per global step
from a key every device shares, and the result is divided by the number of rows.

An "example" is one model row (`data.seq_length` tokens, possibly several packed chunks). The
accountant (`dp_accounting`, RDP) treats each step as a Poisson-sampled Gaussian mechanism with
sampling rate q = global_batch_size / privacy.num_examples, as most DP-SGD code does; the input
pipeline draws fixed-size shuffled batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mlm.errors import ConfigError

# Stream of `fold_in(step_rng, .)` reserved for the DP noise; dropout uses the step key itself
# and `fold_in(step_rng, i)` for row or micro-batch i, which stay far below this.
_NOISE_STREAM = 0x7FFFFFFF

RowLoss = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Any]]


class DpSgd(NamedTuple):
    """The DP-SGD settings a train step needs (from the `privacy` config section).

    Attributes:
      l2_clip: the largest L2 norm one row's gradient may have.
      noise_multiplier: noise standard deviation / l2_clip.
    """

    l2_clip: float
    noise_multiplier: float


def from_config(config: ml_collections.ConfigDict) -> DpSgd | None:
    """The run's DpSgd settings, or None when `privacy.enabled` is off."""
    p = config.privacy
    return DpSgd(float(p.l2_clip), float(p.noise_multiplier)) if p.enabled else None


def clipped_gradient_sum(
    row_loss: RowLoss,
    params: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    row_ids: jax.Array,
    l2_clip: float | jax.Array,
) -> tuple[Any, Any, jax.Array]:
    """Per-row gradients, each clipped to `l2_clip`, summed over the rows of `batch`.

    Args:
      row_loss: (params, one row without a batch axis, dropout key) -> (loss, aux).
      params: model parameters.
      batch: [B, ...] arrays.
      rng: the step's dropout key; row r uses `fold_in(rng, row_ids[r])`.
      row_ids: [B] int32, each row's index in the global batch (so a row's dropout does not
        depend on the device layout or on gradient accumulation).
      l2_clip: the largest L2 norm (over all parameters) one row's gradient may have.

    Returns:
      (aux summed over rows, sum of the clipped gradients, number of rows whose gradient was
      clipped).
    """

    def one_row(row: Mapping[str, jax.Array], row_id: jax.Array):
        return jax.value_and_grad(row_loss, has_aux=True)(
            params, row, jax.random.fold_in(rng, row_id)
        )

    (_, aux), grads = jax.vmap(one_row)(batch, row_ids)
    leaves, treedef = jax.tree.flatten(grads)
    clipped, num_clipped = optax.per_example_global_norm_clip(leaves, l2_clip)
    aux_sum = jax.tree.map(lambda x: jnp.sum(x, axis=0), aux)
    return aux_sum, jax.tree.unflatten(treedef, clipped), num_clipped


def noise_key(step_rng: jax.Array) -> jax.Array:
    """The key of a step's DP noise, derived from the step key (`fold_in(state.rng, step)`).

    Args:
      step_rng: the step key; it is replicated, so every device draws the same noise.

    Returns:
      A raw PRNG key.
    """
    return jax.random.fold_in(step_rng, _NOISE_STREAM)


def add_noise(grad_sum: Any, key: jax.Array, stddev: float) -> Any:
    """Adds independent N(0, stddev^2) noise to every element of a gradient pytree.

    Args:
      grad_sum: the summed clipped gradients.
      key: from `noise_key`.
      stddev: `noise_multiplier * l2_clip`.

    Returns:
      The noisy sum, same structure and dtypes.
    """
    leaves, treedef = jax.tree.flatten(grad_sum)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        leaf + stddev * jax.random.normal(k, leaf.shape, jnp.float32).astype(leaf.dtype)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def sampling_rate(config: ml_collections.ConfigDict) -> float:
    """q = train.global_batch_size / privacy.num_examples (validated config)."""
    return config.train.global_batch_size / config.privacy.num_examples


def require_accountant(config: ml_collections.ConfigDict) -> None:
    """Checks, before a private run starts, that the accountant reporting epsilon is installed.

    Raises:
      ConfigError: `privacy.enabled` without the `privacy` extra (dp-accounting).
    """
    if not config.privacy.enabled:
        return
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise ConfigError(
            "privacy.enabled needs dp-accounting (the RDP accountant that reports epsilon); "
            "install the privacy extra: pip install -e '.[privacy]'"
        ) from None


@functools.lru_cache(maxsize=4096)
def epsilon(q: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """The privacy spent: epsilon at `delta` after `steps` Poisson-sampled Gaussian steps.

    Computed with dp_accounting's RDP accountant (its default orders and its epsilon
    conversion); cached, so logging it every interval costs one accountant call per step count.

    Args:
      q: sampling rate (rows per step / rows in the data set), in (0, 1].
      noise_multiplier: noise standard deviation / clipping norm.
      steps: DP-SGD steps taken.
      delta: the target delta.

    Returns:
      epsilon (0.0 for zero steps).
    """
    import dp_accounting  # Imported only by private runs (it pulls in scipy / mpmath).

    if steps <= 0:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def epsilon_for_config(config: ml_collections.ConfigDict, steps: int) -> float:
    """`epsilon` for a run's `privacy` section and sampling rate after `steps` steps."""
    p = config.privacy
    return epsilon(sampling_rate(config), p.noise_multiplier, int(steps), p.delta)
