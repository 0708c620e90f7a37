"""ModernBERT-base pretraining: Hugging Face's ModernBERT-base sizes, the paper's main settings.

22 pre-LN layers of width 768 without biases, GeGLU feed-forward of width 1152, rotary
positions (base 160,000 in the global layers, 10,000 in the local ones), every third layer
global and the others attending within 128 tokens; 30% masking, no pair task, AdamW at 8e-4
with weight decay 1e-5 at seq 1024. The paper's StableAdamW, warmup-stable-decay schedule and
batch-size warmup are not reproduced: a cosine decay after the warmup stands in.

Run:
  python -m mlm.train --config configs/modernbert_base.py --workdir /tmp/modernbert_base \
      --config.data.train_files='corpus/train/*.txt' --config.data.eval_files='corpus/eval/*.txt'
"""

import ml_collections

from mlm.config import base_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the ModernBERT-base config."""
    config = base_config()
    config.model.encoder = "modernbert"
    config.model.vocab_size = 50368
    config.model.hidden_size = 768
    config.model.num_layers = 22
    config.model.num_heads = 12
    config.model.intermediate_size = 1152
    config.model.max_position_embeddings = 8192
    config.model.activation = "gelu"
    config.model.dropout_rate = 0.0
    config.model.attention_dropout_rate = 0.0
    config.model.modernbert.update(
        global_attn_every_n_layers=3,
        local_attention=128,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        norm_eps=1e-5,
    )

    config.data.seq_length = 1024
    config.data.masking_rate = 0.3
    config.data.max_predictions_per_seq = 320
    config.data.use_next_sentence_label = False

    config.train.global_batch_size = 512
    config.train.num_steps = 200_000

    config.optimizer.learning_rate = 8e-4
    config.optimizer.weight_decay = 1e-5
    config.optimizer.warmup_steps = 3000
    config.optimizer.schedule = "cosine"
    return config
