"""Dropout that draws half the random words of flax's: each 32-bit word gives two 16-bit draws.

`flax.linen.Dropout` draws one float32 uniform (one threefry word) per element. Here one 32-bit
word is split into two 16-bit integers and an element is dropped when its integer is below
`round(rate * 2**16)`: the drop probability is the rate rounded to a multiple of 2**-16
(0.1 -> 0.100006) and kept elements are scaled by the exact inverse keep probability, so the
expectation is preserved exactly. On the 2-core benchmark CPU the mask for a [32, 4, 128, 128]
attention tensor took 3.9 ms against 6.8 ms for flax's (README 'Performance').
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

RESOLUTION = 2**16  # Draws per 32-bit word: 2, of 16 bits each.


def drop_threshold(rate: float) -> int:
    """The 16-bit threshold below which an element is dropped: round(rate * 2**16)."""
    return min(RESOLUTION, max(0, round(rate * RESOLUTION)))


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean keep mask: each element is kept with probability 1 - drop_threshold(rate) / 2**16.

    Args:
      rng: PRNG key.
      rate: drop probability, in [0, 1].
      shape: the mask's shape (at least one dimension).

    Returns:
      bool array of `shape`.
    """
    last = shape[-1]
    words = jax.random.bits(rng, (*shape[:-1], (last + 1) // 2), jnp.uint32)
    draws = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :last]
    return draws >= drop_threshold(rate)


def dropout(inputs: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Zeroes elements with probability ~`rate` (see `keep_mask`) and rescales the rest.

    Args:
      inputs: any array with at least one dimension.
      rate: drop probability, in [0, 1].
      rng: PRNG key.

    Returns:
      An array like `inputs`: 0 where dropped, inputs / keep probability elsewhere.
    """
    threshold = drop_threshold(rate)
    if threshold == 0:
        return inputs
    if threshold == RESOLUTION:
        return jnp.zeros_like(inputs)  # No division by a zero keep probability.
    keep_probability = 1.0 - threshold / RESOLUTION
    mask = keep_mask(rng, rate, inputs.shape)
    return jax.lax.select(mask, inputs / keep_probability, jnp.zeros_like(inputs))


class Dropout(nn.Module):
    """`flax.linen.Dropout` (no broadcast dims) with `keep_mask`'s cheaper random bits."""

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """Args: inputs; deterministic: True returns `inputs` unchanged. Returns: like inputs."""
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return inputs
        return dropout(inputs, self.rate, self.make_rng(self.rng_collection))
