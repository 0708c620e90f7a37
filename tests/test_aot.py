"""mlm.aot: the real train and eval steps compiled for a TPU slice on this CPU-only host."""

import json
import os
import subprocess
import sys

import jax
import pytest

from mlm import aot
from mlm import config_file as config_file_lib
from mlm.errors import ConfigError

GIB = 2**30


@pytest.mark.parametrize(
    "name, chips, topology_name, per_host, hosts",
    [
        ("v4-8", 4, "v4:2x2x1", (2, 2, 1), 1),
        ("v4-32", 16, "v4:2x2x4", (2, 2, 1), 4),
        ("v5p-8", 4, "v5:2x2x1", (2, 2, 1), 1),
        ("v5e-4", 4, "v5e:2x2", (2, 2, 1), 1),
        ("v5e-8", 8, "v5e:2x4", (2, 4, 1), 1),
        ("v5e-16", 16, "v5e:4x4", (2, 2, 1), 4),
        ("v6e-8", 8, "v6e:2x4", (2, 4, 1), 1),
        ("V6E-64", 64, "v6e:8x8", (2, 2, 1), 16),
    ],
)
def test_slice_names_resolve_to_libtpu_topologies(name, chips, topology_name, per_host, hosts):
    topology = aot.parse_topology(name)
    assert topology.chips == chips
    assert topology.topology_name == topology_name
    assert topology.chips_per_host_bounds == per_host
    assert topology.hosts == hosts


@pytest.mark.parametrize(
    "name, message",
    [
        ("v5e", "is not a TPU slice name"),
        ("v3-8", "is not a TPU slice name"),
        ("v5e-6", "power-of-two number of chips"),
        ("v4-3", "counts TensorCores (2 per chip)"),
    ],
)
def test_bad_slice_names_are_config_errors(name, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        aot.parse_topology(name)


def test_hbm_total_is_read_from_the_default_memory_space(tmp_path):
    (tmp_path / "module_0001.jit_step.after_optimizations-memory-usage-report.txt").write_text(
        "Memory Space: default (color=0)\nTotal bytes: 123456 (120.56KiB)\n  rows...\n"
        "Memory Space: alternate (color=1)\nTotal bytes: 99 (99B)\n"
    )
    assert aot.hbm_bytes_from_dump(str(tmp_path)) == 123456
    with pytest.raises(RuntimeError, match="no memory-usage report"):
        aot.hbm_bytes_from_dump(str(tmp_path / "missing"))


def test_out_of_memory_errors_are_read_and_others_are_not():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (20.50G) exceeds available HBM (15.75G)."
    )
    assert aot.out_of_memory(RuntimeError(message)) == (int(20.5 * GIB), int(15.75 * GIB))
    assert aot.out_of_memory(RuntimeError("INVALID_ARGUMENT: something else")) is None


@pytest.fixture(scope="module", autouse=True)
def fully_optimized():
    """The real compiler's figures: undoes tests/conftest.py's few-optimizations setting."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def tiny_config(**mesh):
    config = config_file_lib.load_config_file("configs/bert_tiny.py")
    config.train.global_batch_size = 64
    for axis, size in mesh.items():
        config.mesh[axis] = size
    return config


@pytest.fixture(scope="module")
def data_parallel():
    return aot.compile_for_topology(tiny_config(), "v5e-4")


@pytest.fixture(scope="module")
def fully_sharded():
    return aot.compile_for_topology(tiny_config(data=1, fsdp=4), "v5e-4")


def test_compiled_for_tpu_on_a_cpu_host_with_the_standard_kernels(data_parallel):
    record = data_parallel
    assert jax.default_backend() == "cpu"
    assert record["kernels"] == "standard"  # model.kernels=auto decides by the mesh's devices.
    assert record["device_kind"] == "TPU v5 lite"
    assert (record["topology"], record["chips"], record["hosts"]) == ("v5e-4", 4, 1)
    assert record["mesh"] == {"data": 4, "fsdp": 1}
    assert (record["global_batch_size"], record["seq_length"]) == (64, 128)
    assert record["hbm_capacity_bytes"] == int(15.75 * GIB)
    assert record["fits"] is True
    # bert_tiny's float32 params and two AdamW moments, replicated, are about 53 MB a chip.
    assert 50e6 < record["hbm_bytes_per_chip"] < 2 * GIB
    assert 0 < record["eval_hbm_bytes_per_chip"] < record["hbm_bytes_per_chip"]
    assert record["compile_s"] > 0 and record["eval_compile_s"] > 0
    # XLA counts the same matmuls as the formula, plus the little it leaves out (softmax,
    # LayerNorm, the optimizer); the eval step (forward only) is about a third of the train step.
    assert 1.0 < record["flops_ratio"] < 1.3
    assert 0.9 < record["eval_xla_flops_per_chip"] / record["eval_model_flops_per_chip"] < 1.3
    assert record["model_flops_per_chip"] == pytest.approx(3 * record["eval_model_flops_per_chip"])
    json.dumps(record)  # The CLI prints it as one JSON line.


def test_fsdp_splits_the_state_over_the_chips(data_parallel, fully_sharded):
    assert fully_sharded["mesh"] == {"data": 1, "fsdp": 4}
    assert fully_sharded["fits"] is True
    # The state (about 53 MB replicated) is split four ways; activations are the same per chip.
    saved = data_parallel["hbm_bytes_per_chip"] - fully_sharded["hbm_bytes_per_chip"]
    assert saved > 30e6
    assert fully_sharded["xla_flops_per_chip"] == pytest.approx(
        data_parallel["xla_flops_per_chip"], rel=0.05
    )


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlm.aot", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "JAX_DISABLE_MOST_OPTIMIZATIONS": "0",  # See fully_optimized.
            **(env or {}),
        },
    )


def test_a_config_that_does_not_fit_exits_1_saying_by_how_much_and_what_to_try(tmp_path):
    cache = tmp_path / "jax_cache"
    result = run_cli(
        "--config",
        "configs/bert_tiny.py",
        "--topology",
        "v5e-4",
        "--config.train.global_batch_size=65536",
        env={
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        },
    )
    # JAX's persistent compilation cache is off in mlm.aot (its executables could not be
    # loaded back); with it on, the set-up's small CPU programs alone write entries here.
    assert not cache.exists() or not any(cache.iterdir())
    assert result.returncode == 1, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["fits"] is False
    assert record["hbm_bytes_per_chip"] > record["hbm_capacity_bytes"]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: v5e-4: the step needs ")
    assert "GiB over); try --config.mesh.fsdp=4" in last
    assert "--config.optimizer.grad_accum_steps=2" in last
    assert "--config.model.remat=full" in last


def test_cli_mistakes_exit_2_with_one_line():
    result = run_cli("--config", "configs/bert_tiny.py", "--topology", "v9-8")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --topology 'v9-8' is not a TPU slice name")
