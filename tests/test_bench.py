"""Tests for mlm.bench: the subcommands, their help, old spellings, memory and checkpoint cost."""

import json
import os
import subprocess
import sys

import pytest

from mlm import bench
from mlm import config_file as config_file_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlm.bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )


def json_lines(stdout: str, count: int) -> list[dict]:
    """The last `count` lines of a command's stdout, each a JSON record."""
    return [json.loads(line) for line in stdout.strip().splitlines()[-count:]]


# The new spelling and the old flag run the same benchmark.
@pytest.mark.parametrize("spelling", ["input", "--input-only"])
def test_cli_prints_the_table_and_writes_json_lines(bench_corpus, tmp_path, spelling):
    out = tmp_path / "bench.jsonl"
    result = run_cli(
        spelling,
        "--seq_lengths=32,64",
        "--num_batches=2",
        "--warmup_batches=1",
        f"--workdir={tmp_path / 'work'}",
        f"--json_out={out}",
        f"--config.data.train_files={bench_corpus}",
        "--config.model.vocab_size=200",
        "--config.train.global_batch_size=4",
    )
    assert result.returncode == 0, result.stderr
    assert "data.train_files, NSP on" in result.stdout
    assert "real tokens/s" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert json_lines(result.stdout, 2) == records
    assert [r["seq_length"] for r in records] == [32, 64]
    assert all(r["examples_per_s"] > 0 for r in records)


# Each subcommand's flags; --config and --json_out are everyone's.
FLAGS = {
    "step": ["--steps", "--warmup", "--[no]eval", "--real_fraction", "--model-garden-python"],
    "input": ["--seq_lengths", "--num_batches", "--warmup_batches", "--workdir"],
    "memory": [],
    "checkpoint": ["--repeats"],
}


@pytest.mark.parametrize("subcommand", [None, *FLAGS])
def test_cli_help_is_short_and_names_only_its_flags(subcommand):
    result = run_cli(*([subcommand] if subcommand else []), "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) < 40
    assert "vocab_size" not in result.stdout  # No config dumped, one line a field.
    if subcommand is None:
        assert all(f"  {name}  " in result.stdout for name in FLAGS)
        return
    assert lines[0].startswith(f"python -m mlm.bench {subcommand}: ")
    flag_lines = [line.split(":")[0].strip() for line in lines if line.startswith("  --")]
    assert sorted(flag_lines) == sorted(["--config", "--json_out", *FLAGS[subcommand]])


@pytest.mark.parametrize(
    "argv, subcommand, rest",
    [
        (["--config", "c.py"], None, ["--config", "c.py"]),
        (["memory", "--config", "c.py"], "memory", ["--config", "c.py"]),
        (["--input-only", "--seq_lengths=32"], "input", ["--seq_lengths=32"]),
        (["--config=c.py", "--state-memory"], "memory", ["--config=c.py"]),
        (["--checkpoint-cost=true", "--json_out=o"], "checkpoint", ["--json_out=o"]),
        (["--noinput-only", "--steps=2"], None, ["--steps=2"]),
        (["--input-only=false", "--state-memory"], "memory", []),
    ],
)
def test_old_flags_select_their_subcommand(argv, subcommand, rest):
    assert bench.split_subcommand(["bench", *argv]) == (subcommand, ["bench", *rest])


def test_cli_step_benchmark_prints_one_json_line_last(tmp_path):
    out = tmp_path / "step.jsonl"
    cache = tmp_path / "jax_cache"
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
        env={
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        },
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # compile_s times a compilation: JAX's persistent compilation cache is off in mlm.bench.
    assert not cache.exists() or not any(cache.iterdir())
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
    # The old flag and the subcommand: the same benchmark, the same record. The second runs
    # where there is no configs/ folder: `configs/bert_tiny.py` is the shipped config.
    for fsdp, spelling in ((1, "--state-memory"), (8, "memory")):
        result = subprocess.run(
            [sys.executable, "-m", "mlm.bench", spelling]
            + ["--config", "configs/bert_tiny.py", f"--config.mesh.fsdp={fsdp}"]
            + ["--config.mesh.fsdp_min_size=1024"]
            + [f"--json_out={out}"],
            cwd=ROOT if fsdp == 1 else tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        records[fsdp] = json.loads(out.read_text().splitlines()[-1])
        assert json_lines(result.stdout, 1) == [records[fsdp]]
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


def test_cli_checkpoint_cost_old_flag_prints_the_record():
    result = run_cli(
        "--checkpoint-cost",
        "--repeats=1",
        "--config",
        "configs/quickstart.py",
        "--config.model.vocab_size=500",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-2].startswith("state ")
    (record,) = json_lines(result.stdout, 1)
    assert set(record) == {
        "state_bytes",
        "repeats",
        "async_blocking_s",
        "async_total_s",
        "blocking_s",
    }
    assert record["repeats"] == 1 and 0 < record["async_blocking_s"] <= record["async_total_s"]
