"""Dynamic loss scaling for float16 compute (`model.dtype=float16`).

float16 gradients underflow below ~6e-8; the train step multiplies the loss by `scale` before
differentiating and divides the gradients by it after. A step whose gradients are not finite
(an overflow) is skipped and halves the scale; after `growth_steps` finite steps in a row the
scale doubles. bfloat16 and float32 have float32's exponent range and need none of this.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

# The scale never drops below this: at the minimum a non-finite step is a real divergence.
MIN_SCALE = 1.0
# Nor grows above this (float32 would overflow after 128 doublings).
MAX_SCALE = 2.0**24


@flax.struct.dataclass
class LossScale:
    """The state of dynamic loss scaling (part of TaskState).

    Attributes:
      scale: float32 scalar the loss is multiplied by.
      good_steps: int32 scalar, finite steps since the scale last changed.
    """

    scale: jax.Array
    good_steps: jax.Array


def initial(scale: float) -> LossScale:
    """Returns the loss-scale state at the start of a run.

    Args:
      scale: `optimizer.loss_scale_init`.

    Returns:
      A LossScale with no finite steps counted yet.
    """
    return LossScale(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32))


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array of `tree` is finite (a bool scalar)."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def adjust(state: LossScale, finite: jax.Array, growth_steps: int) -> LossScale:
    """The next loss-scale state after a step.

    Args:
      state: the current state.
      finite: whether the step's gradients were finite.
      growth_steps: finite steps in a row after which the scale doubles.

    Returns:
      Halved (not below MIN_SCALE) with the counter reset on a non-finite step; doubled (not
      above MAX_SCALE) with the counter reset after `growth_steps` finite steps; otherwise the
      counter advanced.
    """
    grow = finite & (state.good_steps + 1 >= growth_steps)
    scale = jnp.where(
        finite,
        jnp.where(grow, jnp.minimum(state.scale * 2.0, MAX_SCALE), state.scale),
        jnp.maximum(state.scale / 2.0, MIN_SCALE),
    )
    good_steps = jnp.where(finite & ~grow, state.good_steps + 1, 0)
    return LossScale(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))
