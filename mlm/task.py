"""The masked-LM task as pure functions (Model Garden's MaskedLMTask, JAX style).

`init`, `loss`, `train_step`, `eval_step` and `inference_step` are plain functions of
(state or params, batch); the driver compiles them with `jax.jit` over a mesh and donates the
state. `aggregate_logs` / `reduce_aggregated_logs` run on the host: steps return sums and
denominators, the host adds them up and divides once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlm import heads, kernels, parallel, privacy
from mlm import loss_scale as loss_scale_lib
from mlm.model import BertForPreTraining
from mlm.modernbert import ModernBertForPreTraining
from mlm.optim import ema_update

Batch = Mapping[str, jax.Array]
Logs = dict[str, Any]

# Per-step values the host averages over a logging interval; `learning_rate` keeps its latest
# value; everything else a step returns is a sum that the host adds up.
MEAN_KEYS = ("loss", "grad_norm")
LAST_KEYS = ("learning_rate", "consecutive_skips", "loss_scale")


@flax.struct.dataclass
class TaskState:
    """Everything a train step needs, as one pytree.

    Attributes:
      step: int32 scalar, number of optimizer updates applied so far.
      params: the model parameters (float32).
      opt_state: the optax optimizer state.
      rng: base PRNG key (raw uint32); step randomness is `fold_in(rng, step)`.
      ema_params: the exponential moving average of `params` (`optimizer.ema_decay` > 0), or
        None.
      loss_scale: a `loss_scale.LossScale` (`model.dtype=float16`), or None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None
    loss_scale: Any = None


def build_model(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> nn.Module:
    """Builds the pretraining model of `config.model.encoder` with its heads.

    BERT and ALBERT (BERT's blocks with factorised embeddings and shared layers) are
    `mlm.model.BertForPreTraining`; ModernBERT is `mlm.modernbert.ModernBertForPreTraining`. All
    take the same batch and return the same outputs. The classification heads are
    `model.cls_heads`, or without them the next-sentence head when
    `data.use_next_sentence_label` (`mlm.heads.specs`; for ALBERT it learns sentence order).

    Args:
      config: the full validated config.
      mesh: the mesh the step is compiled for: its devices' platform decides `model.kernels=auto`
        and its batch sharding is kept by the activations. None: the platform of
        `jax.devices()`, no sharding constraint.

    Returns:
      The flax module (no parameters: those come from `init`).
    """
    m = config.model
    platform = kernels.mesh_platform(mesh) if mesh is not None else jax.devices()[0].platform
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        dropout_rate=m.dropout_rate,
        attention_dropout_rate=m.attention_dropout_rate,
        dtype=jnp.dtype(m.dtype),
        use_next_sentence=config.data.use_next_sentence_label,
        cls_heads=heads.specs(m.cls_heads, m.hidden_size, config.data.use_next_sentence_label),
        activation=m.activation,
        mlm_activation=m.mlm_activation,
        remat=m.remat,
        initializer_range=m.initializer_range,
        kernels=kernels.select(m.kernels, platform),
        row_sharding=None if mesh is None else parallel.batch_sharding(mesh),
    )
    if m.encoder == "modernbert":
        modern = m.modernbert
        return ModernBertForPreTraining(
            **common,
            global_attn_every_n_layers=modern.global_attn_every_n_layers,
            local_attention=modern.local_attention,
            global_rope_theta=modern.global_rope_theta,
            local_rope_theta=modern.local_rope_theta,
            norm_eps=modern.norm_eps,
        )
    return BertForPreTraining(
        **common,
        type_vocab_size=m.type_vocab_size,
        embedding_size=m.embedding_size,
        norm_first=m.norm_first,
        mlm_initializer_range=m.mlm_initializer_range,
        num_hidden_groups=m.albert.num_hidden_groups if m.encoder == "albert" else 0,
    )


def dummy_batch(
    batch_size: int,
    seq_length: int,
    max_predictions: int,
    labels: Sequence[tuple[str, int]] = (),
) -> dict[str, np.ndarray]:
    """Returns an all-padding batch of the right shapes and dtypes (for init and shape tracing).

    `labels` are the classification heads' label keys (`mlm.heads.record_labels`), zeros.
    """
    ints = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    return {
        **{key: ints(batch_size) for key, _ in labels},
        "input_word_ids": ints(batch_size, seq_length),
        "input_mask": np.ones((batch_size, seq_length), np.int32),
        "input_type_ids": ints(batch_size, seq_length),
        "packed_segment_ids": np.ones((batch_size, seq_length), np.int32),
        "position_ids": np.broadcast_to(
            np.arange(seq_length, dtype=np.int32), (batch_size, seq_length)
        ),
        "masked_lm_positions": ints(batch_size, max_predictions),
        "masked_lm_ids": ints(batch_size, max_predictions),
        "masked_lm_weights": np.zeros((batch_size, max_predictions), np.float32),
        "next_sentence_labels": ints(batch_size),
    }


def init(
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    seq_length: int,
    max_predictions: int,
    ema: bool = False,
    loss_scale_init: float = 0.0,
) -> TaskState:
    """Creates the initial train state.

    Args:
      rng: raw PRNG key (`jax.random.PRNGKey(seed)`).
      model: the pretraining module.
      tx: the optimizer.
      seq_length: tokens per sequence.
      max_predictions: masked slots per sequence.
      ema: keep an exponential moving average of the params (starting at the initial params).
      loss_scale_init: > 0: dynamic loss scaling starting at this scale (float16); 0: none.

    Returns:
      A TaskState at step 0.
    """
    params_rng, state_rng = jax.random.split(rng)
    batch = dummy_batch(1, seq_length, max_predictions)
    params = model.init(params_rng, batch, deterministic=True)["params"]
    return new_state(params, state_rng, tx=tx, ema=ema, loss_scale_init=loss_scale_init)


def new_state(
    params: Any,
    rng: jax.Array,
    *,
    tx: optax.GradientTransformation,
    ema: bool = False,
    loss_scale_init: float = 0.0,
) -> TaskState:
    """The state at step 0 around given params: fresh optimizer state, EMA and loss scale.

    Args:
      params: the model parameters.
      rng: the state's base PRNG key.
      tx, ema, loss_scale_init: as for `init`.

    Returns:
      A TaskState at step 0.
    """
    return TaskState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=rng,
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        loss_scale=loss_scale_lib.initial(loss_scale_init) if loss_scale_init > 0 else None,
    )


def state_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`init`'s and `new_state`'s `ema` and `loss_scale_init` for a config.

    Args:
      config: the full config (`optimizer.ema_decay`, `model.dtype`,
        `optimizer.loss_scale_init`).

    Returns:
      {'ema': ..., 'loss_scale_init': ...}.
    """
    return dict(
        ema=config.optimizer.ema_decay > 0,
        loss_scale_init=(
            loss_scale_lib.initial_scale(config.optimizer)
            if config.model.dtype == "float16"
            else 0.0
        ),
    )


def state_initializer(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
) -> Callable[[jax.Array], TaskState]:
    """Returns `init` bound to the model, optimizer and the config's batch shapes.

    Args:
      config: the full config (`data.seq_length`, `data.max_predictions_per_seq`,
        `optimizer.ema_decay`, `model.dtype` and `optimizer.loss_scale_init`).
      model: the pretraining module.
      tx: the optimizer.

    Returns:
      A function rng -> TaskState, to jit or to `jax.eval_shape`.
    """
    return functools.partial(
        init,
        model=model,
        tx=tx,
        seq_length=config.data.seq_length,
        max_predictions=config.data.max_predictions_per_seq,
        **state_options(config),
    )


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1e-12), 0.0)


def metric_sums(outputs: Mapping[str, jax.Array], batch: Batch) -> dict[str, jax.Array]:
    """Sums and denominators of the task metrics for one batch.

    Args:
      outputs: model outputs (`mlm_logits` [B, P, V] and each classification head's logits,
        `nsp_logits` [B, 2] for next-sentence).
      batch: the batch (see docs/reference.md 'Batch format'), with each head's labels
        (`mlm.heads.label_key`).

    Returns:
      `lm_loss_sum`, `lm_weight_sum`, `lm_correct_sum` and, per classification head,
      `PREFIX_loss_sum`, `PREFIX_correct_sum`, `PREFIX_count` (`mlm.heads.sums_prefix`: `nsp`
      for next-sentence, else the head's name); float32 scalars.
    """
    logits = outputs["mlm_logits"].astype(jnp.float32)
    weights = batch["masked_lm_weights"].astype(jnp.float32)
    labels = batch["masked_lm_ids"]
    per_slot = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # The label's logit is the largest: argmax == label, except that a tie counts as correct.
    # Cheaper than an argmax over the vocab on XLA:CPU.
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    correct = (label_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    sums = {
        "lm_loss_sum": jnp.sum(per_slot * weights),
        "lm_weight_sum": jnp.sum(weights),
        "lm_correct_sum": jnp.sum(correct * weights),
    }
    for key, head_logits in outputs.items():
        name = heads.head_of_logits_key(key)
        if name is None:
            continue
        head_logits = head_logits.astype(jnp.float32)
        head_labels = batch[heads.label_key(name)]
        prefix = heads.sums_prefix(name)
        sums[f"{prefix}_loss_sum"] = jnp.sum(
            optax.softmax_cross_entropy_with_integer_labels(head_logits, head_labels)
        )
        sums[f"{prefix}_correct_sum"] = jnp.sum(
            (jnp.argmax(head_logits, axis=-1) == head_labels).astype(jnp.float32)
        )
        sums[f"{prefix}_count"] = jnp.asarray(head_labels.shape[0], jnp.float32)
    return sums


def batch_totals(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of `masked_lm_weights`, number of examples) of a batch: the loss denominators."""
    return (
        jnp.sum(batch["masked_lm_weights"].astype(jnp.float32)),
        jnp.asarray(batch["next_sentence_labels"].shape[0], jnp.float32),
    )


def total_loss(
    sums: Mapping[str, jax.Array], lm_weight_total: jax.Array, nsp_total: jax.Array
) -> jax.Array:
    """The training objective: masked-LM loss per weighted slot plus each head's loss per example.

    Args:
      sums: output of `metric_sums` (possibly for a micro-batch).
      lm_weight_total: sum of `masked_lm_weights` over the whole global batch (all devices, all
        micro-batches), so micro-batch losses add up to the full-batch loss.
      nsp_total: number of examples in the whole global batch (each classification head's
        denominator).

    Returns:
      A float32 scalar.
    """
    loss = _safe_divide(sums["lm_loss_sum"], lm_weight_total)
    for name, value in sums.items():
        if name.endswith("_loss_sum") and name != "lm_loss_sum":
            loss = loss + _safe_divide(value, nsp_total)
    return loss


def loss(
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    *,
    model: nn.Module,
    totals: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The pretraining loss of a batch (Model Garden's build_losses).

    Args:
      params: model parameters.
      batch: the batch; under `jax.jit` over a mesh it is the global batch, so its weight sum is
        the sum across all devices.
      rng: dropout key, or None for deterministic (eval) mode.
      model: the pretraining module.
      totals: `batch_totals` of the full global batch when `batch` is one micro-batch of it;
        default: those of `batch`.

    Returns:
      (loss, metric sums).
    """
    deterministic = rng is None
    rngs = None if deterministic else {"dropout": rng}
    outputs = model.apply({"params": params}, batch, deterministic=deterministic, rngs=rngs)
    sums = metric_sums(outputs, batch)
    if totals is None:
        totals = batch_totals(batch)
    return total_loss(sums, *totals), sums


def _micro_batches(batch: Batch, num_micro: int) -> dict[str, jax.Array]:
    """Splits [B, ...] arrays into [num_micro, B / num_micro, ...].

    Micro-batch i takes rows i, i + num_micro, ...: each device's contiguous block of rows splits
    evenly among the micro-batches, so the split moves no data between devices.
    """

    return {name: _split_rows(value, num_micro) for name, value in batch.items()}


def _split_rows(x: jax.Array, num_micro: int) -> jax.Array:
    """[B, ...] -> [num_micro, B / num_micro, ...]; micro-batch i holds rows i, i + num_micro..."""
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def _scaled_loss(
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    *,
    model: nn.Module,
    totals: tuple[jax.Array, jax.Array] | None = None,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """`loss` times the loss scale (float16), with (unscaled loss, metric sums) as aux."""
    value, sums = loss(params, batch, rng, model=model, totals=totals)
    return (value if scale is None else value * scale), (value, sums)


def _unscale(grads: Any, scale: jax.Array | None) -> Any:
    return grads if scale is None else jax.tree.map(lambda g: g / scale, grads)


def _gradients(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    grad_accum_steps: int,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Loss, metric sums and gradients of the full batch, accumulated over micro-batches."""
    totals = batch_totals(batch)
    grad_fn = jax.value_and_grad(_scaled_loss, has_aux=True)
    if grad_accum_steps == 1:
        (_, (value, sums)), grads = grad_fn(
            params, batch, rng, model=model, totals=totals, scale=scale
        )
        return value, sums, _unscale(grads, scale)

    micro_grad_fn = functools.partial(grad_fn, model=model, totals=totals, scale=scale)

    def add_micro_batch(carry, micro):
        index, micro_batch = micro
        outputs = micro_grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, outputs), None

    micro = _micro_batches(batch, grad_accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(micro_grad_fn, params, first, rng)
    ((_, (value, sums)), grads), _ = jax.lax.scan(
        add_micro_batch,
        jax.tree.map(jnp.zeros_like, shapes),
        (jnp.arange(grad_accum_steps), micro),
    )
    return value, sums, _unscale(grads, scale)


def row_loss(
    params: Any,
    row: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """The DP-SGD objective of one row (arrays without the batch axis).

    A row's loss is its masked-LM loss per weighted slot (the sum over its own masked slots
    divided by its own weight sum; 0 for a row without masked slots) plus its next-sentence
    loss; the step's objective is the mean of the row losses.

    Returns:
      (loss times `scale`, (loss, metric sums)).
    """
    return _scaled_loss(params, {k: v[None] for k, v in row.items()}, rng, model=model, scale=scale)


def _private_gradients(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    grad_accum_steps: int,
    dp: privacy.DpSgd,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any, jax.Array]:
    """DP-SGD: mean loss, metric sums, noisy mean of the clipped row gradients, rows clipped.

    Each row's gradient is clipped to `dp.l2_clip` (with loss scaling: the scaled gradient to
    `l2_clip * scale`, then unscaled), the clipped gradients are summed over all rows and
    micro-batches, noise of std `noise_multiplier * l2_clip` is added once, from a key derived
    from the step key (the same on every device), and the sum is divided by the row count.
    """
    num_rows = batch["input_word_ids"].shape[0]
    row_ids = jnp.arange(num_rows, dtype=jnp.int32)
    clip = dp.l2_clip if scale is None else dp.l2_clip * scale
    one_batch = functools.partial(
        privacy.clipped_gradient_sum,
        functools.partial(row_loss, model=model, scale=scale),
        params,
        rng=rng,
        l2_clip=clip,
    )
    if grad_accum_steps == 1:
        (values, sums), grad_sum, num_clipped = one_batch(batch, row_ids=row_ids)
    else:

        def add_micro_batch(carry, micro):
            micro_batch, micro_ids = micro
            outputs = one_batch(micro_batch, row_ids=micro_ids)
            return jax.tree.map(jnp.add, carry, outputs), None

        micro = (_micro_batches(batch, grad_accum_steps), _split_rows(row_ids, grad_accum_steps))
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda m: one_batch(m[0], row_ids=m[1]), first)
        ((values, sums), grad_sum, num_clipped), _ = jax.lax.scan(
            add_micro_batch, jax.tree.map(jnp.zeros_like, shapes), micro
        )
    grad_sum = _unscale(grad_sum, scale)
    noisy = privacy.add_noise(grad_sum, privacy.noise_key(rng), dp.noise_multiplier * dp.l2_clip)
    grads = jax.tree.map(lambda g: g / num_rows, noisy)
    return values / num_rows, sums, grads, num_clipped


def train_step(
    state: TaskState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    dp: privacy.DpSgd | None = None,
    ema_decay: float = 0.0,
    loss_scale_growth_steps: int = 2000,
) -> tuple[TaskState, Logs]:
    """One optimizer update on a global batch.

    Args:
      state: the train state (donated by the driver).
      batch: the global batch; with `grad_accum_steps` > 1 it is processed as that many
        micro-batches whose gradients add up to exactly the full-batch gradient.
      model: the pretraining module.
      tx: the optimizer.
      schedule: the learning-rate schedule (for logging the rate this update used).
      grad_accum_steps: micro-batches per update.
      dp: DP-SGD settings (`privacy.from_config`), or None for ordinary training.
      ema_decay: the EMA decay; used when `state.ema_params` is not None.
      loss_scale_growth_steps: with `state.loss_scale`: finite steps after which it doubles
        (`loss_scale.FIXED`: a fixed scale).

    Returns:
      (new state, logs): logs hold `loss`, `grad_norm`, `learning_rate`, the metric sums and,
      with `optax.apply_if_finite` (as `create_optimizer` builds it), `skipped_steps` (1 when
      this update was skipped as non-finite) and `consecutive_skips`; with DP-SGD
      `dp_clipped_rows` / `dp_rows`; with loss scaling `loss_scale` (the scale this step used).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    scale = None if state.loss_scale is None else state.loss_scale.scale
    logs: Logs = {}
    if dp is None:
        value, sums, grads = _gradients(
            state.params, batch, rng, model=model, grad_accum_steps=grad_accum_steps, scale=scale
        )
    else:
        value, sums, grads, num_clipped = _private_gradients(
            state.params,
            batch,
            rng,
            model=model,
            grad_accum_steps=grad_accum_steps,
            dp=dp,
            scale=scale,
        )
        logs["dp_clipped_rows"] = num_clipped.astype(jnp.float32)
        logs["dp_rows"] = jnp.asarray(batch["input_word_ids"].shape[0], jnp.float32)
    # float16 overflow: skip the update (params and moments unchanged) and halve the scale.
    # Above the minimum scale such a skip is expected and bypasses the divergence guard; at the
    # minimum the gradients reach `apply_if_finite`, which skips and counts them.
    overflow = jnp.asarray(False)
    if state.loss_scale is not None:
        finite = loss_scale_lib.all_finite(grads)
        overflow = loss_scale_lib.overflow(scale, finite, loss_scale_growth_steps)
        grads = jax.tree.map(lambda g: jnp.where(overflow, jnp.zeros_like(g), g), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if state.loss_scale is not None:
        keep_old = functools.partial(jax.tree.map, lambda new, old: jnp.where(overflow, old, new))
        params, opt_state = keep_old((params, opt_state), (state.params, state.opt_state))
    applied = ~overflow
    logs.update(sums)
    logs["loss"] = value
    logs["grad_norm"] = optax.tree.norm(grads)
    logs["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        # The divergence guard skipped this update when a value was not finite.
        applied = applied & opt_state.last_finite
        logs["skipped_steps"] = 1 - applied.astype(jnp.int32)
        logs["consecutive_skips"] = opt_state.notfinite_count
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if state.ema_params is not None:
        # A skipped update leaves the average unchanged too.
        new_state = new_state.replace(
            ema_params=ema_update(state.ema_params, params, ema_decay, applied)
        )
    if state.loss_scale is not None:
        logs["loss_scale"] = scale
        new_state = new_state.replace(
            loss_scale=loss_scale_lib.adjust(
                state.loss_scale, ~overflow & applied, loss_scale_growth_steps
            )
        )
    return new_state, logs


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> Logs:
    """Metric sums of one eval batch (Model Garden's validation_step), dropout off.

    Args:
      params: model parameters.
      batch: the global eval batch.
      model: the pretraining module.

    Returns:
      The metric sums of `metric_sums`.
    """
    _, sums = loss(params, batch, None, model=model)
    return sums


def inference_step(params: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
    """Model outputs for prediction (Model Garden's inference_step), dropout off.

    Args:
      params: model parameters.
      batch: at least `input_word_ids`, `input_mask`, `input_type_ids`, `masked_lm_positions`.
      model: the pretraining module.

    Returns:
      `mlm_logits` [B, P, V] and each classification head's logits [B, num_classes]
      (`nsp_logits` for next-sentence prediction), float32.
    """
    return model.apply({"params": params}, batch, deterministic=True)


def aggregate_logs(state: Logs | None, step_logs: Mapping[str, Any]) -> Logs:
    """Adds one step's logs (host values) to the running aggregate.

    Args:
      state: the aggregate so far, or None to start one.
      step_logs: a step's logs, already fetched to the host (numpy scalars).

    Returns:
      The new aggregate: sums of sum-type values, running totals of MEAN_KEYS, the latest
      LAST_KEYS, and `num_steps`.
    """
    aggregated = dict(state) if state else {"num_steps": 0}
    aggregated["num_steps"] += 1
    for name, value in step_logs.items():
        value = float(np.asarray(value, np.float64))
        if name in LAST_KEYS:
            aggregated[name] = value
        else:
            aggregated[name] = aggregated.get(name, 0.0) + value
    return aggregated


def reduce_aggregated_logs(aggregated: Logs, global_step: int | None = None) -> dict[str, float]:
    """Turns aggregated sums into the final metrics (Model Garden names).

    Args:
      aggregated: output of `aggregate_logs`.
      global_step: the step the metrics belong to, included as `step` when given.

    Returns:
      `lm_example_loss`, `masked_lm_accuracy`, per classification head `NAME_loss` /
      `NAME_accuracy` (`next_sentence_loss` / `next_sentence_accuracy`), the interval means of
      MEAN_KEYS (`loss` for training),
      `validation_loss` (from sums, when there is no per-step `loss`), and `learning_rate`.
    """

    def ratio(numerator: str, denominator: str) -> float:
        den = aggregated.get(denominator, 0.0)
        return aggregated.get(numerator, 0.0) / den if den > 0 else 0.0

    metrics: dict[str, float] = {}
    if global_step is not None:
        metrics["step"] = int(global_step)
    metrics["lm_example_loss"] = ratio("lm_loss_sum", "lm_weight_sum")
    metrics["masked_lm_accuracy"] = ratio("lm_correct_sum", "lm_weight_sum")
    head_losses = []
    for key in list(aggregated):
        prefix = key[: -len("_count")]
        if not key.endswith("_count") or f"{prefix}_loss_sum" not in aggregated:
            continue
        name = heads.metric_prefix(prefix)
        metrics[f"{name}_loss"] = ratio(f"{prefix}_loss_sum", key)
        metrics[f"{name}_accuracy"] = ratio(f"{prefix}_correct_sum", key)
        head_losses.append(metrics[f"{name}_loss"])
    for name in MEAN_KEYS:
        if name in aggregated:
            metrics[name] = aggregated[name] / aggregated["num_steps"]
    if "loss" not in aggregated:
        metrics["validation_loss"] = metrics["lm_example_loss"]
        for head_loss in head_losses:
            metrics["validation_loss"] += head_loss
    for name in LAST_KEYS:
        if name in aggregated:
            metrics[name] = aggregated[name]
    if "skipped_steps" in aggregated:
        metrics["skipped_steps"] = aggregated["skipped_steps"]
    if "dp_rows" in aggregated:
        metrics["dp_clipped_fraction"] = ratio("dp_clipped_rows", "dp_rows")
    return metrics
