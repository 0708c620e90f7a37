"""The performance reference: the model TF Model Garden's MaskedLMTask is compared against.

BERT-mini dimensions (vocab 30522, 4 layers, hidden 256, 4 heads, intermediate 1024), seq 128,
batch 32, 20 predictions per row, float32, dropout 0.1, AdamW; with the next-sentence head, as
Model Garden's MaskedLMTask builds it by default (a 2-class `next_sentence` head).

Run:
  python -m mlm.bench step --config configs/bench_reference.py --steps 30 \
      [--model-garden-python PYTHON]
"""

import ml_collections

from mlm.config import sized_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the reference benchmark config."""
    config = sized_config("mini")
    config.data.seq_length = 128
    config.data.max_predictions_per_seq = 20
    config.data.use_next_sentence_label = True
    config.train.global_batch_size = 32
    config.optimizer.warmup_steps = 100
    return config
