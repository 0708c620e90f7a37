"""Tests for mlm.recovery and the driver's recovery from loss blow-ups."""

import dataclasses
import json
import math
import os

import ml_collections
import numpy as np
import pytest

from mlm import config as config_lib
from mlm import train
from mlm.data.inputs import build_inputs
from mlm.errors import ConfigError, DivergenceError
from mlm.recovery import LossBlowUpError, RecoveryPolicy


def tiny_config(**fields) -> ml_collections.ConfigDict:
    """A 1-layer, 16-wide BERT on synthetic batches: 8 steps, a checkpoint every 2."""
    config = config_lib.base_config()
    config.model.update(
        vocab_size=64,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    config.data.update(
        synthetic=True, seq_length=32, max_predictions_per_seq=5, use_next_sentence_label=False
    )
    config.train.update(global_batch_size=8, num_steps=8, log_every=1, eval_every=0)
    config.train.update(checkpoint_every=2, best_metric="", recovery_max_trials=2)
    config.train.update(**fields)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=1)
    return config_lib.validate(config)


# ------------------------------------------------------------------------------------ policy


def test_policy_blows_up_on_non_finite_or_large_losses_from_the_begin_step():
    policy = RecoveryPolicy(loss_upper_bound=10.0, begin_steps=3, max_trials=1)
    assert not policy.blows_up(2, math.nan)  # Before recovery_begin_steps.
    assert not policy.blows_up(3, 10.0)
    assert policy.blows_up(3, 10.5)
    assert policy.blows_up(4, math.inf) and policy.blows_up(4, math.nan)
    off = RecoveryPolicy(loss_upper_bound=10.0, begin_steps=0, max_trials=0)
    assert not off.blows_up(5, math.nan)


def test_policy_counts_trials_and_stops_with_one_line():
    policy = RecoveryPolicy(loss_upper_bound=10.0, begin_steps=0, max_trials=1)
    policy.start_trial(LossBlowUpError(7, math.nan), resume_step=6)
    assert policy.trials == 1
    assert policy.report(LossBlowUpError(7, math.nan), 6) == (
        "step 7: loss nan (train.loss_upper_bound=10): restored step 6 and skipped the batches "
        "up to step 7; recovery 1 of 1"
    )
    with pytest.raises(DivergenceError) as error:
        policy.start_trial(LossBlowUpError(9, 123.456), resume_step=8)
    assert str(error.value) == (
        "training diverged: the loss was 123.5 at step 9 after 1 recoveries "
        "(train.recovery_max_trials=1); lower optimizer.learning_rate, check the data or raise "
        "train.loss_upper_bound, and run again to resume from step 8"
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("loss_upper_bound", 0.0, "train.loss_upper_bound must be positive, got 0.0"),
        ("recovery_max_trials", -1, "train.recovery_max_trials must be >= 0, got -1"),
        ("recovery_begin_steps", -2, "train.recovery_begin_steps must be >= 0, got -2"),
    ],
)
def test_invalid_recovery_fields_are_one_line_errors(field, value, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        tiny_config(**{field: value})


# ------------------------------------------------------------------------------------ driver


class _Poison:
    """Corrupts one batch (known by its ids): token ids past the vocab, so the loss is NaN."""

    def __init__(self, poisoned_ids: np.ndarray):
        self._poisoned_ids = poisoned_ids

    def __call__(self, batch: dict) -> dict:
        if np.array_equal(batch["input_word_ids"], self._poisoned_ids):
            batch = dict(batch, input_word_ids=np.full_like(batch["input_word_ids"], 10**6))
        return batch


def poison_batch(monkeypatch, tmp_path, config, number: int) -> np.ndarray:
    """Makes the `number`-th train batch (1-based) of every run poisoned; returns its ids."""
    batches = iter(build_inputs(config, str(tmp_path / "probe"), need_eval=False).train)
    for _ in range(number):
        ids = next(batches)["input_word_ids"]

    def poisoned_inputs(*args, **kwargs):
        inputs = build_inputs(*args, **kwargs)
        return dataclasses.replace(inputs, train=inputs.train.map(_Poison(ids)))

    monkeypatch.setattr(train, "build_inputs", poisoned_inputs)
    return ids


def train_lines(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        return [line for line in map(json.loads, file) if "loss" in line]


def test_a_poisoned_batch_is_recovered_from_and_training_goes_on(monkeypatch, tmp_path, capsys):
    config = tiny_config()
    poison_batch(monkeypatch, tmp_path, config, number=5)
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir, mode="train")
    lines = train_lines(workdir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert [line["recoveries"] for line in lines] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert results["train"]["recoveries"] == 1
    assert (
        "step 5: loss nan (train.loss_upper_bound=1e+06): restored step 4 and skipped the "
        "batches up to step 5; recovery 1 of 2"
    ) in capsys.readouterr().err
    # Steps 5-8 trained on batches 6-9: the saved iterator is where a clean run's is after 9.
    clean = str(tmp_path / "clean")
    monkeypatch.undo()
    train.train_and_evaluate(tiny_config(num_steps=9, checkpoint_every=9), clean, mode="train")
    position = os.path.join("checkpoints", "{}", "data", "process_0-of-1.json")
    with (
        open(os.path.join(workdir, position.format(8))) as recovered,
        open(os.path.join(clean, position.format(9))) as after_nine,
    ):
        assert json.load(recovered) == json.load(after_nine)


def test_recoveries_run_out_with_one_line_and_no_checkpoint_written(tmp_path):
    """A bound below every loss: each step blows up, back to the start, until trials run out."""
    workdir = str(tmp_path / "run")
    with pytest.raises(
        DivergenceError,
        match=r"^training diverged: the loss was [\d.]+ at step 1 "
        r"after 2 recoveries \(train.recovery_max_trials=2\);.* resume from step 0$",
    ):
        train.train_and_evaluate(tiny_config(loss_upper_bound=1e-3), workdir, mode="train")
    assert not os.listdir(os.path.join(workdir, "checkpoints"))
