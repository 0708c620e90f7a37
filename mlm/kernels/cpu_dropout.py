"""Dropout with a quarter of flax's random hashing: one threefry call gives four 16-bit draws.

`flax.linen.Dropout` draws one float32 uniform per element, and each costs a whole threefry2x32
hash (jax's partitionable bits hash every element and XOR the two output words). Here each hash
of a counter (the element group's index, so the stream is the same however the array is sharded)
gives two 32-bit words, split into four 16-bit draws; an element is dropped when its draw is below
`round(rate * 2**16)`. The drop probability is the rate rounded to a multiple of 2**-16
(0.1 -> 0.100006) and kept elements are scaled by the exact inverse keep probability, so the
expectation is preserved exactly. On CPU this is faster than drawing random bits with
`jax.random` and comparing them (docs/performance.md has the measurements).

The hash is jax's threefry2x32 written out as its 20 unrolled rounds (`threefry2x32`), which is
how jax lowers it on GPU and TPU. On CPU jax lowers its primitive as a rolled 5-iteration loop
(to keep compile times short), and XLA cannot fuse a loop into the mask's consumers: each
iteration writes its two words to memory. Unrolled, the hash fuses into the mask. The output is
bit-identical to `jax.extend.random.threefry_2x32`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

RESOLUTION = 2**16  # Values of one 16-bit draw.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's rotation constants.
_KEY_PARITY = 0x1BD11BDA  # Threefry's key schedule constant.


def drop_threshold(rate: float) -> int:
    """The 16-bit threshold below which an element is dropped: round(rate * 2**16)."""
    return min(RESOLUTION, max(0, round(rate * RESOLUTION)))


def _threefry_key_words(rng: jax.Array) -> jax.Array | None:
    """The two uint32 words of a threefry key (typed or raw), or None for another PRNG."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if "threefry" not in str(jax.random.key_impl(rng)):
            return None
        rng = jax.random.key_data(rng)
    return rng if rng.shape == (2,) and rng.dtype == jnp.uint32 else None


def _rotate_left(word: jax.Array, bits: int) -> jax.Array:
    return (word << jnp.uint32(bits)) | (word >> jnp.uint32(32 - bits))


def threefry2x32(
    key1: jax.Array, key2: jax.Array, count1: jax.Array, count2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash (20 rounds), unrolled so XLA fuses it into its consumers.

    Equal to jax's `threefry2x32_p` bit for bit (tested against `jax.extend.random.threefry_2x32`).

    Args:
      key1, key2: uint32 scalars, the key's two words.
      count1, count2: uint32 arrays of one shape, the two words of each counter.

    Returns:
      The two uint32 output words, each of the counters' shape.
    """
    schedule = (key1, key2, key1 ^ key2 ^ jnp.uint32(_KEY_PARITY))
    first, second = count1 + schedule[0], count2 + schedule[1]
    for block in range(5):
        for bits in _ROTATIONS[block % 2]:
            first = first + second
            second = _rotate_left(second, bits) ^ first
        first = first + schedule[(block + 1) % 3]
        second = second + schedule[(block + 2) % 3] + jnp.uint32(block + 1)
    return first, second


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 array of `shape` holding each element's row-major index (an iota XLA can shard)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


def random_draws16(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint16 draws of `shape`: four per threefry2x32 hash of a counter.

    Hash i of key (k1, k2) is `threefry2x32(k1, k2, 0, i)` over groups of four consecutive
    elements of the last axis; its two output words are cut into 16-bit halves. Keys of another
    PRNG implementation fall back to `jax.random.bits`, two draws per 32-bit word.

    Args:
      rng: PRNG key (typed or raw).
      shape: at least one dimension.

    Returns:
      uint16 array of `shape`.
    """
    last = shape[-1]
    key = _threefry_key_words(rng)
    if key is None:
        words = jax.random.bits(rng, (*shape[:-1], (last + 1) // 2), jnp.uint32)
    else:
        groups = (*shape[:-1], (last + 3) // 4)
        if math.prod(groups) >= 2**32:
            raise ValueError(f"dropout mask of shape {shape} needs over 2**32 random hashes")
        first, second = threefry2x32(
            key[0], key[1], jnp.zeros(groups, jnp.uint32), _flat_index(groups)
        )
        words = jnp.stack([first, second], axis=-1)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16)
    return draws.reshape(*shape[:-1], -1)[..., :last]


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean keep mask: each element is kept with probability 1 - drop_threshold(rate) / 2**16.

    Args:
      rng: PRNG key.
      rate: drop probability, in [0, 1].
      shape: the mask's shape (at least one dimension).

    Returns:
      bool array of `shape`.
    """
    return random_draws16(rng, shape) >= drop_threshold(rate)


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
