"""Tests for mlm.config: the schema, validation errors and config.json."""

import glob
import json
import math
import os

import ml_collections
import pytest

from mlm import config as config_lib
from mlm import config_file as config_file_lib
from mlm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "path",
    sorted(
        path
        for path in glob.glob(os.path.join(ROOT, "configs", "*.py"))
        if not path.endswith("__init__.py")
    ),
)
def test_every_shipped_config_validates(path):
    config = config_lib.validate(config_file_lib.load_config_file(path))
    assert config.model.hidden_size % config.model.num_heads == 0
    assert config.is_locked


@pytest.mark.parametrize(
    "size,layers,hidden,heads",
    [("tiny", 2, 128, 2), ("mini", 4, 256, 4), ("base", 12, 768, 12), ("large", 24, 1024, 16)],
)
def test_sized_config_dimensions(size, layers, hidden, heads):
    model = config_lib.sized_config(size).model
    assert (model.num_layers, model.hidden_size, model.num_heads) == (layers, hidden, heads)
    assert model.intermediate_size == 4 * hidden


def test_unknown_field_names_it_and_suggests_the_right_one():
    config = config_lib.base_config()
    config.model.hiden_size = 3
    with pytest.raises(ConfigError, match=r"model\.hiden_size.*did you mean 'model\.hidden_size'"):
        config_lib.validate(config)


def test_wrong_type_is_reported_with_field_and_value():
    values = config_lib.base_config().to_dict()
    values["train"]["num_steps"] = "many"  # e.g. a hand-edited config.json
    config = ml_collections.ConfigDict(values)
    with pytest.raises(ConfigError, match=r"train\.num_steps.*must be int.*'many'"):
        config_lib.validate(config)


def test_bool_is_not_accepted_as_int():
    values = config_lib.base_config().to_dict()
    values["train"]["global_batch_size"] = True
    config = ml_collections.ConfigDict(values)
    with pytest.raises(ConfigError, match="global_batch_size"):
        config_lib.validate(config)


def test_int_for_float_field_is_converted():
    config = config_lib.base_config()
    config.optimizer.learning_rate = 1
    config = config_lib.validate(config)
    assert isinstance(config.optimizer.learning_rate, float)
    assert config.optimizer.learning_rate == 1.0


@pytest.mark.parametrize(
    "section,field,value,message",
    [
        ("model", "num_heads", 7, "divisible by model.num_heads"),
        ("model", "dtype", "float8", "model.dtype must be one of"),
        ("optimizer", "ema_decay", 1.0, "optimizer.ema_decay must be in"),
        ("optimizer", "loss_scale_init", 0.5, "optimizer.loss_scale_init must be >= 1"),
        ("model", "activation", "swish", "model.activation must be one of gelu_tanh, gelu, relu"),
        ("model", "mlm_activation", "tanh", r"model\.mlm_activation must be one of .* \(or empty"),
        ("model", "embedding_size", -1, r"model\.embedding_size must be >= 0 \(0: model\.hidden"),
        ("model", "initializer_range", 0.0, "model.initializer_range must be positive"),
        ("model", "mlm_initializer_range", -0.02, "model.mlm_initializer_range must be positive"),
        ("data", "seq_length", 1024, "max_position_embeddings"),
        ("data", "max_predictions_per_seq", 0, "max_predictions_per_seq"),
        ("data", "masking_rate", 1.5, "masking_rate"),
        ("optimizer", "name", "adam", "optimizer.name must be one of adamw, lamb, sgd, adafactor,"),
        (
            "optimizer",
            "schedule",
            "rsqrt",
            "optimizer.schedule must be one of polynomial, linear, cosine, constant, inverse_sqrt,",
        ),
        ("optimizer", "momentum", 1.0, r"optimizer\.momentum must be in \[0, 1\), got 1.0"),
        ("optimizer", "momentum", -0.1, r"optimizer\.momentum must be in \[0, 1\)"),
        ("optimizer", "loss_scale", -1.0, r"optimizer\.loss_scale must be 0 \(dynamic\) or >= 1"),
        ("optimizer", "loss_scale", 0.5, r"optimizer\.loss_scale must be 0 \(dynamic\) or >= 1"),
        ("optimizer", "grad_accum_steps", 3, "divisible by optimizer.grad_accum_steps"),
        ("train", "num_steps", 0, "train.num_steps must be positive"),
        ("train", "best_metric_comp", "max", "train.best_metric_comp must be one of higher, "),
        ("train", "continuous_eval_timeout_s", -1.0, r"continuous_eval_timeout_s must be >= 0"),
        ("model", "type_vocab_size", 0, "model.type_vocab_size must be positive"),
        ("train", "seed", -1, r"train\.seed must be in \[0, 2\*\*32\)"),
        ("optimizer", "b2", 1.0, r"optimizer\.b2 must be in \[0, 1\)"),
        ("optimizer", "clip_norm", -1.0, r"optimizer\.clip_norm must be >= 0 \(0: no clipping\)"),
        ("optimizer", "weight_decay", -0.1, "optimizer.weight_decay must be >= 0"),
        ("data", "input_shards", 3, r"global_batch_size \(256\) must be divisible by data\.input"),
        ("mesh", "data", 3, r"divisible by the number of devices \(mesh\.data 3 x mesh\.fsdp 1\)"),
    ],
)
def test_bad_values_are_rejected(section, field, value, message):
    config = config_lib.base_config()
    config[section][field] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


def test_missing_field_is_reported():
    config = config_lib.base_config()
    del config.train["seed"]
    with pytest.raises(ConfigError, match="missing field 'train.seed'"):
        config_lib.validate(config)


def test_json_round_trip():
    config = config_lib.validate(config_lib.sized_config("mini"))
    again = config_lib.from_json(config_lib.to_json(config))
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_examples", 0, "privacy.enabled needs privacy.num_examples"),
        ("num_examples", 10, r"privacy.num_examples \(10\) must be >= train.global_batch_size"),
        ("l2_clip", 0.0, "privacy.l2_clip must be > 0"),
        ("noise_multiplier", 0.0, "privacy.noise_multiplier must be > 0"),
        ("delta", 1.0, r"privacy.delta must be in \(0, 1\)"),
    ],
)
def test_bad_privacy_values_are_rejected_only_when_enabled(field, value, message):
    config = config_lib.base_config()
    config.privacy.num_examples = 100_000
    config.privacy[field] = value
    config_lib.validate(config)  # Off: not checked.
    config = config_lib.base_config()
    config.privacy.update(enabled=True, num_examples=100_000)
    config.privacy[field] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


def test_config_json_without_the_encoder_options_loads_as_todays_model():
    old = json.loads(config_lib.to_json(config_lib.base_config()))
    for field in (
        "embedding_size",
        "norm_first",
        "initializer_range",
        "mlm_activation",
        "mlm_initializer_range",
    ):
        del old["model"][field]
    model = config_lib.from_json(json.dumps(old)).model
    assert (model.embedding_size, model.norm_first, model.mlm_activation) == (0, False, "")
    assert model.initializer_range == model.mlm_initializer_range == 0.02


def test_config_json_without_the_new_sections_loads_with_their_defaults():
    old = json.loads(config_lib.to_json(config_lib.base_config()))
    del old["privacy"]
    for field in ("ema_decay", "loss_scale_init", "loss_scale_growth_steps"):
        del old["optimizer"][field]
    config = config_lib.from_json(json.dumps(old))
    assert not config.privacy.enabled
    assert config.optimizer.ema_decay == 0.0


def test_config_json_from_before_the_optimizer_choices_loads_as_it_ran():
    old = json.loads(config_lib.to_json(config_lib.base_config()))
    for field in ("schedule", "momentum", "nesterov", "loss_scale"):
        del old["optimizer"][field]
    config = config_lib.from_json(json.dumps(old))
    # AdamW with the polynomial decay and dynamic float16 loss scaling, as before.
    assert (config.optimizer.name, config.optimizer.schedule) == ("adamw", "polynomial")
    assert config.optimizer.loss_scale == 0.0


@pytest.mark.parametrize("name", config_lib.OPTIMIZERS)
@pytest.mark.parametrize("schedule", config_lib.SCHEDULES)
def test_every_optimizer_and_schedule_validates(name, schedule):
    config = config_lib.base_config()
    config.optimizer.update(name=name, schedule=schedule, nesterov=True, momentum=0.0)
    config_lib.validate(config)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_fixed_loss_scale_without_float16_is_a_warning(dtype):
    config = config_lib.base_config()
    config.model.dtype = dtype
    config.optimizer.loss_scale = 128.0
    config.train.num_steps = config.optimizer.warmup_steps  # No warmup warning.
    found = config_lib.warnings_for(config_lib.validate(config))
    if dtype == "float16":
        assert found == []
    else:
        assert found == [
            f"optimizer.loss_scale (128) is used only with model.dtype=float16; this {dtype} "
            "run has no loss scaling"
        ]


# ------------------------------------------------------------- numbers the device cannot take

SCHEMA = config_lib.leaves(config_lib.base_config())
FLOAT_FIELDS = sorted(name for name, value in SCHEMA.items() if type(value) is float)
INT_FIELDS = sorted(name for name, value in SCHEMA.items() if type(value) is int)
HOST_INTS = ("mesh.fsdp_min_size", "privacy.num_examples")


def with_field(name, value):
    config = config_lib.base_config()
    *sections, field = name.split(".")
    parent = config
    for section in sections:
        parent = parent[section]
    with config.unlocked():
        parent[field] = value
    return config


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_field_must_be_finite(value):
    assert "optimizer.learning_rate" in FLOAT_FIELDS and len(FLOAT_FIELDS) >= 17
    for name in FLOAT_FIELDS:
        with pytest.raises(ConfigError) as error:
            config_lib.validate(with_field(name, value))
        assert str(error.value) == (
            f"config field '{name}' must be a finite number, got {value}; fix the value in the "
            "config file or the override"
        )


def test_int_fields_beyond_int32_are_refused():
    bounded = [name for name in INT_FIELDS if name not in (*HOST_INTS, "train.seed")]
    assert {"train.num_steps", "optimizer.warmup_steps", "model.vocab_size"} <= set(bounded)
    for name in bounded:
        with pytest.raises(ConfigError) as error:
            config_lib.validate(with_field(name, 2**31))
        assert str(error.value) == (
            f"config field '{name}' must be at most 2147483647 (steps, sizes and ids are int32), "
            "got 2147483648; fix the value in the config file or the override"
        )
    config = with_field("train.num_steps", 2**31 - 1)
    assert config_lib.validate(config).train.num_steps == 2**31 - 1


def test_seed_takes_32_bits_and_host_only_ints_are_unbounded():
    assert config_lib.validate(with_field("train.seed", 2**32 - 1)).train.seed == 2**32 - 1
    with pytest.raises(ConfigError, match=r"'train\.seed' must be at most 4294967295 \(grain"):
        config_lib.validate(with_field("train.seed", 2**32))
    assert config_lib.validate(with_field("mesh.fsdp_min_size", 2**40)).mesh.fsdp_min_size
    config = with_field("privacy.num_examples", 10**12)
    config.privacy.enabled = True
    assert config_lib.validate(config).privacy.num_examples == 10**12


def test_best_metric_of_next_sentence_needs_the_next_sentence_label():
    config = config_lib.base_config()
    config.data.use_next_sentence_label = False
    config.train.best_metric = "masked_lm_accuracy"
    config_lib.validate(config)
    for metric in ("next_sentence_accuracy", "next_sentence_loss"):
        config = config_lib.base_config()
        config.data.use_next_sentence_label = False
        config.train.best_metric = metric
        with pytest.raises(ConfigError) as error:
            config_lib.validate(config)
        assert str(error.value) == (
            f"train.best_metric '{metric}' needs data.use_next_sentence_label=True (without it "
            "eval has no next-sentence metrics); pick masked_lm_accuracy, lm_example_loss or "
            "validation_loss, or set data.use_next_sentence_label=True"
        )
        config.data.use_next_sentence_label = True
        config_lib.validate(config)


def test_prepared_dir_with_a_vocab_file_is_refused_before_any_data():
    config = config_lib.base_config()
    config.data.update(prepared_dir="prepared", vocab_file="vocab.txt")
    with pytest.raises(ConfigError, match="data.prepared_dir brings its own vocab.txt"):
        config_lib.validate(config)


# ------------------------------------------------------------------------------- config.json


def json_with(section, field, text):
    values = json.loads(config_lib.to_json(config_lib.base_config()))
    values[section][field] = "PLACEHOLDER"
    return json.dumps(values).replace('"PLACEHOLDER"', text)


@pytest.mark.parametrize(
    "section,field,text,message",
    [
        ("optimizer", "learning_rate", "NaN", r"'optimizer\.learning_rate' must be a finite"),
        ("model", "dropout_rate", "-Infinity", r"'model\.dropout_rate' must be a finite"),
        ("optimizer", "eps", "1" + "0" * 400, r"'optimizer\.eps' must be a finite number, got an"),
        ("optimizer", "learning_rate", "true", r"'optimizer\.learning_rate' must be float, got"),
        ("train", "num_steps", "3000000000", r"'train\.num_steps' must be at most 2147483647"),
        ("train", "global_batch_size", "1e10", r"'train\.global_batch_size' must be int"),
    ],
)
def test_from_json_refuses_bad_numbers(section, field, text, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_json(json_with(section, field, text))


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"model": {', r"^config\.json is not valid JSON \(Expecting"),
        ("[1, 2]", r"^config\.json holds a list, not an object of config sections"),
        ('{"model": 5}', r"^config\.json: section 'model' must be an object of fields, got 5"),
    ],
)
def test_from_json_refuses_damaged_files_in_one_line(text, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_json(text)


def test_use_position_id_needs_tfrecord_files():
    config = config_lib.base_config()
    config.data.use_position_id = True
    with pytest.raises(ConfigError, match="^data.use_position_id reads the position_ids of"):
        config_lib.validate(config)
    config.data.tfrecord_files = "records/*.tfrecord"
    assert config_lib.validate(config).data.use_position_id
