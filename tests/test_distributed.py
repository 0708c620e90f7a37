"""Tests of mlm.distributed: the decision per environment, and a real 2-process CPU start-up."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from mlm import distributed
from mlm.distributed import DistributedSetup, detect_setup, first_slurm_host
from mlm.errors import ConfigError

EXPLICIT = {
    "MLM_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "MLM_NUM_PROCESSES": "4",
    "MLM_PROCESS_ID": "3",
}
# What srun sets for task 1 of a 2-node step, one task per node (plus what sbatch set).
SLURM_STEP = {
    "SLURM_JOB_ID": "123456",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
}


def test_nothing_set_is_a_single_process():
    assert detect_setup({}) == DistributedSetup("single", None, 1, 0)
    assert detect_setup({"MLM_PROCESS_ID": "", "SLURM_JOB_ID": "7"}).how == "single"


def test_explicit_variables():
    assert detect_setup(EXPLICIT) == DistributedSetup("explicit", "10.0.0.1:1234", 4, 3)
    ipv6 = dict(EXPLICIT, MLM_COORDINATOR_ADDRESS="[::1]:1234")
    assert detect_setup(ipv6).coordinator_address == "[::1]:1234"


@pytest.mark.parametrize("missing", sorted(EXPLICIT))
def test_partial_explicit_variables_name_the_missing_one(missing):
    environ = {k: v for k, v in EXPLICIT.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing} is not set"):
        detect_setup(environ)


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:", ":1234", "host:70000", "host:ab"])
def test_coordinator_address_needs_a_port(address):
    with pytest.raises(ConfigError, match="^MLM_COORDINATOR_ADDRESS=.*host:port"):
        detect_setup(dict(EXPLICIT, MLM_COORDINATOR_ADDRESS=address))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MLM_NUM_PROCESSES", "0"),
        ("MLM_NUM_PROCESSES", "four"),
        ("MLM_PROCESS_ID", "-1"),
        ("MLM_PROCESS_ID", "4"),
    ],
)
def test_process_numbers_must_be_in_range(name, value):
    with pytest.raises(ConfigError, match=f"^{name}="):
        detect_setup(dict(EXPLICIT, **{name: value}))


def test_explicit_variables_win_over_slurm_and_tpu():
    assert detect_setup({**SLURM_STEP, **EXPLICIT}, tpu_vm=True).how == "explicit"


def test_slurm_step_with_several_tasks():
    setup = detect_setup(SLURM_STEP)
    # JAX's SLURM convention: the first node, port 61440 + job id % 4096.
    assert setup == DistributedSetup("slurm", "gpu017:62016", 2, 1)
    override = detect_setup(dict(SLURM_STEP, JAX_COORDINATOR_PORT="5555"))
    assert override.coordinator_address == "gpu017:5555"


def test_slurm_address_matches_jax_own_detection(monkeypatch):
    from jax._src.clusters import SlurmCluster

    for name, value in SLURM_STEP.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    assert SlurmCluster.is_env_present()
    expected = SlurmCluster.get_coordinator_address(None, None)
    assert detect_setup(SLURM_STEP).coordinator_address == expected


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node001", "node001"),
        ("node001,host2", "node001"),
        ("node[001-015],host2", "node001"),
        ("node[007,009-015]", "node007"),
        ("rack[1-2]-node[07,09]", "rack1-node07"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_single_task_slurm_is_a_single_process():
    assert detect_setup(dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")).how == (
        "single"
    )
    assert detect_setup({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).how == (
        "single"
    )


def test_slurm_tasks_without_srun_are_refused():
    # The batch script itself (no srun) of a 2-task job: one process would wait for a second.
    batch = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    with pytest.raises(ConfigError, match="^SLURM_NTASKS=2 .*srun"):
        detect_setup(batch)


def test_slurm_step_without_a_node_list_is_refused():
    environ = {k: v for k, v in SLURM_STEP.items() if not k.endswith("NODELIST")}
    with pytest.raises(ConfigError, match="^SLURM_STEP_NODELIST"):
        detect_setup(environ)


def test_tpu_vm():
    assert detect_setup({}, tpu_vm=True) == DistributedSetup("tpu", None, None, None)
    # JAX skips the metadata server with TPU_SKIP_MDS_QUERY; GKE names the workers instead.
    assert detect_setup({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True).how == "single"
    gke = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "w-0,w-1", "TPU_WORKER_ID": "1"}
    assert detect_setup(gke, tpu_vm=True).how == "tpu"
    assert detect_setup(gke, tpu_vm=False).how == "single"


@pytest.fixture
def initialize_calls(monkeypatch):
    """Records jax.distributed.initialize calls instead of making them."""
    calls = []
    monkeypatch.setattr(distributed, "_applied", None)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed, "running_on_tpu_vm", lambda: False)
    return calls


@pytest.fixture
def no_cpu_collectives():
    """No cross-process CPU collectives chosen, as older jax versions default to."""
    before = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", None)
    yield
    jax.config.update("jax_cpu_collectives_implementation", before)


def test_initialize_explicit_passes_the_values_once(initialize_calls, no_cpu_collectives):
    setup = distributed.initialize_from_environment(EXPLICIT)
    assert distributed.initialize_from_environment(EXPLICIT) is setup
    assert distributed.initialize_from_environment({}) is setup  # Idempotent.
    assert initialize_calls == [
        dict(
            coordinator_address="10.0.0.1:1234",
            num_processes=4,
            process_id=3,
            cluster_detection_method="deactivate",
        )
    ]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_initialize_on_tpu_lets_jax_detect_the_slice(initialize_calls, monkeypatch):
    monkeypatch.setattr(distributed, "running_on_tpu_vm", lambda: True)
    assert distributed.initialize_from_environment({}).how == "tpu"
    assert initialize_calls == [{}]


def test_initialize_single_process_starts_nothing(initialize_calls):
    assert distributed.initialize_from_environment({}).how == "single"
    assert initialize_calls == []


# One process of a real run: 2 CPU devices each, rows 1..4 spread over 2 processes.
WORKER = """
import json
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mlm.distributed import initialize_from_environment

setup = initialize_from_environment()
assert initialize_from_environment() is setup
mesh = Mesh(np.asarray(jax.devices()), ("data",))
local = np.arange(1, 3, dtype=np.float32) + 2 * jax.process_index()
rows = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), local)
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(rows)
print(json.dumps(dict(
    how=setup.how, process_index=jax.process_index(), process_count=jax.process_count(),
    devices=jax.device_count(), local_devices=jax.local_device_count(),
    shape=list(rows.shape), total=float(total),
)))
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environ() -> dict[str, str]:
    """The test environment without any launcher's variables."""
    prefixes = ("MLM_", "SLURM_", "JAX_COORDINATOR", "XLA_FLAGS", "TPU_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def launcher_environ(kind: str, port: int, process_id: int) -> dict[str, str]:
    if kind == "explicit":
        return {
            "MLM_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "MLM_NUM_PROCESSES": "2",
            "MLM_PROCESS_ID": str(process_id),
        }
    return dict(
        SLURM_STEP,
        SLURM_PROCID=str(process_id),
        SLURM_STEP_NODELIST="localhost",
        JAX_COORDINATOR_PORT=str(port),
    )


@pytest.mark.parametrize("kind", ["explicit", "slurm"])
def test_two_processes_compute_a_global_sum(kind):
    port = free_port()
    processes = []
    for process_id in range(2):
        env = clean_environ()
        env.update(launcher_environ(kind, port, process_id))
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    reports = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert [report["process_index"] for report in reports] == [0, 1]
    for report in reports:
        assert report["how"] == kind
        assert report["process_count"] == 2
        assert (report["devices"], report["local_devices"]) == (4, 2)
        assert report["shape"] == [4]
        assert report["total"] == 1 + 2 + 3 + 4
