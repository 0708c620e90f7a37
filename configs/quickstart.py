"""Quickstart: a small BERT pretrained on the built-in corpus in a few minutes on a laptop CPU.

The built-in corpus is the docstrings of Python's standard library (train and eval split by
module); a WordPiece vocab is trained on it and saved as WORKDIR/vocab.txt.

Run:
  python -m mlm.train --config configs/quickstart.py --workdir /tmp/mlm_quickstart
  python -m mlm.fill_mask --workdir /tmp/mlm_quickstart --text "Return the [MASK] of the list."
"""

import ml_collections

from mlm.config import base_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the quickstart config."""
    config = base_config()
    config.model.vocab_size = 8192
    config.model.hidden_size = 128
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.intermediate_size = 512
    config.model.max_position_embeddings = 128
    config.model.dropout_rate = 0.0  # a 2-layer model on 1 MB of text underfits: no dropout
    config.model.attention_dropout_rate = 0.0

    config.data.seq_length = 128
    config.data.max_predictions_per_seq = 20
    config.data.use_next_sentence_label = False
    config.data.whole_word_masking = False

    config.train.global_batch_size = 32
    config.train.num_steps = 2000
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.eval_steps = 20
    config.train.checkpoint_every = 500

    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 200
    config.optimizer.weight_decay = 0.01
    return config
