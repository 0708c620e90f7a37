"""Quickstart for ModernBERT: the quickstart's data and schedule with a small ModernBERT encoder.

Three pre-LN layers of width 128 without biases, GeGLU feed-forward, rotary positions; layer 0
attends globally and layers 1 and 2 within 64 tokens. Everything else is configs/quickstart.py,
so the two runs' eval figures compare the encoders.

Run:
  python -m mlm.train --config configs/modernbert_quickstart.py --workdir /tmp/mlm_modernbert
  python -m mlm.fill_mask --workdir /tmp/mlm_modernbert --text "Return the [MASK] of the list."
"""

import ml_collections
from mlm.configs import quickstart


def get_config() -> ml_collections.ConfigDict:
    """Returns the ModernBERT quickstart config."""
    config = quickstart.get_config()
    config.model.encoder = "modernbert"
    config.model.num_layers = 3
    config.model.intermediate_size = 256
    config.model.activation = "gelu"
    config.model.modernbert.update(global_attn_every_n_layers=3, local_attention=64)
    return config
