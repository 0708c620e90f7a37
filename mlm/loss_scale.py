"""Loss scaling for float16 compute (`model.dtype=float16`): dynamic, or a fixed scale.

float16 gradients underflow below ~6e-8; the train step multiplies the loss by `scale` before
differentiating and divides the gradients by it after. Dynamic (`optimizer.loss_scale=0`): a
step whose gradients are not finite (an overflow) is skipped and halves the scale; after
`growth_steps` finite steps in a row the scale doubles. Fixed (`optimizer.loss_scale` > 0, Model
Garden's float `runtime.loss_scale`): the scale never changes, and a non-finite step is left to
the divergence guard (`optax.apply_if_finite`), which skips and counts it. bfloat16 and float32
have float32's exponent range and need none of this.
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
# `growth_steps` of a fixed scale: `adjust` keeps it and `overflow` is never True.
FIXED = 0


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


def initial_scale(optimizer: Any) -> float:
    """The scale a float16 run starts at: `loss_scale` if fixed, else `loss_scale_init`.

    Args:
      optimizer: the `optimizer` config section.
    """
    return optimizer.loss_scale if optimizer.loss_scale > 0 else optimizer.loss_scale_init


def growth_steps(optimizer: Any) -> int:
    """`adjust`'s `growth_steps` for the `optimizer` config section: FIXED for a fixed scale."""
    return FIXED if optimizer.loss_scale > 0 else optimizer.loss_scale_growth_steps


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array of `tree` is finite (a bool scalar)."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def overflow(scale: jax.Array, finite: jax.Array, growth_steps: int) -> jax.Array:
    """Whether a step is skipped as an expected loss-scale overflow (not counted as divergence).

    Args:
      scale: the scale the step used.
      finite: whether the step's gradients were finite.
      growth_steps: as for `adjust` (FIXED: a fixed scale, whose overflows are divergences).

    Returns:
      A bool scalar: non-finite gradients at a dynamic scale above MIN_SCALE.
    """
    if growth_steps == FIXED:
        return jnp.asarray(False)
    return ~finite & (scale > MIN_SCALE)


def adjust(state: LossScale, finite: jax.Array, growth_steps: int) -> LossScale:
    """The next loss-scale state after a step.

    Args:
      state: the current state.
      finite: whether the step's gradients were finite.
      growth_steps: finite steps in a row after which the scale doubles; FIXED: never change.

    Returns:
      Halved (not below MIN_SCALE) with the counter reset on a non-finite step; doubled (not
      above MAX_SCALE) with the counter reset after `growth_steps` finite steps; otherwise the
      counter advanced. With FIXED, `state` itself.
    """
    if growth_steps == FIXED:
        return state
    grow = finite & (state.good_steps + 1 >= growth_steps)
    scale = jnp.where(
        finite,
        jnp.where(grow, jnp.minimum(state.scale * 2.0, MAX_SCALE), state.scale),
        jnp.maximum(state.scale / 2.0, MIN_SCALE),
    )
    good_steps = jnp.where(finite & ~grow, state.good_steps + 1, 0)
    return LossScale(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))
