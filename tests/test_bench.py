"""Tests for mlm.bench: input-pipeline records, the per-length config, and the command line."""

import json
import os
import subprocess
import sys

import pytest

from mlm import bench
from mlm import config as config_lib
from mlm import config_file as config_file_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LENGTHS = (32, 64)
SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine stitches later.",
    "every good boy does fine on the long test.",
    "the rain in spain falls mainly on the plain.",
    "she sells sea shells by the sea shore today.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A text file in the BERT layout: 60 documents of 4 sentences."""
    lines = []
    for index in range(60):
        lines.extend(SENTENCES[(index + k) % len(SENTENCES)] for k in range(4))
        lines.append("")
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny_config(corpus: str, **data):
    config = config_lib.base_config()
    config.model.update(vocab_size=200, max_position_embeddings=32)
    config.data.update(train_files=corpus, use_next_sentence_label=False)
    config.data.update(**data)
    config.train.update(global_batch_size=4)
    return config


@pytest.mark.parametrize("next_sentence", [False, True])
def test_bench_input_gives_one_record_per_length(corpus, tmp_path, next_sentence):
    config = tiny_config(corpus, use_next_sentence_label=next_sentence)
    records = bench.bench_input(
        config, str(tmp_path), seq_lengths=SEQ_LENGTHS, num_batches=3, warmup_batches=1
    )
    assert [r["seq_length"] for r in records] == list(SEQ_LENGTHS)
    assert [r["max_predictions_per_seq"] for r in records] == [5, 10]  # round(0.15 * S)
    assert [r["vocab_built"] for r in records] == [True, False]  # the workdir is reused
    for record in records:
        assert record["source"] == "data.train_files"
        assert record["next_sentence"] is next_sentence
        assert record["batch_size"] == 4
        assert record["setup_s"] > 0 and record["ms_per_batch"] > 0
        assert record["cpu_ms_per_batch"] >= 0
        assert record["examples_per_s"] > 0 and record["real_tokens_per_s"] > 0
        expected = record["examples_per_s"] * record["seq_length"]
        assert record["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
        assert 0 < record["real_token_fraction"] <= 1
        assert record["real_tokens_per_s"] == pytest.approx(
            record["tokens_per_s"] * record["real_token_fraction"], rel=1e-9
        )
        assert 0 < record["masked_per_example"] <= record["max_predictions_per_seq"]
        assert record["vocab_size"] <= 200
    assert config.data.seq_length == 128  # the caller's config is left alone
    table = bench.format_table(records)
    assert "examples/s" in table and len(table.splitlines()) == 2 + len(SEQ_LENGTHS)


def test_bench_input_without_lengths_uses_the_config(corpus, tmp_path):
    config = tiny_config(corpus, seq_length=32, max_predictions_per_seq=3)
    (record,) = bench.bench_input(config, str(tmp_path), num_batches=2, warmup_batches=0)
    assert (record["seq_length"], record["max_predictions_per_seq"]) == (32, 3)


def test_bench_input_with_worker_processes(corpus, tmp_path):
    config = tiny_config(corpus, num_workers=2, prefetch_batches=1)
    (record,) = bench.bench_input(
        config, str(tmp_path), seq_lengths=(32,), num_batches=3, warmup_batches=2
    )
    assert record["num_workers"] == 2 and record["thread_prefetch"] == 1
    assert record["examples_per_s"] > 0


def test_bert_max_predictions_and_positions():
    assert bench.max_predictions_for(128, 0.15) == 20
    assert bench.max_predictions_for(512, 0.15) == 76
    assert bench.max_predictions_for(256, 0.15) == 38
    config = bench.config_for_seq_length(config_lib.base_config(), 1024)
    assert config.model.max_position_embeddings == 1024
    assert config.data.max_predictions_per_seq == 154


def test_bad_arguments_are_config_errors(corpus, tmp_path):
    with pytest.raises(config_lib.ConfigError, match="--num_batches"):
        bench.bench_input(tiny_config(corpus), str(tmp_path), num_batches=0)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlm.bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_the_table_and_writes_json_lines(corpus, tmp_path):
    out = tmp_path / "bench.jsonl"
    result = run_cli(
        "--input-only",
        "--seq_lengths=32,64",
        "--num_batches=2",
        "--warmup_batches=1",
        f"--workdir={tmp_path / 'work'}",
        f"--json_out={out}",
        f"--config.data.train_files={corpus}",
        "--config.model.vocab_size=200",
        "--config.train.global_batch_size=4",
    )
    assert result.returncode == 0, result.stderr
    assert "data.train_files, NSP on" in result.stdout
    assert "real tokens/s" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq_length"] for r in records] == [32, 64]
    assert all(r["examples_per_s"] > 0 for r in records)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-only", "--config.data.seq_lenght=64"], "did you mean"),
        (["--config", "configs/quickstart.py", "--steps=0"], "--steps"),
        (["--config", "configs/quickstart.py", "--eval", "--model-garden-python=python"], "--eval"),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cli_step_benchmark_prints_one_json_line_last(tmp_path):
    out = tmp_path / "step.jsonl"
    result = run_cli(
        "--config",
        "configs/quickstart.py",
        "--steps=2",
        "--warmup=1",
        "--config.model.vocab_size=500",
        "--config.train.global_batch_size=4",
        "--config.data.seq_length=32",
        "--config.data.max_predictions_per_seq=5",
        f"--json_out={out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("train step (cpu kernels) on ")
    record = json.loads(lines[-1])
    assert record == json.loads(out.read_text())
    for key in ("tokens_per_s", "step_time_s", "compile_s", "model_flops_per_token", "mfu"):
        assert record[key] > 0
    assert record["peak_source"].startswith("measured") and record["peak_memory_bytes"] is None
    assert (record["batch_size"], record["seq_length"]) == (4, 32)
    assert record["kernels"] == "cpu"
    assert record["keep_freed_host_memory"] is True  # The command line on CPU, glibc here.


def test_state_memory_is_split_by_fsdp(tmp_path):
    out = tmp_path / "memory.jsonl"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    records = {}
    for fsdp in (1, 8):
        result = subprocess.run(
            [sys.executable, "-m", "mlm.bench", "--state-memory"]
            + ["--config", "configs/bert_tiny.py", f"--config.mesh.fsdp={fsdp}"]
            + ["--config.mesh.fsdp_min_size=1024"]
            + [f"--json_out={out}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        records[fsdp] = json.loads(out.read_text().splitlines()[-1])
    assert records[1]["mesh"] == {"data": 8, "fsdp": 1}
    assert records[1]["max_device_bytes"] == records[1]["state_bytes"]  # Replicated.
    assert records[8]["state_bytes"] == records[1]["state_bytes"]
    # Everything but small arrays (biases, LayerNorm; the 30522-wide output bias, which 8 does
    # not divide) is split 8 ways.
    assert 1 / 8 <= records[8]["fraction"] < 0.135


def test_checkpoint_cost_times_async_and_blocking_saves(tmp_path):
    config = config_file_lib.load_config_file(os.path.join(ROOT, "configs", "bert_tiny.py"))
    record = bench.bench_checkpoint_cost(config, str(tmp_path / "checkpoints"), repeats=1)
    assert record["state_bytes"] > 4_000_000 * 4 * 3  # bert_tiny params + two Adam moments.
    assert 0 < record["async_blocking_s"] <= record["async_total_s"]
    assert record["blocking_s"] > 0
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["2"]  # keep=1
