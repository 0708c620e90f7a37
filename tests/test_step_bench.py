"""Tests for mlm.step_bench: the FLOP formula, synthetic batches, peaks and the step record."""

import importlib.util
import os
import sys

import ml_collections
import numpy as np
import pytest

from mlm import config as config_lib
from mlm import step_bench
from mlm.data import synthetic
from mlm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_GARDEN_SCRIPT = os.path.join(ROOT, "benchmarks", "model_garden_step.py")


def tiny_config(next_sentence: bool = True) -> ml_collections.ConfigDict:
    config = config_lib.base_config()
    config.model.update(
        vocab_size=50,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    config.data.update(seq_length=16, max_predictions_per_seq=3)
    config.data.use_next_sentence_label = next_sentence
    config.train.update(global_batch_size=4, num_steps=10)
    config.optimizer.warmup_steps = 2
    return config


def hand_count_per_row(h, i, layers, v, s, p, next_sentence):
    """Forward matmul FLOPs of one row, product by product (2 per multiply-add)."""
    per_layer = (
        3 * 2 * s * h * h  # query, key, value projections
        + 2 * s * s * h  # QK^T over all heads
        + 2 * s * s * h  # probabilities x V
        + 2 * s * h * h  # attention output projection
        + 2 * s * h * i  # intermediate
        + 2 * s * i * h  # output
    )
    head = p * (2 * h * h + 2 * h * v)  # dense + tied vocab projection on the P slots
    nsp = (2 * h * h + 2 * h * 2) if next_sentence else 0  # pooler + classifier, one token
    return layers * per_layer + head + nsp


@pytest.mark.parametrize("next_sentence", [True, False])
def test_model_flops_per_token_equals_a_hand_count(next_sentence):
    config = tiny_config(next_sentence)
    forward = hand_count_per_row(8, 16, 2, 50, 16, 3, next_sentence)
    train = step_bench.model_flops_per_token(config.model, 16, 3, next_sentence)
    evaluation = step_bench.model_flops_per_token(config.model, 16, 3, next_sentence, train=False)
    assert train * 16 == pytest.approx(3 * forward, rel=1e-12)  # forward + backward = 3 x
    assert evaluation * 16 == pytest.approx(forward, rel=1e-12)


def test_model_flops_per_token_counts_factorised_embeddings():
    config = tiny_config(False)
    config.model.embedding_size = 4
    h, i, v, e, s, p = 8, 16, 50, 4, 16, 3
    forward = hand_count_per_row(h, i, 2, v, s, p, False)
    forward += s * 2 * e * h  # embedding projection E -> H at every position
    forward += p * (2 * h * e + 2 * e * v - 2 * h * h - 2 * h * v)  # the head works at width E
    train = step_bench.model_flops_per_token(config.model, s, p, False)
    assert train * s == pytest.approx(3 * forward, rel=1e-12)


def test_model_flops_per_token_of_modernbert_counts_the_local_window():
    config = tiny_config(False)
    config.model.encoder = "modernbert"
    config.model.num_layers = 4
    config.model.modernbert.update(global_attn_every_n_layers=3, local_attention=6)
    h, i, v, s, p = 8, 16, 50, 16, 3
    forward = p * (2 * h * h + 2 * h * v)
    for layer in range(4):
        keys = s if layer % 3 == 0 else 7  # local: at most local_attention + 1 keys per query
        forward += s * (2 * h * 3 * h + 2 * h * h + 2 * h * 2 * i + 2 * i * h)  # Wqkv, Wo, MLP
        forward += 2 * 2 * s * keys * h  # QK^T and PV
    train = step_bench.model_flops_per_token(config.model, s, p, False)
    assert train * s == pytest.approx(3 * forward, rel=1e-12)


def test_synthetic_batch_shapes_padding_and_masks():
    rng = np.random.default_rng(0)
    batch = synthetic.synthetic_batch(rng, 64, 128, 20, 1000, real_fraction=0.9)
    mask = batch["input_mask"]
    assert mask.shape == (64, 128) and batch["masked_lm_positions"].shape == (64, 20)
    assert abs(mask.mean() - 0.9) < 0.03
    lengths = mask.sum(1)
    assert (mask == (np.arange(128)[None] < lengths[:, None])).all()  # padding at the end
    assert ((batch["input_word_ids"] == 0) == (mask == 0)).all()
    assert (batch["input_word_ids"] < 1000).all()
    assert (batch["packed_segment_ids"] == mask).all()
    assert batch["next_sentence_labels"].shape == (64,)
    for row in range(64):
        count = int(batch["masked_lm_weights"][row].sum())
        assert count == min(20, max(1, round(0.15 * lengths[row])))
        positions = batch["masked_lm_positions"][row, :count]
        assert len(set(positions)) == count and (positions > 0).all()
        assert (positions < lengths[row]).all()
        assert (batch["masked_lm_ids"][row, count:] == 0).all()


def test_table_peak_picks_the_specific_name_first():
    assert step_bench.table_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert step_bench.table_peak("NVIDIA H100 PCIe") == 756e12
    assert step_bench.table_peak("NVIDIA A100-SXM4-40GB") == 312e12
    assert step_bench.table_peak("TPU v5 lite") == 197e12
    assert step_bench.table_peak("TPU v5") == 459e12
    assert step_bench.table_peak("cpu") is None


def test_measured_matmul_peak_is_positive():
    assert step_bench.measure_matmul_peak(size=256, repeats=2) > 1e8


@pytest.mark.parametrize("eval_step", [False, True])
def test_bench_step_record(eval_step):
    calls = []
    record = step_bench.bench_step(
        tiny_config(),
        steps=4,
        warmup=1,
        eval_step=eval_step,
        num_batches=2,
        measure_peak=lambda: step_bench.measure_matmul_peak(size=256, repeats=2),
        interleave=lambda: calls.append(1),
    )
    assert calls == [1]  # between the two halves of the timed steps
    assert record["mode"] == ("eval" if eval_step else "train")
    assert record["device_kind"] == "cpu" and record["num_devices"] >= 1
    assert (record["batch_size"], record["seq_length"]) == (4, 16)
    assert record["steps"] == 4
    assert record["compile_s"] > 0 and record["step_time_s"] >= record["step_time_min_s"] > 0
    assert 0.5 < record["real_token_fraction"] <= 1
    assert record["tokens_per_s"] == pytest.approx(
        4 * 16 * record["real_token_fraction"] / record["step_time_s"], rel=1e-9
    )
    flops = step_bench.model_flops_per_token(tiny_config().model, 16, 3, True, train=not eval_step)
    assert record["model_flops_per_token"] == flops
    # The measured CPU peak is the whole process's: FLOPs are not divided among its devices.
    achieved = flops * 4 * 16 / record["step_time_s"]
    assert record["achieved_flops_per_s"] == pytest.approx(achieved, rel=1e-9)
    assert record["peak_source"] == "measured: float32 matmul, this process"
    assert record["peak"] > 1e8
    assert record["mfu"] == pytest.approx(record["achieved_flops_per_s"] / record["peak"])
    assert record["peak_memory_bytes"] is None  # CPU reports no memory stats
    assert record["kernels"] == "cpu"  # model.kernels=auto on CPU devices
    # A library call leaves malloc as it is; the command line applies it (tests/test_bench.py).
    assert record["keep_freed_host_memory"] is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "--steps"),
        (dict(warmup=-1), "--warmup"),
        (dict(real_fraction=0.4), "--real_fraction"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        step_bench.bench_step(tiny_config(), **kwargs)


def load_model_garden_script():
    """The Model Garden script as a module (its functions need numpy only)."""
    spec = importlib.util.spec_from_file_location("model_garden_step", MODEL_GARDEN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_garden_command_passes_the_model_and_the_batches():
    config = config_lib.validate(tiny_config(next_sentence=False))
    command = step_bench.model_garden_command(
        "python3", config, steps=5, warmup=2, batches_path="/tmp/b.npz"
    )
    assert command[:2] == ["python3", MODEL_GARDEN_SCRIPT]
    args = dict(arg[2:].split("=") for arg in command[2:])
    assert args["hidden_size"] == "8" and args["num_layers"] == "2"
    assert args["vocab_size"] == "50" and args["intermediate_size"] == "16"
    assert args["batches"] == "/tmp/b.npz" and args["next_sentence"] == "0"
    assert (args["steps"], args["warmup"], args["seed"]) == ("5", "2", "42")


@pytest.mark.parametrize("next_sentence", [True, False])
def test_model_garden_script_reads_the_batches_ours_are_timed_on(tmp_path, next_sentence):
    script = load_model_garden_script()
    assert script.FEATURES == step_bench.MODEL_GARDEN_FEATURES
    config = config_lib.validate(tiny_config())
    batches = synthetic.synthetic_batches(config, 0.9, 3)
    path = str(tmp_path / "batches.npz")
    step_bench.write_model_garden_batches(path, batches)
    theirs = script.read_batches(path, next_sentence)
    assert len(theirs) == 3
    for ours, batch in zip(batches, theirs, strict=True):
        names = set(script.FEATURES) - (set() if next_sentence else {"next_sentence_labels"})
        assert set(batch) == names
        for name in names:
            expected = ours[name].reshape(batch[name].shape)
            assert batch[name].dtype == expected.dtype and (batch[name] == expected).all()
        if next_sentence:
            assert batch["next_sentence_labels"].shape == (4, 1)  # Model Garden's shape.


def test_synthetic_batches_are_the_same_on_every_call():
    config = config_lib.validate(tiny_config())
    first, second = (synthetic.synthetic_batches(config, 0.9, 2) for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert all((a[name] == b[name]).all() for name in a)
    assert not (first[0]["input_word_ids"] == first[1]["input_word_ids"]).all()


def test_missing_model_garden_script_is_one_line_config_error(tmp_path, monkeypatch):
    # An installed mlm without its repository: no benchmarks/ next to the package.
    monkeypatch.setattr(step_bench, "REPOSITORY", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        step_bench.bench_step_with_reference(
            tiny_config(),
            steps=1,
            warmup=0,
            eval_step=False,
            real_fraction=0.9,
            model_garden_python="python3",
        )
    message = str(error.value)
    assert "\n" not in message and "model_garden_step.py" in message
    assert "clone of the repository" in message


def test_model_garden_failure_is_one_config_error(tmp_path):
    # This interpreter has no tf-models-official: the script fails on its import.
    config = config_lib.validate(tiny_config())
    path = str(tmp_path / "batches.npz")
    step_bench.write_model_garden_batches(path, synthetic.synthetic_batches(config, 0.9, 2))
    command = step_bench.model_garden_command(
        sys.executable, config, steps=1, warmup=0, batches_path=path
    )
    with pytest.raises(ConfigError, match="Model Garden benchmark failed"):
        step_bench.run_model_garden(command)
    with pytest.raises(ConfigError, match="cannot run"):
        step_bench.run_model_garden(["/nonexistent/python", *command[1:]])
