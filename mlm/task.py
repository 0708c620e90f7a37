"""The masked-LM task as pure functions (Model Garden's MaskedLMTask, JAX style).

`init`, `loss`, `train_step`, `eval_step` and `inference_step` are plain functions of
(state or params, batch); the driver compiles them with `jax.jit` over a mesh and donates the
state. `aggregate_logs` / `reduce_aggregated_logs` run on the host: steps return sums and
denominators, the host adds them up and divides once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlm.model import BertForPreTraining

Batch = Mapping[str, jax.Array]
Logs = dict[str, Any]

# Per-step values the host averages over a logging interval; `learning_rate` keeps its latest
# value; everything else a step returns is a sum that the host adds up.
MEAN_KEYS = ("loss", "grad_norm")
LAST_KEYS = ("learning_rate", "consecutive_skips")


@flax.struct.dataclass
class TaskState:
    """Everything a train step needs, as one pytree.

    Attributes:
      step: int32 scalar, number of optimizer updates applied so far.
      params: the model parameters (float32).
      opt_state: the optax optimizer state.
      rng: base PRNG key (raw uint32); step randomness is `fold_in(rng, step)`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def build_model(config: ml_collections.ConfigDict) -> BertForPreTraining:
    """Builds the pretraining model from `config.model` and `config.data.use_next_sentence_label`.

    Args:
      config: the full validated config.

    Returns:
      The flax module (no parameters: those come from `init`).
    """
    m = config.model
    return BertForPreTraining(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        type_vocab_size=m.type_vocab_size,
        dropout_rate=m.dropout_rate,
        attention_dropout_rate=m.attention_dropout_rate,
        dtype=jnp.dtype(m.dtype),
        use_next_sentence=config.data.use_next_sentence_label,
        remat=m.remat,
    )


def dummy_batch(batch_size: int, seq_length: int, max_predictions: int) -> dict[str, np.ndarray]:
    """Returns an all-padding batch of the right shapes and dtypes (for init and shape tracing)."""
    ints = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    return {
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
    model: BertForPreTraining,
    tx: optax.GradientTransformation,
    seq_length: int,
    max_predictions: int,
) -> TaskState:
    """Creates the initial train state.

    Args:
      rng: raw PRNG key (`jax.random.PRNGKey(seed)`).
      model: the pretraining module.
      tx: the optimizer.
      seq_length: tokens per sequence.
      max_predictions: masked slots per sequence.

    Returns:
      A TaskState at step 0.
    """
    params_rng, state_rng = jax.random.split(rng)
    batch = dummy_batch(1, seq_length, max_predictions)
    params = model.init(params_rng, batch, deterministic=True)["params"]
    return TaskState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )


def state_initializer(
    config: ml_collections.ConfigDict,
    model: BertForPreTraining,
    tx: optax.GradientTransformation,
) -> Callable[[jax.Array], TaskState]:
    """Returns `init` bound to the model, optimizer and the config's batch shapes.

    Args:
      config: the full config (`data.seq_length`, `data.max_predictions_per_seq`).
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
    )


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1e-12), 0.0)


def metric_sums(outputs: Mapping[str, jax.Array], batch: Batch) -> dict[str, jax.Array]:
    """Sums and denominators of the task metrics for one batch.

    Args:
      outputs: model outputs (`mlm_logits` [B, P, V], optional `nsp_logits` [B, 2]).
      batch: the batch (see README 'Batch format').

    Returns:
      `lm_loss_sum`, `lm_weight_sum`, `lm_correct_sum` and, with next-sentence prediction,
      `nsp_loss_sum`, `nsp_correct_sum`, `nsp_count`; float32 scalars.
    """
    logits = outputs["mlm_logits"].astype(jnp.float32)
    weights = batch["masked_lm_weights"].astype(jnp.float32)
    labels = batch["masked_lm_ids"]
    per_slot = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # The label's logit is the largest: argmax == label, except that a tie counts as correct.
    # On XLA:CPU an argmax over [640, 30522] took 70-90 ms, this 3 ms (README 'Performance').
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    correct = (label_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    sums = {
        "lm_loss_sum": jnp.sum(per_slot * weights),
        "lm_weight_sum": jnp.sum(weights),
        "lm_correct_sum": jnp.sum(correct * weights),
    }
    if "nsp_logits" in outputs:
        nsp_logits = outputs["nsp_logits"].astype(jnp.float32)
        nsp_labels = batch["next_sentence_labels"]
        sums["nsp_loss_sum"] = jnp.sum(
            optax.softmax_cross_entropy_with_integer_labels(nsp_logits, nsp_labels)
        )
        sums["nsp_correct_sum"] = jnp.sum(
            (jnp.argmax(nsp_logits, axis=-1) == nsp_labels).astype(jnp.float32)
        )
        sums["nsp_count"] = jnp.asarray(nsp_labels.shape[0], jnp.float32)
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
    """The training objective: masked-LM loss per weighted slot plus next-sentence loss per example.

    Args:
      sums: output of `metric_sums` (possibly for a micro-batch).
      lm_weight_total: sum of `masked_lm_weights` over the whole global batch (all devices, all
        micro-batches), so micro-batch losses add up to the full-batch loss.
      nsp_total: number of examples in the whole global batch.

    Returns:
      A float32 scalar.
    """
    loss = _safe_divide(sums["lm_loss_sum"], lm_weight_total)
    if "nsp_loss_sum" in sums:
        loss = loss + _safe_divide(sums["nsp_loss_sum"], nsp_total)
    return loss


def loss(
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    *,
    model: BertForPreTraining,
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

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return {name: split(value) for name, value in batch.items()}


def _gradients(
    params: Any, batch: Batch, rng: jax.Array, *, model: BertForPreTraining, grad_accum_steps: int
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Loss, metric sums and gradients of the full batch, accumulated over micro-batches."""
    totals = batch_totals(batch)
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if grad_accum_steps == 1:
        (value, sums), grads = grad_fn(params, batch, rng, model=model, totals=totals)
        return value, sums, grads

    micro_grad_fn = functools.partial(grad_fn, model=model, totals=totals)

    def add_micro_batch(carry, micro):
        index, micro_batch = micro
        outputs = micro_grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, outputs), None

    micro = _micro_batches(batch, grad_accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(micro_grad_fn, params, first, rng)
    ((value, sums), grads), _ = jax.lax.scan(
        add_micro_batch,
        jax.tree.map(jnp.zeros_like, shapes),
        (jnp.arange(grad_accum_steps), micro),
    )
    return value, sums, grads


def train_step(
    state: TaskState,
    batch: Batch,
    *,
    model: BertForPreTraining,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
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

    Returns:
      (new state, logs): logs hold `loss`, `grad_norm`, `learning_rate`, the metric sums and,
      with `optax.apply_if_finite` (as `create_optimizer` builds it), `skipped_steps` (1 when
      this update was skipped as non-finite) and `consecutive_skips`.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    value, sums, grads = _gradients(
        state.params, batch, rng, model=model, grad_accum_steps=grad_accum_steps
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    logs = dict(sums)
    logs["loss"] = value
    logs["grad_norm"] = optax.tree.norm(grads)
    logs["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        # The divergence guard skipped this update when a value was not finite.
        logs["skipped_steps"] = 1 - opt_state.last_finite.astype(jnp.int32)
        logs["consecutive_skips"] = opt_state.notfinite_count
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, logs


def eval_step(params: Any, batch: Batch, *, model: BertForPreTraining) -> Logs:
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


def inference_step(params: Any, batch: Batch, *, model: BertForPreTraining) -> dict[str, jax.Array]:
    """Model outputs for prediction (Model Garden's inference_step), dropout off.

    Args:
      params: model parameters.
      batch: at least `input_word_ids`, `input_mask`, `input_type_ids`, `masked_lm_positions`.
      model: the pretraining module.

    Returns:
      `mlm_logits` [B, P, V] (and `nsp_logits` [B, 2] with next-sentence prediction), float32.
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
      `lm_example_loss`, `masked_lm_accuracy`, `next_sentence_loss` / `next_sentence_accuracy`
      (with next-sentence prediction), the interval means of MEAN_KEYS (`loss` for training),
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
    if "nsp_count" in aggregated:
        metrics["next_sentence_loss"] = ratio("nsp_loss_sum", "nsp_count")
        metrics["next_sentence_accuracy"] = ratio("nsp_correct_sum", "nsp_count")
    for name in MEAN_KEYS:
        if name in aggregated:
            metrics[name] = aggregated[name] / aggregated["num_steps"]
    if "loss" not in aggregated:
        metrics["validation_loss"] = metrics["lm_example_loss"] + metrics.get(
            "next_sentence_loss", 0.0
        )
    for name in LAST_KEYS:
        if name in aggregated:
            metrics[name] = aggregated[name]
    if "skipped_steps" in aggregated:
        metrics["skipped_steps"] = aggregated["skipped_steps"]
    return metrics
