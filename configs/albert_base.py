"""ALBERT-base pretraining: Hugging Face's albert-base-v2 sizes with the ALBERT paper's recipe.

Factorised embeddings (128 wide, projected to 768), all 12 layers sharing one parameter set,
sentence-order prediction as the pair task (data.use_next_sentence_label with
model.encoder="albert"), LAMB at 0.00176 with batch 4096 at seq 512 for 125k steps, no dropout
(ALBERT v2). The paper's n-gram masking is not implemented: tokens (or whole words) are masked.

Run:
  python -m mlm.train --config configs/albert_base.py --workdir /tmp/albert_base \
      --config.data.train_files='corpus/train/*.txt' --config.data.eval_files='corpus/eval/*.txt'
"""

import ml_collections

from mlm.config import sized_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the ALBERT-base config."""
    config = sized_config("base")
    config.model.encoder = "albert"
    config.model.vocab_size = 30000
    config.model.embedding_size = 128
    config.model.albert.num_hidden_groups = 1
    config.model.dropout_rate = 0.0
    config.model.attention_dropout_rate = 0.0

    config.data.seq_length = 512
    config.data.max_predictions_per_seq = 20
    config.data.use_next_sentence_label = True

    config.train.global_batch_size = 4096
    config.train.num_steps = 125_000

    config.optimizer.name = "lamb"
    config.optimizer.learning_rate = 0.00176
    config.optimizer.warmup_steps = 3125
    return config
