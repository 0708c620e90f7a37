"""A Model Garden style BERT-base experiment: pre-LN, factorised embeddings, two [CLS] heads.

What Model Garden writes as `BertPretrainerConfig(encoder=BertEncoderConfig(norm_first=True,
embedding_size=128), cls_heads=[ClsHeadConfig(name='next_sentence', ...), ClsHeadConfig(
name='topic', num_classes=8, ...)])` with a cosine learning-rate schedule: the masked-LM loss
plus one loss per head, each head's metrics logged under its name (`next_sentence_accuracy`,
`topic_accuracy`). The `topic` head trains on an int64 `topic_labels` feature of the
pretraining TFRecords, so the data are TFRecords written with one.

Run:
  python -m mlm.train --config configs/bert_base_preln_two_heads.py --workdir /tmp/preln \
      --config.data.tfrecord_files='data/pretrain-*.tfrecord'
"""

import ml_collections

from mlm.config import sized_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the config."""
    config = sized_config("base")
    config.model.norm_first = True
    config.model.embedding_size = 128
    config.model.cls_heads = [
        dict(name="next_sentence", num_classes=2),
        dict(name="topic", num_classes=8, inner_dim=256, dropout_rate=0.1),
    ]
    config.data.tfrecord_files = "data/pretrain-*.tfrecord"
    config.data.use_next_sentence_label = True
    config.optimizer.schedule = "cosine"
    config.train.best_metric = "topic_accuracy"
    return config
