"""TF Model Garden's `MaskedLMTask.train_step`, timed the way `mlm.step_bench` times ours.

A standalone script: it imports only tensorflow, tf-models-official, numpy and the standard
library (never `mlm`), so it runs in its own venv, and it lives outside the installed package.
`python -m mlm.bench step --config configs/bench_reference.py --model-garden-python PYTHON` runs
it as a subprocess on the same model, between the two halves of our timed steps:

  python3.11 -m venv .venv-tfm && .venv-tfm/bin/pip install tf-models-official==2.20.0
  python -m mlm.bench step --config configs/bench_reference.py \
      --model-garden-python .venv-tfm/bin/python

The batches are not made here: `--batches FILE` is an `.npz` holding Model Garden's pretraining
features, each array stacked over the batches ([N, B, S] ids and mask, [N, B, P] masked slots,
[N, B] next-sentence labels), which `mlm.step_bench.write_model_garden_batches` writes from the
very rows our step is timed on. Batch size, sequence length and predictions per row come from
their shapes.

The task is Model Garden's `MaskedLMTask` with its default next-sentence head (2 classes, tanh
pooler of width `hidden_size`, dropout 0.1); the model is its `BertPretrainerV2` (post-LN
`BertEncoder`); the optimizer is Model Garden's BERT pretraining one (`OptimizerFactory`:
`adamw` = AdamWeightDecay, weight decay 0.01 off LayerNorm and biases, global-norm clipping 1.0,
linear warmup then polynomial decay). `train_step` runs under `tf.function(jit_compile=True)`
(XLA). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

# The pretraining features Model Garden's MaskedLMTask reads (BertPretrainDataLoader's names).
FEATURES = (
    "input_word_ids",
    "input_mask",
    "input_type_ids",
    "masked_lm_positions",
    "masked_lm_ids",
    "masked_lm_weights",
    "next_sentence_labels",
)


def read_batches(path: str, next_sentence: bool) -> list[dict[str, np.ndarray]]:
    """Reads the batches of a `--batches` file as Model Garden's data loader yields them.

    Args:
      path: an `.npz` with every name of FEATURES, each stacked over the batches.
      next_sentence: keep `next_sentence_labels` (as [B, 1], Model Garden's shape); without the
        next-sentence head they are dropped.

    Returns:
      One dict of numpy arrays per batch.
    """
    with np.load(path) as arrays:
        missing = [name for name in FEATURES if name not in arrays.files]
        if missing:
            raise SystemExit(f"error: {path} lacks {', '.join(missing)}")
        stacked = {name: arrays[name] for name in FEATURES}
    batches = []
    for index in range(len(stacked["input_word_ids"])):
        batch = {name: array[index] for name, array in stacked.items()}
        labels = batch.pop("next_sentence_labels")
        if next_sentence:
            batch["next_sentence_labels"] = labels.reshape(-1, 1)
        batches.append(batch)
    return batches


def build(args: argparse.Namespace, seq_length: int, max_predictions: int):
    """Builds Model Garden's task, model, optimizer and metrics for the reference model.

    Args:
      args: the model's flags.
      seq_length, max_predictions: S and P of the batches.

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
            seq_length=seq_length,
            max_predictions_per_seq=max_predictions,
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
    parser.add_argument("--batches", required=True, help="the .npz of batches (see above)")
    for name, default in (
        ("vocab_size", 30522),
        ("hidden_size", 256),
        ("num_layers", 4),
        ("num_heads", 4),
        ("intermediate_size", 1024),
        ("steps", 20),
        ("warmup", 3),
        ("seed", 42),
        ("next_sentence", 1),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("dropout_rate", 0.1), ("attention_dropout_rate", 0.1)):
        parser.add_argument(f"--{name}", type=float, default=default)
    args = parser.parse_args()
    host_batches = read_batches(args.batches, bool(args.next_sentence))
    num_batches = len(host_batches)
    batch_size, seq_length = host_batches[0]["input_word_ids"].shape
    max_predictions = host_batches[0]["masked_lm_positions"].shape[1]

    import tensorflow as tf

    tf.random.set_seed(args.seed)
    task, model, optimizer, metrics = build(args, seq_length, max_predictions)
    batches = [{k: tf.constant(v) for k, v in batch.items()} for batch in host_batches]
    real_tokens = [int(batch["input_mask"].sum()) for batch in host_batches]

    @tf.function(jit_compile=True)
    def train_step(inputs):
        return task.train_step(inputs, model, optimizer, metrics)

    start = time.perf_counter()
    train_step(batches[0])[task.loss].numpy()  # Tracing, XLA compilation and the first step.
    compile_s = time.perf_counter() - start
    for index in range(args.warmup):
        train_step(batches[(index + 1) % num_batches])[task.loss].numpy()
    times = []
    for index in range(args.steps):
        batch = batches[index % num_batches]
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
                batch_size=int(batch_size),
                seq_length=int(seq_length),
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
