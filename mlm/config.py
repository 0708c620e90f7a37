"""The config schema: every field `mlm` reads, its default, and validation with one-line errors.

Config files under `configs/` start from `base_config()` and change fields; `validate` then
checks the result against the schema (unknown fields, wrong types, bad values) before anything runs.
Reading config files and `--config` flags is `mlm.config_file`.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from typing import Any

import ml_collections

from mlm import heads
from mlm.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Feed-forward and MLM-head activations (Model Garden's hidden_activation / mlm_activation):
# GELU with the tanh approximation (original BERT, Model Garden) or the exact erf form (Hugging
# Face's "gelu"), ReLU, or SiLU (= swish).
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu")
# model.remat: per-block activation recomputation (mlm.model.REMAT_POLICIES).
REMAT_MODES = ("none", "full", "dots")
# model.encoder: the encoder architecture (mlm.task.build_model); each but BERT has its fields
# in the section of its name (model.albert, model.modernbert).
ENCODERS = ("bert", "albert", "modernbert")
# model.kernels (mlm.kernels.SETTINGS; kept here so the schema imports no JAX).
KERNEL_SETTINGS = ("auto", "cpu", "standard")
# optimizer.name (Model Garden's optimizer.type) and optimizer.schedule (its learning_rate.type).
OPTIMIZERS = ("adamw", "lamb", "sgd", "adafactor")
SCHEDULES = ("polynomial", "linear", "cosine", "constant", "inverse_sqrt")
MODES = ("train", "eval", "train_and_eval", "continuous_eval")
# train.best_metric_comp: which way train.best_metric is better; "" guesses by its name.
BEST_METRIC_COMPS = ("higher", "lower")
# Eval metrics a best checkpoint can be chosen by.
EVAL_METRICS = (
    "masked_lm_accuracy",
    "lm_example_loss",
    "validation_loss",
    "next_sentence_accuracy",
    "next_sentence_loss",
)


# The data fields that each select a data source (strings set, or the bool `synthetic` True);
# none set selects the built-in corpus.
DATA_SOURCE_FIELDS = (
    "train_files",
    "prepared_dir",
    "tfds_name",
    "hf_dataset",
    "tfrecord_files",
    "synthetic",
)


def base_config() -> ml_collections.ConfigDict:
    """Returns the full schema with BERT-base defaults; config files override fields of it.

    Returns:
      An unlocked ConfigDict with sections `model`, `data`, `train`, `mesh`, `optimizer` and
      `privacy`.
    """
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict(
        dict(
            # The encoder: "bert" (BERT / Model Garden's BertEncoderV2), "albert" (factorised
            # embeddings of model.embedding_size, layers shared in model.albert groups) or
            # "modernbert" (Hugging Face's ModernBERT: rotary positions, GeGLU, pre-LN without
            # biases, alternating local and global attention; fields in model.modernbert).
            encoder="bert",
            vocab_size=30522,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            type_vocab_size=2,
            dropout_rate=0.1,
            attention_dropout_rate=0.1,
            # Compute dtype (params stay float32): float32, bfloat16, or float16 with dynamic
            # loss scaling (optimizer.loss_scale_*).
            dtype="float32",
            # The feed-forward activation (Model Garden's hidden_activation): "gelu_tanh"
            # (original BERT), "gelu" (exact erf; Hugging Face BERT checkpoints), "relu", "silu".
            activation="gelu_tanh",
            # Model Garden's BertEncoderConfig / BertPretrainerConfig fields of the same names
            # (docs/reference.md): word-embedding width, factorised as in ALBERT (0: hidden_size);
            # pre-LN blocks; the truncated-normal stddev of the encoder's weights and of the
            # masked-LM head's dense layer; the head's activation ("": model.activation).
            embedding_size=0,
            norm_first=False,
            initializer_range=0.02,
            mlm_activation="",
            mlm_initializer_range=0.02,
            # Recompute each transformer block's activations in the backward pass to save
            # memory (long sequences): 'none', 'full' (keep only block inputs) or 'dots'
            # (keep matmul outputs). Same values and gradients, more compute.
            remat="none",
            # Backend kernels (mlm.kernels): 'auto' picks them from the platform of the devices
            # the step is compiled for ('cpu' on CPU, 'standard' on GPU / TPU); 'cpu' or
            # 'standard' force a set. Same parameters and function either way.
            kernels="auto",
            # Classification heads on the pooled [CLS] token (Model Garden's cls_heads), a list
            # of dicts with name, num_classes, inner_dim (0: hidden_size), activation ('tanh'),
            # dropout_rate (0.0), cls_token_idx (0) (mlm.heads). The head named next_sentence
            # trains on next_sentence_labels; another head NAME on the TFRecord feature
            # NAME_labels. Empty: the next-sentence head alone when data.use_next_sentence_label.
            cls_heads=[],
            # ALBERT (model.encoder="albert"; Hugging Face's AlbertConfig names): the layers
            # share num_hidden_groups parameter sets, layer i using set i * groups // num_layers.
            albert=ml_collections.ConfigDict(dict(num_hidden_groups=1)),
            # ModernBERT (model.encoder="modernbert"; Hugging Face's ModernBertConfig names):
            # layer i attends globally iff i % global_attn_every_n_layers == 0, the others
            # within a window of local_attention tokens (local_attention // 2 each side); the
            # rotary bases of global and local layers; the LayerNorm epsilon. intermediate_size
            # is the GeGLU width.
            modernbert=ml_collections.ConfigDict(
                dict(
                    global_attn_every_n_layers=3,
                    local_attention=128,
                    global_rope_theta=160000.0,
                    local_rope_theta=10000.0,
                    norm_eps=1e-5,
                )
            ),
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            # Where the data comes from: set at most one of train_files, prepared_dir, tfds_name,
            # hf_dataset and tfrecord_files, or synthetic=True; none: the built-in corpus (Python
            # standard library docstrings).
            # Comma-separated globs of text files, one sentence per line, blank line between
            # documents.
            train_files="",
            eval_files="",
            # The output directory of `python -m mlm.data.prepare` (token ids, its own vocab).
            prepared_dir="",
            # A TFDS dataset already prepared in tfds_data_dir (e.g. 'wikipedia/20230601.en'),
            # its splits (tfds_eval_split empty: no evaluation) and the text feature.
            tfds_name="",
            tfds_split="train",
            tfds_eval_split="",
            tfds_data_dir="",
            # A Hugging Face `datasets` dataset, read locally (nothing is downloaded): a
            # save_to_disk directory, a directory or glob of Parquet / JSON lines / Arrow files,
            # or a Hub name ('ORG/NAME[:CONFIG]') in the local cache; its splits, as split
            # expressions ('train[:99%]'; hf_eval_split empty: no evaluation).
            hf_dataset="",
            hf_split="train",
            hf_eval_split="",
            # The text feature (TFDS) or string column (Hugging Face) holding each document.
            text_field="text",
            # Comma-separated globs of Model Garden / BERT pretraining TFRecords (masked already).
            tfrecord_files="",
            eval_tfrecord_files="",
            # Read each record's position_ids feature (Model Garden's use_position_id) instead
            # of positions 0..seq_length-1; TFRecords only (the other sources make their own).
            use_position_id=False,
            # Random batches of the configured shapes (mlm.data.synthetic): no vocab, no files;
            # what `mlm.bench step` times. To check a new machine's throughput end to end.
            synthetic=False,
            # A BERT vocab.txt; empty: train a WordPiece vocab of model.vocab_size on train_files.
            vocab_file="",
            lowercase=True,
            seq_length=128,
            max_predictions_per_seq=20,
            masking_rate=0.15,
            whole_word_masking=False,
            use_next_sentence_label=True,
            short_seq_prob=0.1,
            # Input worker processes (grain mp_prefetch); 0: the pipeline runs in the trainer.
            # Two or more change which rows meet in a batch, so a run keeps its value.
            num_workers=0,
            # Batches a background thread keeps ready while the device computes; 0: none.
            prefetch_batches=2,
            # Input shards: each global batch is the concatenation, in order, of one part per
            # shard, and the processes split the shards between them. 0: one per process. Fix
            # it (to a multiple of every process count) for batches that do not depend on the
            # number of hosts.
            input_shards=0,
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            global_batch_size=256,
            num_steps=1_000_000,
            log_every=100,
            eval_every=10_000,
            eval_steps=100,
            checkpoint_every=10_000,
            keep_checkpoints=3,
            # Start a new run from another run's checkpoint (Model Garden's init_checkpoint): an
            # mlm workdir (its latest step), its checkpoints/ directory or one checkpoints/STEP.
            # Ignored once this workdir has checkpoints of its own (the run resumes from those).
            init_checkpoint="",
            # Also copy the optimizer state (moments); it must have exactly this run's structure.
            init_optimizer=False,
            # The eval metric whose best step is kept in WORKDIR/checkpoints_best (names with
            # "loss" are better lower); empty: none.
            best_metric="masked_lm_accuracy",
            # Which way train.best_metric is better (Model Garden's best_checkpoint_metric_comp):
            # "higher" or "lower"; empty: lower for names with "loss", else higher.
            best_metric_comp="",
            # --mode continuous_eval stops when no new checkpoint has appeared for this many
            # seconds (Model Garden's eval timeout); 0: waits for train.num_steps however long.
            continuous_eval_timeout_s=3600.0,
            # Non-finite updates are skipped; this many in a row stop the run (divergence).
            max_consecutive_skips=5,
            # Recovery from loss blow-ups (Model Garden's trainer fields of the same names): a
            # step whose loss is not finite or above loss_upper_bound, from step
            # recovery_begin_steps on, restores the latest checkpoint and skips the batches up to
            # the bad one; at most recovery_max_trials times per run (0: off).
            loss_upper_bound=1e6,
            recovery_begin_steps=0,
            recovery_max_trials=0,
            seed=42,
            # Also report the train and eval scalars and the config to Weights & Biases (the
            # wandb extra; process 0 only); empty: off. WANDB_MODE=offline keeps it local.
            wandb_project="",
            # The W&B run's display name; empty: W&B picks one.
            wandb_run_name="",
        )
    )
    config.mesh = ml_collections.ConfigDict(
        dict(
            # Devices on each mesh axis; -1: all remaining devices. The batch is split over both
            # axes; large parameters and their optimizer state are split over `fsdp`.
            data=-1,
            fsdp=1,
            # Arrays with fewer elements than this stay replicated under FSDP.
            fsdp_min_size=2**16,
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            # adamw, lamb, sgd or adafactor.
            name="adamw",
            learning_rate=1e-4,
            warmup_steps=10_000,
            # After the linear warmup: polynomial, linear, cosine, constant or inverse_sqrt.
            schedule="polynomial",
            end_learning_rate=0.0,
            power=1.0,
            weight_decay=0.01,
            clip_norm=1.0,
            # adamw and lamb only.
            b1=0.9,
            b2=0.999,
            eps=1e-6,
            # sgd only.
            momentum=0.9,
            nesterov=False,
            grad_accum_steps=1,
            # Exponential moving average of the params (ema = d * ema + (1 - d) * params after
            # each applied update), used for eval and fill_mask; 0: off.
            ema_decay=0.0,
            # model.dtype=float16 only: 0 for dynamic loss scaling, or a fixed loss scale (>= 1)
            # that never changes (a non-finite step is skipped and counts as a divergence).
            loss_scale=0.0,
            # Dynamic scaling: the initial loss scale, and the finite steps in a row after which
            # it doubles (a non-finite step halves it and is skipped).
            loss_scale_init=2.0**15,
            loss_scale_growth_steps=2000,
        )
    )
    config.privacy = ml_collections.ConfigDict(
        dict(
            # DP-SGD: per-row gradients clipped to l2_clip, Gaussian noise of
            # noise_multiplier * l2_clip added once per step; epsilon at delta is logged.
            enabled=False,
            l2_clip=1.0,
            noise_multiplier=1.0,
            delta=1e-5,
            # Rows (model examples) in the training set, N in the sampling rate
            # q = train.global_batch_size / N; required when enabled (0: unknown).
            num_examples=0,
        )
    )
    return config


# (num_layers, hidden_size, num_heads): BERT (Devlin et al. 2018) and the compact models of
# Turc et al. 2019 ("Well-Read Students Learn Better"); intermediate_size is 4 * hidden_size.
MODEL_SIZES = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def sized_config(size: str) -> ml_collections.ConfigDict:
    """Returns `base_config()` with the model dimensions of a named BERT size.

    Args:
      size: one of MODEL_SIZES ('tiny', 'mini', 'small', 'medium', 'base', 'large').

    Returns:
      The config; training fields keep BERT's phase-1 recipe (seq 128, batch 256, lr 1e-4).
    """
    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size '{size}'; use one of {', '.join(MODEL_SIZES)}")
    num_layers, hidden_size, num_heads = MODEL_SIZES[size]
    config = base_config()
    config.model.num_layers = num_layers
    config.model.hidden_size = hidden_size
    config.model.num_heads = num_heads
    config.model.intermediate_size = 4 * hidden_size
    return config


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """Flattens a ConfigDict into {'section.field': value}."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(leaves(value, name + "."))
        else:
            flat[name] = value
    return flat


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """Returns ' (did you mean X?)' for the closest known field name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_schema(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for fields the schema does not have or values of the wrong type."""
    schema = leaves(base_config())
    given = leaves(config)
    for name, value in given.items():
        if name not in schema:
            raise ConfigError(
                f"unknown config field '{name}'{did_you_mean(name, schema)}; the fields are"
                " listed in docs/reference.md 'Config reference'"
            )
        expected = type(schema[name])
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                f"config field '{name}' must be {expected.__name__}, got {value!r} "
                f"({type(value).__name__}); fix the value in the config file or the override"
            )
    missing = sorted(set(schema) - set(given))
    if missing:
        raise ConfigError(
            f"config is missing field '{missing[0]}'; start config files from"
            " mlm.config.base_config()"
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_encoder(model: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for `model.encoder` and its section's values that cannot work."""
    _require(
        model.encoder in ENCODERS,
        f"model.encoder must be one of {', '.join(ENCODERS)}, got '{model.encoder}'",
    )
    groups = model.albert.num_hidden_groups
    _require(
        groups >= 1 and model.num_layers % groups == 0,
        f"model.albert.num_hidden_groups ({groups}) must be >= 1 and divide model.num_layers "
        f"({model.num_layers})",
    )
    _require(
        model.encoder != "albert" or not model.norm_first,
        "model.norm_first is set but ALBERT's blocks are post-LN; clear model.norm_first",
    )
    modern = model.modernbert
    _require(
        modern.global_attn_every_n_layers >= 1,
        "model.modernbert.global_attn_every_n_layers must be >= 1, got "
        f"{modern.global_attn_every_n_layers}",
    )
    _require(
        modern.local_attention >= 2 and modern.local_attention % 2 == 0,
        "model.modernbert.local_attention must be an even number >= 2 (the window spans "
        f"local_attention // 2 tokens each side), got {modern.local_attention}",
    )
    for name in ("global_rope_theta", "local_rope_theta", "norm_eps"):
        _require(modern[name] > 0, f"model.modernbert.{name} must be positive, got {modern[name]}")
    if model.encoder == "modernbert":
        for name, value in (("norm_first", False), ("embedding_size", 0)):
            _require(
                model[name] == value,
                f"model.{name} is set but ModernBERT has no such option (its blocks are pre-LN, "
                f"its embeddings hidden_size wide); clear model.{name}",
            )


def _check_values(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for values that are of the right type but cannot work."""
    model, data, train, opt = config.model, config.data, config.train, config.optimizer
    _check_encoder(model)
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "intermediate_size",
        "type_vocab_size",
    ):
        _require(model[name] > 0, f"model.{name} must be positive, got {model[name]}")
    _require(
        model.hidden_size % model.num_heads == 0,
        f"model.hidden_size ({model.hidden_size}) must be divisible by model.num_heads "
        f"({model.num_heads})",
    )
    _require(
        model.dtype in COMPUTE_DTYPES,
        f"model.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got '{model.dtype}'",
    )
    _require(
        model.activation in ACTIVATIONS,
        f"model.activation must be one of {', '.join(ACTIVATIONS)}, got '{model.activation}'",
    )
    _require(
        model.mlm_activation in ("", *ACTIVATIONS),
        f"model.mlm_activation must be one of {', '.join(ACTIVATIONS)} (or empty: "
        f"model.activation), got '{model.mlm_activation}'",
    )
    _require(
        model.embedding_size >= 0,
        f"model.embedding_size must be >= 0 (0: model.hidden_size), got {model.embedding_size}",
    )
    for name in ("initializer_range", "mlm_initializer_range"):
        _require(model[name] > 0, f"model.{name} must be positive, got {model[name]}")
    _require(
        model.remat in REMAT_MODES,
        f"model.remat must be one of {', '.join(REMAT_MODES)}, got '{model.remat}'",
    )
    _require(
        model.kernels in KERNEL_SETTINGS,
        f"model.kernels must be one of {', '.join(KERNEL_SETTINGS)}, got '{model.kernels}'",
    )
    for name in ("dropout_rate", "attention_dropout_rate"):
        _require(0.0 <= model[name] < 1.0, f"model.{name} must be in [0, 1), got {model[name]}")
    _require(
        8 <= data.seq_length <= model.max_position_embeddings,
        f"data.seq_length ({data.seq_length}) must be between 8 and "
        f"model.max_position_embeddings ({model.max_position_embeddings})",
    )
    _require(
        1 <= data.max_predictions_per_seq <= data.seq_length,
        f"data.max_predictions_per_seq ({data.max_predictions_per_seq}) must be between 1 and "
        f"data.seq_length ({data.seq_length})",
    )
    _require(
        0.0 < data.masking_rate < 1.0,
        f"data.masking_rate must be in (0, 1), got {data.masking_rate}",
    )
    _require(
        0.0 <= data.short_seq_prob <= 1.0,
        f"data.short_seq_prob must be in [0, 1], got {data.short_seq_prob}",
    )
    _require(
        not data.use_next_sentence_label or model.type_vocab_size >= 2,
        "data.use_next_sentence_label needs model.type_vocab_size >= 2, got "
        f"{model.type_vocab_size}",
    )
    head_problems = heads.check(
        model.cls_heads,
        seq_length=data.seq_length,
        use_next_sentence=data.use_next_sentence_label,
        tfrecords=bool(data.tfrecord_files),
    )
    _require(not head_problems, head_problems[0] if head_problems else "")
    sources = [name for name in DATA_SOURCE_FIELDS if data[name]]
    if len(sources) > 1:
        raise ConfigError(
            f"data.{sources[0]} and data.{sources[1]} are both set; set one data source "
            f"({', '.join(DATA_SOURCE_FIELDS)}), or none for the built-in corpus"
        )
    _require(
        not (data.prepared_dir and data.vocab_file),
        "data.vocab_file is set but data.prepared_dir brings its own vocab.txt; clear "
        "data.vocab_file (the ids in the prepared files were made with the prepared vocab)",
    )
    _require(
        not data.use_position_id or bool(data.tfrecord_files),
        "data.use_position_id reads the position_ids of data.tfrecord_files, which is not set; "
        "clear data.use_position_id (the other sources make their own position_ids)",
    )
    _require(
        not (data.synthetic and data.vocab_file),
        "data.vocab_file is set but data.synthetic makes random ids and uses no vocab; clear "
        "data.vocab_file (or set data.synthetic=False to train on real data)",
    )
    _require(
        not data.synthetic or model.vocab_size > 5,
        f"data.synthetic needs model.vocab_size > 5 (ids 0-4 are special tokens), got "
        f"{model.vocab_size}; raise model.vocab_size",
    )
    for source, eval_field in (
        ("train_files", "eval_files"),
        ("tfds_name", "tfds_eval_split"),
        ("hf_dataset", "hf_eval_split"),
        ("tfrecord_files", "eval_tfrecord_files"),
    ):
        _require(
            not data[eval_field] or data[source],
            f"data.{eval_field} is set but data.{source} is empty; set both (or neither)",
        )
    for name in ("data", "fsdp"):
        size = config.mesh[name]
        _require(
            size == -1 or size >= 1,
            f"mesh.{name} must be >= 1 or -1 (all remaining devices), got {size}",
        )
    _require(
        config.mesh.data != -1 or config.mesh.fsdp != -1,
        "mesh.data and mesh.fsdp are both -1; set one of them to a size",
    )
    _require(config.mesh.fsdp_min_size >= 0, "mesh.fsdp_min_size must be >= 0")
    for name in ("num_workers", "prefetch_batches", "input_shards"):
        _require(data[name] >= 0, f"data.{name} must be >= 0, got {data[name]}")
    for name in ("global_batch_size", "num_steps", "log_every", "checkpoint_every"):
        _require(train[name] > 0, f"train.{name} must be positive, got {train[name]}")
    eval_metrics = (*EVAL_METRICS, *heads.metric_names(model.cls_heads))
    _require(
        train.best_metric in ("", *eval_metrics),
        f"train.best_metric must be one of {', '.join(eval_metrics)} (or empty), got "
        f"'{train.best_metric}'",
    )
    _require(
        data.use_next_sentence_label or not train.best_metric.startswith("next_sentence"),
        f"train.best_metric '{train.best_metric}' needs data.use_next_sentence_label=True (without "
        "it eval has no next-sentence metrics); pick masked_lm_accuracy, lm_example_loss or "
        "validation_loss, or set data.use_next_sentence_label=True",
    )
    _require(
        train.best_metric_comp in ("", *BEST_METRIC_COMPS),
        f"train.best_metric_comp must be one of {', '.join(BEST_METRIC_COMPS)} (or empty: by "
        f"the metric's name), got '{train.best_metric_comp}'",
    )
    _require(
        train.continuous_eval_timeout_s >= 0,
        f"train.continuous_eval_timeout_s must be >= 0 (0: no timeout), got "
        f"{train.continuous_eval_timeout_s}",
    )
    _require(
        0 <= train.seed < 2**32,
        f"train.seed must be in [0, 2**32) for grain's shuffle and jax.random.PRNGKey, got "
        f"{train.seed}",
    )
    _require(
        not train.init_optimizer or train.init_checkpoint,
        "train.init_optimizer needs train.init_checkpoint; set both or neither",
    )
    _require(
        train.max_consecutive_skips >= 1,
        f"train.max_consecutive_skips must be >= 1, got {train.max_consecutive_skips}",
    )
    _require(
        train.loss_upper_bound > 0,
        f"train.loss_upper_bound must be positive, got {train.loss_upper_bound}",
    )
    for name in ("recovery_begin_steps", "recovery_max_trials"):
        _require(train[name] >= 0, f"train.{name} must be >= 0, got {train[name]}")
    for name in ("eval_every", "eval_steps", "keep_checkpoints"):
        _require(train[name] >= 0, f"train.{name} must be >= 0, got {train[name]}")
    _require(
        opt.name in OPTIMIZERS,
        f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got '{opt.name}'",
    )
    _require(
        opt.schedule in SCHEDULES,
        f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got '{opt.schedule}'",
    )
    _require(opt.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {opt.learning_rate}")
    _require(opt.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
    _require(
        opt.grad_accum_steps >= 1,
        f"optimizer.grad_accum_steps must be >= 1, got {opt.grad_accum_steps}",
    )
    _require(
        train.global_batch_size % opt.grad_accum_steps == 0,
        f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
        f"optimizer.grad_accum_steps ({opt.grad_accum_steps})",
    )
    _check_batch_split(config)
    for name in ("b1", "b2", "momentum"):
        _require(0.0 <= opt[name] < 1.0, f"optimizer.{name} must be in [0, 1), got {opt[name]}")
    for name in ("end_learning_rate", "weight_decay", "clip_norm", "eps"):
        _require(
            opt[name] >= 0.0,
            f"optimizer.{name} must be >= 0"
            f"{' (0: no clipping)' if name == 'clip_norm' else ''}, got {opt[name]}",
        )
    _require(
        0.0 <= opt.ema_decay < 1.0,
        f"optimizer.ema_decay must be in [0, 1) (0: no EMA), got {opt.ema_decay}",
    )
    _require(
        opt.loss_scale == 0.0 or opt.loss_scale >= 1.0,
        f"optimizer.loss_scale must be 0 (dynamic) or >= 1 (fixed), got {opt.loss_scale}",
    )
    _require(
        opt.loss_scale_init >= 1.0,
        f"optimizer.loss_scale_init must be >= 1, got {opt.loss_scale_init}",
    )
    _require(
        opt.loss_scale_growth_steps >= 1,
        f"optimizer.loss_scale_growth_steps must be >= 1, got {opt.loss_scale_growth_steps}",
    )
    _check_privacy(config.privacy, train.global_batch_size)


def _check_batch_split(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for a global batch the fixed mesh or input shards cannot split.

    `mlm.parallel.check_batch_size` and `mlm.data.inputs.input_shards` check the same once the
    device and process counts are known; the sizes the config fixes are checked here, before
    any workdir is made.
    """
    batch, accum = config.train.global_batch_size, config.optimizer.grad_accum_steps
    shards = config.data.input_shards
    _require(
        not shards or batch % shards == 0,
        f"train.global_batch_size ({batch}) must be divisible by data.input_shards ({shards}); "
        "change one of them",
    )
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if data != -1 and fsdp != -1:
        _require(
            batch % (data * fsdp * accum) == 0,
            f"train.global_batch_size ({batch}) must be divisible by the number of devices "
            f"(mesh.data {data} x mesh.fsdp {fsdp}) x optimizer.grad_accum_steps ({accum}); "
            "change the batch size or the accumulation steps",
        )


def _check_privacy(privacy: ml_collections.ConfigDict, global_batch_size: int) -> None:
    """Raises ConfigError for privacy values that cannot work (checked only when enabled)."""
    if not privacy.enabled:
        return
    _require(privacy.l2_clip > 0, f"privacy.l2_clip must be > 0, got {privacy.l2_clip}")
    _require(
        privacy.noise_multiplier > 0,
        f"privacy.noise_multiplier must be > 0, got {privacy.noise_multiplier}",
    )
    _require(0.0 < privacy.delta < 1.0, f"privacy.delta must be in (0, 1), got {privacy.delta}")
    _require(
        privacy.num_examples > 0,
        "privacy.enabled needs privacy.num_examples (rows in the training set, for the sampling "
        "rate); set --config.privacy.num_examples=N",
    )
    _require(
        privacy.num_examples >= global_batch_size,
        f"privacy.num_examples ({privacy.num_examples}) must be >= train.global_batch_size "
        f"({global_batch_size})",
    )


# Int fields go to the device (steps, sizes, ids) or meet values that do, as int32.
INT32_MAX = 2**31 - 1
# The fields that may go higher: (largest value or None for no limit, why).
_INT_LIMITS = {
    "train.seed": (2**32 - 1, "grain's shuffle and jax.random.PRNGKey take 32-bit seeds"),
    "mesh.fsdp_min_size": (None, ""),  # Compared with array sizes on the host.
    "privacy.num_examples": (None, ""),  # Host-side accounting only.
}


def check_number(name: str, value: Any) -> None:
    """Raises ConfigError for a float field that is not finite or an int field out of range."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(
            f"config field '{name}' must be a finite number, got {value}; fix the value in the "
            "config file or the override"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        limit, why = _INT_LIMITS.get(name, (INT32_MAX, "steps, sizes and ids are int32"))
        if limit is not None and value > limit:
            raise ConfigError(
                f"config field '{name}' must be at most {limit} ({why}), got {value}; fix the "
                "value in the config file or the override"
            )


def _int_to_float(name: str, value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(
            f"config field '{name}' must be a finite number, got an int of {len(str(value))} "
            "digits; fix the value in the config file or the override"
        ) from None


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a config against the schema and returns it locked.

    Args:
      config: a config built from `base_config()`.

    Returns:
      The same config, locked so later typos in attribute access fail loudly.

    Raises:
      ConfigError: with a one-line message naming the field and the fix.
    """
    _check_schema(config)
    schema = leaves(base_config())
    for name, value in leaves(config).items():
        if type(schema[name]) is float and isinstance(value, int):
            value = _int_to_float(name, value)
            *path, field = name.split(".")
            section = config
            for key in path:
                section = section[key]
            with config.unlocked():
                section[field] = value
        check_number(name, value)
    _check_values(config)
    config.lock()
    return config


def warnings_for(config: ml_collections.ConfigDict) -> list[str]:
    """What a valid config does that its author may not expect, one line each.

    Args:
      config: a validated config.

    Returns:
      Lines to show before the run starts (empty when there is nothing to say).
    """
    found = []
    opt, num_steps = config.optimizer, config.train.num_steps
    if opt.warmup_steps > num_steps:
        reached = opt.learning_rate * num_steps / opt.warmup_steps
        found.append(
            f"optimizer.warmup_steps ({opt.warmup_steps}) is more than train.num_steps "
            f"({num_steps}): the run ends in its warmup, at learning rate {reached:.3g} "
            f"({num_steps / opt.warmup_steps:.0%} of optimizer.learning_rate); lower "
            "optimizer.warmup_steps for a full schedule"
        )
    if opt.loss_scale > 0 and config.model.dtype != "float16":
        found.append(
            f"optimizer.loss_scale ({opt.loss_scale:g}) is used only with model.dtype=float16; "
            f"this {config.model.dtype} run has no loss scaling"
        )
    return found


def to_json(config: ml_collections.ConfigDict) -> str:
    """Serialises a config as stable, indented JSON (the workdir's config.json)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"


def _read_subsection(section: ml_collections.ConfigDict, name: str, fields: Any) -> None:
    """Sets a nested section's fields (e.g. model.modernbert) from config.json's object."""
    if not isinstance(fields, dict):
        raise ConfigError(
            f"config.json: '{name}' must be an object of fields, got {fields!r}; fix config.json"
        )
    for field, value in fields.items():
        if isinstance(section.get(field), float) and isinstance(value, int):
            if isinstance(value, bool):
                raise ConfigError(
                    f"config field '{name}.{field}' must be float, got {value!r}; fix config.json"
                )
            value = _int_to_float(f"{name}.{field}", value)
        try:
            with section.unlocked():
                section[field] = value
        except TypeError:
            expected = type(section[field]).__name__
            raise ConfigError(
                f"config field '{name}.{field}' must be {expected}, got {value!r}; fix config.json"
            ) from None


def from_json(text: str) -> ml_collections.ConfigDict:
    """Reads a config written by `to_json`, validating it against the current schema.

    Fields added to the schema after the file was written take their defaults.
    """
    config = base_config()
    try:
        sections = json.loads(text)
    except ValueError as error:
        raise ConfigError(
            f"config.json is not valid JSON ({error}); restore the run's config.json"
        ) from None
    if not isinstance(sections, dict):
        raise ConfigError(
            f"config.json holds a {type(sections).__name__}, not an object of config sections; "
            "restore the run's config.json"
        )
    for section, fields in sections.items():
        if section not in config:
            config[section] = fields  # Reported by validate() as an unknown field.
            continue
        if not isinstance(fields, dict):
            raise ConfigError(
                f"config.json: section '{section}' must be an object of fields, got {fields!r}; "
                "fix config.json"
            )
        for field, value in fields.items():
            if isinstance(config[section].get(field), ml_collections.ConfigDict):
                _read_subsection(config[section][field], f"{section}.{field}", value)
                continue
            if field in config[section] and isinstance(config[section][field], float):
                if isinstance(value, bool):  # ml_collections would take True as 1.0.
                    raise ConfigError(
                        f"config field '{section}.{field}' must be float, got {value!r}; fix "
                        "config.json"
                    )
                if isinstance(value, int):
                    value = _int_to_float(f"{section}.{field}", value)
            try:
                with config.unlocked():
                    config[section][field] = value
            except TypeError:
                expected = type(config[section][field]).__name__
                raise ConfigError(
                    f"config field '{section}.{field}' must be {expected}, got {value!r}; fix "
                    "config.json"
                ) from None
    return validate(config)
