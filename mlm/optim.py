"""Optimizers for BERT pretraining: AdamW / LAMB / SGD / Adafactor, weight-decay mask, schedules.

Follows Model Garden's optimization package (official/modeling/optimization): `optimizer.name`
is its `optimizer.type`, `optimizer.schedule` its `learning_rate.type`, and a linear warmup (its
`warmup.type=linear`) ramps up to the schedule's rate at `warmup_steps`. The default, AdamW with a
polynomial decay over all `num_steps` updates, is Model Garden's BERT pretraining recipe.
Gradient accumulation lives in the train step, not here.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mlm.config import OPTIMIZERS, SCHEDULES
from mlm.errors import ConfigError

OPTIMIZER_NAMES = OPTIMIZERS
SCHEDULE_NAMES = SCHEDULES
# Substrings of a parameter path that exclude it from weight decay (and LAMB's trust ratio),
# as Model Garden's `exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`.
_NO_DECAY_COMPONENTS = ("LayerNorm", "layer_norm")
_NO_DECAY_LEAF = "bias"


def _after_warmup(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The rate from `warmup_steps` on, by `optimizer.schedule` (see `learning_rate_schedule`)."""
    name = config.get("schedule", "polynomial")
    rate, end, warmup_steps = config.learning_rate, config.end_learning_rate, config.warmup_steps
    if name == "polynomial":
        return optax.polynomial_schedule(
            init_value=rate, end_value=end, power=config.power, transition_steps=num_steps
        )
    if name == "linear":
        return optax.linear_schedule(init_value=rate, end_value=end, transition_steps=num_steps)
    if name == "constant":
        return optax.constant_schedule(rate)
    if name == "cosine":
        span = max(num_steps - warmup_steps, 1)

        def cosine(step: jax.typing.ArrayLike) -> jax.Array:
            done = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
            return end + (rate - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * done))

        return cosine
    # inverse_sqrt: Model Garden's `power` schedule with power -0.5, T5's rsqrt decay.
    scale_steps = max(warmup_steps, 1)

    def inverse_sqrt(step: jax.typing.ArrayLike) -> jax.Array:
        return rate * jnp.sqrt(scale_steps / jnp.maximum(step, scale_steps))

    return inverse_sqrt


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """`optimizer.schedule` wrapped by Model Garden's linear warmup.

    With W = warmup_steps, N = num_steps, lr = learning_rate, end = end_learning_rate, the rate
    from step W on is (t: the update count)

      polynomial: (lr - end) * (1 - min(t, N) / N) ** power + end  (counted from step 0)
      linear:     polynomial with power 1
      cosine:     end + (lr - end) * (1 + cos(pi * clip((t - W) / (N - W), 0, 1))) / 2
      constant:   lr
      inverse_sqrt: lr * sqrt(W / max(t, W))  (W taken as 1 when it is 0)

    For t < W the rate is `after_warmup(W) * t / W`: lr for all but polynomial and linear, whose
    decay has already begun (Model Garden's recipe). A warmup longer than the run ramps towards
    `learning_rate` and never ends (as Hugging Face's linear warmup does; ramping to
    `after_warmup(W)`, which is `end_learning_rate` for a polynomial decay there, would keep the
    rate near zero for the whole run).

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
    _check_choice("schedule", config.get("schedule", "polynomial"), SCHEDULE_NAMES)
    decay = _after_warmup(config, num_steps)
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


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"optimizer.{field}={value!r} is unknown; use one of {', '.join(choices)}"
        )


def _validate(config: ml_collections.ConfigDict) -> None:
    accum = config.get("grad_accum_steps", 1)
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ConfigError(
            f"optimizer.grad_accum_steps={accum!r} must be an int >= 1; use 1 for no accumulation"
        )
    _check_choice("name", config.name, OPTIMIZER_NAMES)


def _sgd(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """SGD with (optionally Nesterov) momentum and decoupled weight decay: the update is
    -lr * (m + weight_decay * param), m <- momentum * m + grad (the decay not in m)."""
    momentum = config.get("momentum", 0.9)
    trace = (
        [optax.trace(decay=momentum, nesterov=config.get("nesterov", False))]
        if momentum > 0
        else []
    )
    return optax.chain(
        *trace,
        optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(schedule),
    )


def _adafactor(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """optax.adafactor with its defaults, the schedule as its learning rate and decoupled weight
    decay scaled by the rate as AdamW's: the update is -(lr * adafactor_direction +
    lr * weight_decay * param)."""
    weight_decay = config.weight_decay
    return optax.adafactor(
        learning_rate=schedule,
        weight_decay_rate=(lambda step: weight_decay * schedule(step)) if weight_decay else None,
        weight_decay_mask=weight_decay_mask,
    )


def create_optimizer(
    config: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW, LAMB, SGD or Adafactor with the warmup + `optimizer.schedule`
    learning rate, with non-finite updates skipped (`optax.apply_if_finite`).

    Args:
      config: the `optimizer` config section.
      num_steps: total number of optimizer updates (for the schedule).

    Returns:
      The optax transformation; `update` needs `params` (weight decay, trust ratio).

    Raises:
      ConfigError: unknown optimizer or schedule name or invalid `grad_accum_steps`.
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
    elif config.name == "lamb":
        # optax.lamb, but as Model Garden's LAMB, excluded params get no layer adaptation either.
        optimizer = optax.chain(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
            optax.masked(optax.scale_by_trust_ratio(), weight_decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    elif config.name == "sgd":
        optimizer = _sgd(config, schedule)
    else:
        optimizer = _adafactor(config, schedule)
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
