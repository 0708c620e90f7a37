"""BERT-medium pretraining (BERT phase-1 recipe: seq 128, batch 256, AdamW 1e-4, next-sentence on).

Run:
  python -m mlm.train --config configs/bert_medium.py --workdir /tmp/bert_medium \
      --config.data.train_files='corpus/train/*.txt' --config.data.eval_files='corpus/eval/*.txt'
"""

import ml_collections

from mlm.config import sized_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the BERT-medium config."""
    return sized_config("medium")
