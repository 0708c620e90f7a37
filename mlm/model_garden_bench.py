"""TF Model Garden's `MaskedLMTask.train_step`, timed the way `mlm.step_bench` times ours.

A standalone script: it imports only tensorflow, tf-models-official, numpy and json (never
`mlm`), so it runs in its own venv:

  python3.11 -m venv .venv-tfm && .venv-tfm/bin/pip install tf-models-official==2.20.0
  .venv-tfm/bin/python mlm/model_garden_bench.py --steps 20

`python -m mlm.bench --config configs/bench_reference.py --model-garden-python PYTHON` runs it
as a subprocess with the same shapes. The task is Model Garden's `MaskedLMTask` with its
default next-sentence head (2 classes, tanh pooler of width `hidden_size`, dropout 0.1); the
model is its `BertPretrainerV2` (post-LN `BertEncoder`); the optimizer is Model Garden's BERT
pretraining one (`OptimizerFactory`: `adamw` = AdamWeightDecay, weight decay 0.01 off LayerNorm
and biases, global-norm clipping 1.0, linear warmup then polynomial decay). `train_step` runs
under `tf.function(jit_compile=True)` (XLA). Batches are synthetic, built like
`mlm.step_bench.synthetic_batch` (same rule for lengths, padding and masked slots). The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np


def synthetic_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_length: int,
    max_predictions: int,
    vocab_size: int,
    real_fraction: float,
    masking_rate: float = 0.15,
) -> dict[str, np.ndarray]:
    """Random rows of n_r ~ U[S (2 f - 1), S] real tokens and round(rate n_r) masked slots.

    `mlm.step_bench.synthetic_batch` calls this one, so both sides time the same rows (this
    script may not import mlm).

    Returns:
      Model Garden's pretraining features (`next_sentence_labels` of shape [B, 1]).
    """
    low = max(2, math.ceil(seq_length * (2 * real_fraction - 1)))
    lengths = rng.integers(low, seq_length + 1, size=batch_size)
    positions = np.arange(seq_length)
    real = (positions[None, :] < lengths[:, None]).astype(np.int32)
    word_ids = rng.integers(5, vocab_size, size=(batch_size, seq_length), dtype=np.int32) * real
    word_ids[:, 0] = 2
    type_ids = ((positions[None, :] >= lengths[:, None] // 2) * real).astype(np.int32)
    masked_positions = np.zeros((batch_size, max_predictions), np.int32)
    weights = np.zeros((batch_size, max_predictions), np.float32)
    for row, length in enumerate(lengths):
        count = min(max_predictions, max(1, round(masking_rate * length)))
        chosen = np.sort(rng.choice(np.arange(1, length), size=count, replace=False))
        masked_positions[row, :count] = chosen
        weights[row, :count] = 1.0
    return {
        "input_word_ids": word_ids,
        "input_mask": real,
        "input_type_ids": type_ids,
        "masked_lm_positions": masked_positions,
        "masked_lm_ids": (
            rng.integers(5, vocab_size, size=(batch_size, max_predictions)) * (weights > 0)
        ).astype(np.int32),
        "masked_lm_weights": weights,
        "next_sentence_labels": rng.integers(0, 2, size=(batch_size, 1), dtype=np.int32),
    }


def build(args: argparse.Namespace):
    """Builds Model Garden's task, model, optimizer and metrics for the reference model.

    Returns:
      (task, model, optimizer, metrics).
    """
    import tensorflow_models as tfm
    from official.nlp.configs import bert, encoders
    from official.nlp.data import pretrain_dataloader
    from official.nlp.tasks import masked_lm

    encoder = encoders.EncoderConfig(
        type="bert",
        bert=encoders.BertEncoderConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            intermediate_size=args.intermediate_size,
            dropout_rate=args.dropout_rate,
            attention_dropout_rate=args.attention_dropout_rate,
        ),
    )
    heads = [
        bert.ClsHeadConfig(
            inner_dim=args.hidden_size,
            num_classes=2,
            dropout_rate=args.dropout_rate,
            name="next_sentence",
        )
    ]
    task_config = masked_lm.MaskedLMConfig(
        model=bert.PretrainerConfig(encoder=encoder, cls_heads=heads if args.next_sentence else []),
        train_data=pretrain_dataloader.BertPretrainDataConfig(
            seq_length=args.seq_length,
            max_predictions_per_seq=args.max_predictions,
            use_next_sentence_label=bool(args.next_sentence),
        ),
    )
    task = masked_lm.MaskedLMTask(task_config)
    model = task.build_model()
    optimizer_config = tfm.optimization.OptimizationConfig(
        {
            "optimizer": {
                "type": "adamw",
                "adamw": {
                    "weight_decay_rate": 0.01,
                    "exclude_from_weight_decay": ["LayerNorm", "layer_norm", "bias"],
                    "epsilon": 1e-6,
                    "gradient_clip_norm": 1.0,
                },
            },
            "learning_rate": {
                "type": "polynomial",
                "polynomial": {
                    "initial_learning_rate": 1e-4,
                    "decay_steps": 1_000_000,
                    "end_learning_rate": 0.0,
                },
            },
            "warmup": {"type": "polynomial", "polynomial": {"warmup_steps": 100}},
        }
    )
    factory = tfm.optimization.OptimizerFactory(optimizer_config)
    optimizer = factory.build_optimizer(factory.build_learning_rate())
    return task, model, optimizer, task.build_metrics(training=True)


def main() -> None:
    """Parses the flags, compiles the step, times it and prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (
        ("vocab_size", 30522),
        ("hidden_size", 256),
        ("num_layers", 4),
        ("num_heads", 4),
        ("intermediate_size", 1024),
        ("seq_length", 128),
        ("batch_size", 32),
        ("max_predictions", 20),
        ("steps", 20),
        ("warmup", 3),
        ("num_batches", 4),
        ("seed", 42),
        ("next_sentence", 1),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (
        ("real_fraction", 0.94),
        ("masking_rate", 0.15),
        ("dropout_rate", 0.1),
        ("attention_dropout_rate", 0.1),
    ):
        parser.add_argument(f"--{name}", type=float, default=default)
    args = parser.parse_args()

    import tensorflow as tf

    tf.random.set_seed(args.seed)
    task, model, optimizer, metrics = build(args)
    rng = np.random.default_rng(args.seed)
    host_batches = [
        synthetic_batch(
            rng,
            args.batch_size,
            args.seq_length,
            args.max_predictions,
            args.vocab_size,
            args.real_fraction,
            args.masking_rate,
        )
        for _ in range(args.num_batches)
    ]
    if not args.next_sentence:
        for batch in host_batches:
            del batch["next_sentence_labels"]
    batches = [{k: tf.constant(v) for k, v in batch.items()} for batch in host_batches]
    real_tokens = [int(batch["input_mask"].sum()) for batch in host_batches]

    @tf.function(jit_compile=True)
    def train_step(inputs):
        return task.train_step(inputs, model, optimizer, metrics)

    start = time.perf_counter()
    train_step(batches[0])[task.loss].numpy()  # Tracing, XLA compilation and the first step.
    compile_s = time.perf_counter() - start
    for index in range(args.warmup):
        train_step(batches[(index + 1) % args.num_batches])[task.loss].numpy()
    times = []
    for index in range(args.steps):
        batch = batches[index % args.num_batches]
        start = time.perf_counter()
        train_step(batch)[task.loss].numpy()
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    print(
        json.dumps(
            dict(
                framework="tf-models-official " + _version(),
                tensorflow=tf.__version__,
                params=int(sum(np.prod(v.shape) for v in model.trainable_variables)),
                batch_size=args.batch_size,
                seq_length=args.seq_length,
                real_token_fraction=sum(real_tokens)
                / (len(real_tokens) * host_batches[0]["input_mask"].size),
                steps=args.steps,
                compile_s=compile_s,
                step_time_s=step_time,
                step_time_min_s=min(times),
                tokens_per_s=statistics.mean(real_tokens) / step_time,
            )
        )
    )


def _version() -> str:
    from importlib import metadata

    return metadata.version("tf-models-official")


if __name__ == "__main__":
    main()
