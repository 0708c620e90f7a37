"""Optimizers for BERT pretraining: AdamW / LAMB, weight-decay mask, warmup + polynomial decay.

Follows Model Garden's BERT pretraining recipe (official/modeling/optimization): the learning rate
decays polynomially over all `num_steps` updates and a linear warmup ramps up to the decayed rate
at `warmup_steps`. Gradient accumulation lives in the train step, not here.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mlm.errors import ConfigError

OPTIMIZER_NAMES = ("adamw", "lamb")
# Substrings of a parameter path that exclude it from weight decay (and LAMB's trust ratio),
# as Model Garden's `exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`.
_NO_DECAY_COMPONENTS = ("LayerNorm", "layer_norm")
_NO_DECAY_LEAF = "bias"


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Polynomial decay over `num_steps` updates wrapped by Model Garden's linear warmup.

    For step < warmup_steps the rate is `decayed(warmup_steps) * step / warmup_steps`; from
    `warmup_steps` on it is the polynomial decay (counted from step 0); after `num_steps` it stays
    at `end_learning_rate`. A warmup longer than the run ramps towards `learning_rate` and never
    ends (as Hugging Face's linear warmup does; ramping to `decayed(warmup_steps)`, which is
    `end_learning_rate` there, would keep the rate near zero for the whole run).

    Args:
      config: the `optimizer` config section.
      num_steps: total number of optimizer updates.

    Returns:
      A schedule mapping the update count to the learning rate.
    """
    warmup_steps = int(config.warmup_steps)
    if num_steps < 1:
        raise ConfigError(f"train.num_steps={num_steps} must be >= 1; set a positive step count")
    if warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={warmup_steps} must be >= 0; use 0 for none")
    decay = optax.polynomial_schedule(
        init_value=config.learning_rate,
        end_value=config.end_learning_rate,
        power=config.power,
        transition_steps=num_steps,
    )
    if warmup_steps == 0:
        return decay
    peak = decay(warmup_steps) if warmup_steps <= num_steps else config.learning_rate
    warmup = optax.linear_schedule(0.0, peak, transition_steps=warmup_steps)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        return jnp.where(step < warmup_steps, warmup(step), decay(step))

    return schedule


def _path_names(path: tuple[Any, ...]) -> list[str]:
    """Names of the components of a `jax.tree_util` key path."""
    return [
        str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path
    ]


def _decays(path: tuple[Any, ...], _: Any) -> bool:
    names = _path_names(path)
    in_layer_norm = any(part in name for name in names for part in _NO_DECAY_COMPONENTS)
    is_bias = bool(names) and _NO_DECAY_LEAF in names[-1]
    return not (in_layer_norm or is_bias)


def weight_decay_mask(params: Any) -> Any:
    """Which parameters get decoupled weight decay: all but LayerNorm parameters and biases.

    Args:
      params: a parameter pytree (nested dicts as produced by flax).

    Returns:
      A pytree of the same structure with True where weight decay (and LAMB's layer
      adaptation) applies, e.g. kernels and embeddings.
    """
    return jax.tree_util.tree_map_with_path(_decays, params)


def _validate(config: ml_collections.ConfigDict) -> None:
    accum = config.get("grad_accum_steps", 1)
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ConfigError(
            f"optimizer.grad_accum_steps={accum!r} must be an int >= 1; use 1 for no accumulation"
        )
    if config.name not in OPTIMIZER_NAMES:
        raise ConfigError(
            f"optimizer.name={config.name!r} is unknown; use one of {', '.join(OPTIMIZER_NAMES)}"
        )


def create_optimizer(
    config: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW or LAMB with the warmup + polynomial decay schedule, with
    non-finite updates skipped (`optax.apply_if_finite`).

    Args:
      config: the `optimizer` config section.
      num_steps: total number of optimizer updates (for the schedule).

    Returns:
      The optax transformation; `update` needs `params` (weight decay, trust ratio).

    Raises:
      ConfigError: unknown optimizer name or invalid `grad_accum_steps`.
    """
    _validate(config)
    schedule = learning_rate_schedule(config, num_steps)
    b1, b2, eps = config.get("b1", 0.9), config.get("b2", 0.999), config.get("eps", 1e-6)
    if config.name == "adamw":
        optimizer = optax.adamw(
            schedule,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    else:
        # optax.lamb, but as Model Garden's LAMB, excluded params get no layer adaptation either.
        optimizer = optax.chain(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
            optax.masked(optax.scale_by_trust_ratio(), weight_decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    if config.clip_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(config.clip_norm), optimizer)
    # Divergence guard: an update with a non-finite value is skipped (params and moments kept)
    # and counted; the driver stops the run after train.max_consecutive_skips in a row, so the
    # wrapper itself never gives up.
    return optax.apply_if_finite(optimizer, max_consecutive_errors=2**30)


def ema_update(ema: Any, params: Any, decay: float, applied: jax.typing.ArrayLike = True) -> Any:
    """One step of the exponential moving average of the params.

    Args:
      ema: the average so far (starts as the initial params).
      params: the params after this step's update.
      decay: `optimizer.ema_decay` d: ema <- d * ema + (1 - d) * params.
      applied: whether the update was applied; a skipped (non-finite) step keeps `ema`.

    Returns:
      The new average, same structure and dtypes.
    """

    def update(average: jax.Array, param: jax.Array) -> jax.Array:
        moved = decay * average + (1.0 - decay) * param
        return jnp.where(applied, moved, average).astype(average.dtype)

    return jax.tree.map(update, ema, params)
