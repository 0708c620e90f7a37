"""Tests for mlm.config: the schema, validation errors and override checks."""

import glob
import json
import os

import ml_collections
import pytest

from mlm import config as config_lib
from mlm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_shipped_config_validates(path):
    config = config_lib.validate(config_lib.load_config_file(path))
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
        ("model", "activation", "relu", "model.activation must be one of"),
        ("data", "seq_length", 1024, "max_position_embeddings"),
        ("data", "max_predictions_per_seq", 0, "max_predictions_per_seq"),
        ("data", "masking_rate", 1.5, "masking_rate"),
        ("optimizer", "name", "sgd", "optimizer.name must be one of adamw, lamb"),
        ("optimizer", "grad_accum_steps", 3, "divisible by optimizer.grad_accum_steps"),
        ("train", "num_steps", 0, "train.num_steps must be positive"),
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


def test_check_overrides_rejects_unknown_names_only():
    config = config_lib.base_config()
    config_lib.check_overrides(config, ["--config.train.num_steps=5", "--workdir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"optimizer\.lr.*did you mean"):
        config_lib.check_overrides(config, ["--config.optimizer.lr=0.1"])


def test_json_round_trip():
    config = config_lib.validate(config_lib.sized_config("mini"))
    again = config_lib.from_json(config_lib.to_json(config))
    assert again.to_dict() == config.to_dict()


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load_config_file(str(tmp_path / "nope.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        config_lib.load_config_file(str(empty))


def test_ill_typed_assignment_in_config_file_is_one_line(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from mlm.config import base_config\n"
        "def get_config():\n"
        "    config = base_config()\n"
        "    config.train.num_steps = 'many'\n"
        "    return config\n"
    )
    with pytest.raises(ConfigError, match=r"typo\.py.*num_steps") as error:
        config_lib.load_config_file(str(path))
    assert "\n" not in str(error.value)


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


def test_config_json_without_the_new_sections_loads_with_their_defaults():
    old = json.loads(config_lib.to_json(config_lib.base_config()))
    del old["privacy"]
    for field in ("ema_decay", "loss_scale_init", "loss_scale_growth_steps"):
        del old["optimizer"][field]
    config = config_lib.from_json(json.dumps(old))
    assert not config.privacy.enabled
    assert config.optimizer.ema_decay == 0.0
