"""BERT-tiny (Turc et al. 2019) pretraining: BERT phase-1 recipe (seq 128, batch 256, lr 1e-4, NSP).

Run:
  python -m mlm.train --config configs/bert_tiny.py --workdir /tmp/bert_tiny \
      --config.data.train_files='corpus/train/*.txt' --config.data.eval_files='corpus/eval/*.txt'
"""

import ml_collections

from mlm.config import sized_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the BERT-tiny config."""
    return sized_config("tiny")
