"""Tests of launch/: syntax, a real 2-process local run, and the cloud scripts against stand-ins."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from mlm.data.tokenizer import train_wordpiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["local.sh", "tpu_vm.sh", "slurm_gpu.sbatch", "gpu_bench.sh"]
# Records each call as one shell-quoted line; fails when the call contains $FAIL_MATCH.
RECORDER = """#!/usr/bin/env bash
printf '%q ' "$(basename "$0")" "$@" >> "$CALL_LOG"
printf '\\n' >> "$CALL_LOG"
if [[ -n ${FAIL_MATCH:-} && "$*" == *"$FAIL_MATCH"* ]]; then exit 1; fi
"""


def write_executable(path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = os.path.join(LAUNCH, script)
    subprocess.run(["bash", "-n", path], check=True)
    assert os.access(path, os.X_OK)
    with open(path) as file:
        head = file.read(400)
    assert head.startswith("#!/usr/bin/env bash\n") and "Usage" in head


# --- launch/local.sh ---


def write_corpus(path, num_documents: int) -> str:
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "river",
        "stone",
        "cloud",
        "light",
        "shadow",
        "field",
        "garden",
        "window",
    ]
    lines = []
    for doc in range(num_documents):
        for sentence in range(3):
            lines.append(" ".join(words[(doc + sentence + i) % len(words)] for i in range(6)) + ".")
        lines.append("")
    path.write_text("\n".join(lines))
    return str(path)


def test_local_two_processes_log_what_one_process_logs(tmp_path):
    train_file = write_corpus(tmp_path / "train.txt", 60)
    vocab = train_wordpiece([train_file], 100, True, str(tmp_path / "vocab.txt"))
    workdir = tmp_path / "workdir"
    overrides = {
        "model.vocab_size": 128,
        "model.hidden_size": 32,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "model.intermediate_size": 64,
        "model.max_position_embeddings": 32,
        "data.seq_length": 32,
        "data.max_predictions_per_seq": 5,
        "data.train_files": train_file,
        "data.vocab_file": vocab,
        "data.input_shards": 2,  # The same global batches for 1 or 2 processes.
        "model.dropout_rate": 0.1,
        "train.global_batch_size": 4,
        "train.num_steps": 4,
        "train.log_every": 2,
        "train.checkpoint_every": 4,
        "optimizer.warmup_steps": 2,
    }
    args = ["--config", "configs/quickstart.py", "--workdir", str(workdir), "--mode", "train"]
    args += [f"--config.{name}={value}" for name, value in overrides.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLM_", "SLURM_"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=ROOT, MLM_LOCAL_DEVICES="1")
    result = subprocess.run(
        [os.path.join(LAUNCH, "local.sh"), "2", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    with open(workdir / "metrics.jsonl") as file:
        two = [json.loads(line) for line in file]
    assert [record["step"] for record in two] == [2, 4]
    assert os.listdir(workdir / "checkpoints") == ["4"]
    lines = result.stdout.replace("\r", "\n").splitlines()
    assert lines and all(line.startswith(("[0] ", "[1] ")) for line in lines if line)
    assert "[0] train: 100%" in result.stdout
    single = tmp_path / "single"
    args[args.index(str(workdir))] = str(single)
    one_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, "-m", "mlm.train", *args],
        cwd=ROOT,
        env=one_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(single / "metrics.jsonl") as file:
        one = [json.loads(line) for line in file]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "masked_lm_accuracy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_local_stops_the_others_when_one_fails(tmp_path):
    fake = write_executable(
        tmp_path / "python",
        f"""#!/usr/bin/env bash
[[ $1 == -c ]] && exec {sys.executable} "$@"
echo "process $MLM_PROCESS_ID of $MLM_NUM_PROCESSES at $MLM_COORDINATOR_ADDRESS: $XLA_FLAGS"
[[ $MLM_PROCESS_ID == 1 ]] && sleep 1 && exit 3
exec sleep 60
""",
    )
    env = dict(os.environ, PYTHON=fake, XLA_FLAGS="--xla_dump_to=/nowhere", MLM_LOCAL_DEVICES="2")
    start = time.monotonic()
    result = subprocess.run(
        [os.path.join(LAUNCH, "local.sh"), "3"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3
    assert time.monotonic() - start < 15
    assert "process 1 exited with status 3" in result.stderr
    for i in range(3):
        assert f"[{i}] process {i} of 3 at 127.0.0.1:" in result.stdout
    flags = "--xla_dump_to=/nowhere --xla_force_host_platform_device_count=2"
    assert result.stdout.count(flags) == 3


@pytest.mark.parametrize("args", [[], ["0"], ["two"]])
def test_local_needs_a_process_count(args):
    result = subprocess.run(
        [os.path.join(LAUNCH, "local.sh"), *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "usage: launch/local.sh N" in result.stderr


# --- launch/tpu_vm.sh and launch/slurm_gpu.sbatch against recording stand-ins ---


@pytest.fixture
def stand_ins(tmp_path):
    """Puts recording `gcloud` and `srun` first on PATH; returns (env, read calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun"):
        write_executable(bin_dir / name, RECORDER)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLM_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", CALL_LOG=str(log))
    for name in ("NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "CONFIG", "WORKDIR"):
        env.pop(name, None)

    def calls() -> list[list[str]]:
        if not log.exists():
            return []
        return [shlex.split(line) for line in log.read_text().splitlines()]

    return env, calls


def run_script(script: str, args: list[str], env: dict[str, str]):
    return subprocess.run(
        ["bash", os.path.join(LAUNCH, script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


TPU_ARGS = [
    "--name",
    "mlm-test",
    "--zone",
    "us-central2-b",
    "--accelerator-type",
    "v4-32",
    "--config",
    "configs/quickstart.py",
    "--workdir",
    "gs://bucket/run",
    "--config.train.num_steps=10",
    "--",
    "--mode",
    "train",
]


def test_tpu_vm_creates_installs_trains_and_deletes(stand_ins):
    env, calls = stand_ins
    result = run_script("tpu_vm.sh", TPU_ARGS, env)
    assert result.returncode == 0, result.stderr
    recorded = calls()
    assert [call[:4] for call in recorded] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 5
    create, scp, install, train, delete = (call[4:] for call in recorded)
    assert create[:2] == ["create", "mlm-test"]
    assert {"--zone=us-central2-b", "--accelerator-type=v4-32"} <= set(create)
    assert "--version=tpu-ubuntu2204-base" in create
    assert scp[0] == "scp" and scp[2] == "mlm-test:mlm.tar.gz" and "--worker=all" in scp
    assert install[:2] == ["ssh", "mlm-test"] and "--worker=all" in install
    install_command = install[-1].removeprefix("--command=")
    install_words = shlex.split(install_command)
    # The tpu extra pins jax[tpu] to the tested version; the shell expands ~ before '[tpu]'.
    assert install_words[-5:] == ["pip", "install", "-q", "-e", "~/mlm[tpu]"]
    assert "pip install -q -e ~/mlm'[tpu]'" in install_command
    # The gs:// workdir's bucket is mounted with gcsfuse (installed if missing) on every worker.
    assert "command -v gcsfuse >/dev/null ||" in install_command
    assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" in (
        install_command
    )
    assert "[signed-by=/usr/share/keyrings/cloud.google.asc]" in install_command
    assert "apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse" in install_command
    assert "mountpoint -q ~/gcs/bucket ||" in install_command
    assert (
        "gcsfuse --implicit-dirs --rename-dir-limit=1000000 bucket ~/gcs/bucket" in install_command
    )
    assert train[:2] == ["ssh", "mlm-test"] and "--worker=all" in train
    command = train[-1].removeprefix("--command=")
    assert shlex.split(command)[3:] == [
        "python3",
        "-m",
        "mlm.train",
        "--config",
        "configs/quickstart.py",
        "--workdir",
        "~/gcs/bucket/run",
        "--config.train.num_steps=10",
        "--mode",
        "train",
    ]
    assert "gs://" not in command
    assert "workdir: gs://bucket/run is ~/gcs/bucket/run on every worker" in result.stderr
    assert delete[:2] == ["delete", "mlm-test"] and "--quiet" in delete


def test_tpu_vm_commands_install_mount_and_train_on_a_worker(stand_ins, tmp_path):
    """Runs the recorded remote commands under bash on a stand-in worker (its own HOME and PATH)."""
    env, calls = stand_ins
    args = list(TPU_ARGS)
    args[args.index("--workdir") + 1] = "gs://my-bucket.data/runs/base 1"
    result = run_script("tpu_vm.sh", args, env)
    assert result.returncode == 0, result.stderr
    install, train = (call[-1].removeprefix("--command=") for call in calls()[2:4])
    mount_part, _, rest = install.partition(" && rm -rf ~/mlm")
    assert rest  # The package install follows the mount.

    home = tmp_path / "worker"
    (home / "mlm").mkdir(parents=True)
    bin_dir = tmp_path / "worker_bin"
    bin_dir.mkdir()
    for tool in ("bash", "basename", "cat", "cp", "dirname", "mkdir"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    log = tmp_path / "worker.log"
    write_executable(bin_dir / "lsb_release", "#!/usr/bin/env bash\necho jammy\n")
    write_executable(bin_dir / "mountpoint", RECORDER + "exit $MOUNTED\n")
    write_executable(bin_dir / "gcsfuse.deb", RECORDER)
    write_executable(bin_dir / "python3", RECORDER)
    # `sudo tee FILE` logs what it is given; `sudo apt-get ... install ... gcsfuse` installs it.
    write_executable(
        bin_dir / "sudo",
        RECORDER
        + """[[ $1 == tee ]] && cat >> "$CALL_LOG"
[[ $* == *" install "*gcsfuse* ]] && cp "$(dirname "$0")/gcsfuse.deb" "$(dirname "$0")/gcsfuse"
exit 0
""",
    )
    worker_env = {"HOME": str(home), "PATH": str(bin_dir), "CALL_LOG": str(log), "MOUNTED": "1"}

    def on_worker(command: str) -> list[str]:
        log.write_text("")
        done = subprocess.run(
            ["bash", "-c", command], env=worker_env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return log.read_text().splitlines()

    mount_point = f"{home}/gcs/my-bucket.data"
    keyring = "/usr/share/keyrings/cloud.google.asc"
    assert on_worker(mount_part) == [
        "sudo tee /etc/apt/sources.list.d/gcsfuse.list ",
        f"deb [signed-by={keyring}] https://packages.cloud.google.com/apt gcsfuse-jammy main",
        "sudo curl -fsSL -o /usr/share/keyrings/cloud.google.asc "
        "https://packages.cloud.google.com/apt/doc/apt-key.gpg ",
        "sudo apt-get -o DPkg::Lock::Timeout=600 update -qq ",
        "sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse ",
        f"mountpoint -q {mount_point} ",
        f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket.data {mount_point} ",
    ]
    assert os.path.isdir(mount_point)
    # Again, now that gcsfuse is installed and the bucket mounted: nothing to do.
    worker_env["MOUNTED"] = "0"
    assert on_worker(mount_part) == [f"mountpoint -q {mount_point} "]
    # Training gets the mounted path, the ~ expanded on the worker and the space kept.
    [trained] = on_worker(train)
    trained_args = shlex.split(trained)
    assert trained_args[trained_args.index("--workdir") + 1] == f"{mount_point}/runs/base 1"


def test_tpu_vm_deletes_the_slice_when_training_fails(stand_ins):
    env, calls = stand_ins
    env["FAIL_MATCH"] = "mlm.train"
    result = run_script("tpu_vm.sh", TPU_ARGS, env)
    assert result.returncode == 1
    assert [call[4] for call in calls()] == ["create", "scp", "ssh", "ssh", "delete"]


def test_tpu_vm_from_environment_variables_with_keep(stand_ins):
    env, calls = stand_ins
    env.update(
        NAME="mlm-env",
        ZONE="us-west4-a",
        ACCELERATOR_TYPE="v5litepod-16",
        CONFIG="configs/bert_tiny.py",
        WORKDIR="gs://bucket/tiny",
    )
    result = run_script("tpu_vm.sh", ["--keep"], env)
    assert result.returncode == 0, result.stderr
    recorded = calls()
    assert [call[4] for call in recorded] == ["create", "scp", "ssh", "ssh"]  # No delete.
    assert "--version=v2-alpha-tpuv5-lite" in recorded[0]
    assert (
        "gcsfuse --implicit-dirs --rename-dir-limit=1000000 bucket ~/gcs/bucket"
        in (recorded[2][-1])
    )
    assert "--workdir ~/gcs/bucket/tiny" in recorded[3][-1]
    assert "gs://" not in recorded[3][-1]
    assert "kept TPU VM mlm-env" in result.stderr  # Left running, the bucket still mounted.


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--workdir": "/tmp/run"}, "WORKDIR '/tmp/run' is not gs://: v4-32 has several hosts"),
        ({"--name": ""}, "no TPU name"),
        ({"--accelerator-type": "v4"}, "ACCELERATOR_TYPE 'v4' is not GENERATION-SIZE"),
        ({"--config": "OUTSIDE"}, "is outside the repository"),
        ({"--config": "configs/missing.py"}, "CONFIG 'configs/missing.py' is not a file"),
        ({"--workdir": "gs://My_Bucket/run"}, "WORKDIR 'gs://My_Bucket/run' has no valid bucket"),
        ({"--workdir": "gs:///run"}, "WORKDIR 'gs:///run' has no valid bucket name"),
    ],
)
def test_tpu_vm_refuses_bad_input_before_any_gcloud_call(stand_ins, tmp_path, change, message):
    env, calls = stand_ins
    outside = tmp_path / "config.py"
    outside.write_text("")
    args = list(TPU_ARGS)
    for flag, value in change.items():
        args[args.index(flag) + 1] = str(outside) if value == "OUTSIDE" else value
    result = run_script("tpu_vm.sh", args, env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert calls() == []


def test_single_host_tpu_accepts_a_local_workdir_with_a_warning(stand_ins):
    env, calls = stand_ins
    args = list(TPU_ARGS)
    args[args.index("--accelerator-type") + 1] = "v4-8"
    args[args.index("--workdir") + 1] = "/tmp/run"
    result = run_script("tpu_vm.sh", args, env)
    assert result.returncode == 0, result.stderr
    assert "warning: WORKDIR '/tmp/run' is on the TPU VM's disk" in result.stderr
    recorded = calls()
    assert [call[4] for call in recorded][-1] == "delete"
    assert "gcsfuse" not in recorded[2][-1]  # Nothing to mount.
    assert "--workdir /tmp/run " in recorded[3][-1]


def sbatch_options() -> dict[str, str]:
    options = {}
    with open(os.path.join(LAUNCH, "slurm_gpu.sbatch")) as file:
        for line in file:
            if line.startswith("#SBATCH --"):
                name, _, value = line.removeprefix("#SBATCH --").strip().partition("=")
                options[name] = value
    return options


def test_slurm_runs_one_train_process_per_node(stand_ins):
    assert {"nodes": "2", "ntasks-per-node": "1", "gpus-per-node": "8"}.items() <= (
        sbatch_options().items()
    )
    env, calls = stand_ins
    env.update(
        CONFIG="configs/bert_base.py",
        WORKDIR="/shared/runs/base",
        SLURM_JOB_ID="42",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu[1-2]",
        SLURM_NTASKS="2",
        SLURM_SUBMIT_DIR=ROOT,
    )
    result = run_script("slurm_gpu.sbatch", ["--config.train.num_steps=100"], env)
    assert result.returncode == 0, result.stderr
    assert calls() == [
        [
            "srun",
            "--ntasks-per-node=1",
            "--kill-on-bad-exit=1",
            "python",
            "-m",
            "mlm.train",
            "--config",
            "configs/bert_base.py",
            "--workdir",
            "/shared/runs/base",
            "--config.train.num_steps=100",
        ]
    ]


@pytest.mark.parametrize("missing", ["CONFIG", "WORKDIR"])
def test_slurm_needs_config_and_workdir(stand_ins, missing):
    env, calls = stand_ins
    env.update(CONFIG="configs/bert_base.py", WORKDIR="/shared/runs/base")
    del env[missing]
    result = run_script("slurm_gpu.sbatch", [], env)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {missing} is not set")
    assert calls() == []


def test_gpu_bench_quick_runs_every_case_and_prints_the_table(tmp_path):
    # --quick (BERT-tiny) runs the script's whole path on this CPU: the same four cases the GPU
    # run measures, the JSON records and the summary table.
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        [
            "bash",
            "launch/gpu_bench.sh",
            "--no-install",
            "--quick",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines()]
    cases = [(r["seq_length"], r["batch_size"], r["attention_dropout_rate"]) for r in records]
    assert cases == [(128, 8, 0.0), (128, 8, 0.1), (512, 4, 0.0), (512, 4, 0.1)]
    assert {(r["dtype"], r["kernels"]) for r in records} == {("bfloat16", "standard")}
    assert all(r["cudnn_attention"] is False for r in records)  # No GPU here.
    lines = result.stdout.splitlines()
    assert sum(line.startswith("train step (standard kernels) on ") for line in lines) == 4
    table = [line for line in lines if line.startswith("| 2 x 128 |")]
    assert len(table) == 4 and all(" | no | " in line for line in table)
    assert lines[-1].startswith("device: cpu, MFU against ")
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            ["bash", "launch/gpu_bench.sh", "--bogus"], cwd=ROOT, check=True, capture_output=True
        )
