"""Tests of launch/: syntax, a real 2-process local run, and the cloud scripts against stand-ins."""

import json
import os
import shlex
import shutil
import signal
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
# The recorder answering as the TPU API and worker 0 would: `describe` prints the next line of
# $TPU_STATES (the last line stays; GONE fails, as for a deleted slice) and worker 0's poll prints
# a log line and `mlm_train: LINES STATUS`, STATUS the next line of $TRAIN_STATUSES. Both files
# are optional: READY and 0.
GCLOUD = (
    RECORDER
    + r"""next_line() {
  head -n 1 "$1"
  if (($(wc -l <"$1") > 1)); then sed -i 1d "$1"; fi
}
case " $* " in
  *" describe "*)
    state=READY
    [[ -f ${TPU_STATES:-} ]] && state=$(next_line "$TPU_STATES")
    [[ $state == GONE ]] && exit 1
    echo "$state"
    ;;
  *" --worker=0 "*)
    status=0
    [[ -f ${TRAIN_STATUSES:-} ]] && status=$(next_line "$TRAIN_STATUSES")
    echo "step 1 loss 9.9"
    echo "mlm_train: 1 $status"
    ;;
esac
exit 0
"""
)


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
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith(("[0] ", "[1] ")) for line in lines if line)
    assert "\r" not in result.stdout  # Piped: plain progress lines, from process 0 only.
    progress = [line.split(":")[0] for line in lines if line.startswith(("[0] step", "[1] step"))]
    assert progress == ["[0] step 2/4", "[0] step 4/4"]
    first = [line for line in lines if line.startswith("[0] ")]
    assert first[0].startswith("[0] preparing the input data in ")  # Before any slow work.
    assert "[0] compiling the train step; training steps 1 to 4..." in first
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
    write_executable(bin_dir / "gcloud", GCLOUD)
    write_executable(bin_dir / "srun", RECORDER)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLM_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", CALL_LOG=str(log), MLM_TPU_POLL_S="0")
    for name in (
        "NAME",
        "ZONE",
        "ACCELERATOR_TYPE",
        "RUNTIME_VERSION",
        "CONFIG",
        "WORKDIR",
        "SPOT",
        "PREEMPTIBLE",
        "MAX_RESTARTS",
        "KEEP",
    ):
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


def training_command(start: str) -> str:
    """The mlm.train command inside the ssh command that starts training detached."""
    words = shlex.split(start.removeprefix("--command="))
    at = words.index("nohup")
    assert words[at : at + 4] == ["nohup", "setsid", "bash", "-c"]
    assert words[-6:] == [">", "~/mlm_train.log", "2>&1", "<", "/dev/null", "&"]
    run = words[at + 4]
    assert run.startswith("trap stopped=1 TERM; ")
    return run.split("; ")[1]


def test_tpu_vm_creates_installs_trains_and_deletes(stand_ins):
    env, calls = stand_ins
    result = run_script("tpu_vm.sh", TPU_ARGS, env)
    assert result.returncode == 0, result.stderr
    recorded = calls()
    assert [call[:4] for call in recorded] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 7
    create, scp, install, start, describe, poll, delete = (call[4:] for call in recorded)
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
    assert start[:2] == ["ssh", "mlm-test"] and "--worker=all" in start
    command = training_command(start[-1])
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
    assert "gs://" not in start[-1]
    assert "workdir: gs://bucket/run is ~/gcs/bucket/run on every worker" in result.stderr
    # Training runs detached; the script polls the slice's state and worker 0 until it ends.
    assert "follow worker 0 with: gcloud compute tpus tpu-vm ssh mlm-test" in result.stderr
    assert "--command='tail -f ~/mlm_train.log'" in result.stderr
    assert describe == ["describe", "mlm-test", "--zone=us-central2-b", "--format=value(state)"]
    assert poll[:2] == ["ssh", "mlm-test"] and "--worker=0" in poll
    assert "step 1 loss 9.9" in result.stdout  # Worker 0's log lines are printed here.
    assert "training finished on mlm-test" in result.stderr
    assert delete[:2] == ["delete", "mlm-test"] and "--quiet" in delete


def test_tpu_vm_commands_install_mount_and_train_on_a_worker(stand_ins, tmp_path):
    """Runs the recorded remote commands under bash on a stand-in worker (its own HOME and PATH)."""
    env, calls = stand_ins
    args = list(TPU_ARGS)
    args[args.index("--workdir") + 1] = "gs://my-bucket.data/runs/base 1"
    result = run_script("tpu_vm.sh", args, env)
    assert result.returncode == 0, result.stderr
    install, start, _, poll = (call[-1].removeprefix("--command=") for call in calls()[2:6])
    mount_part, _, rest = install.partition(" && rm -rf ~/mlm")
    assert rest  # The package install follows the mount.

    home = tmp_path / "worker"
    (home / "mlm").mkdir(parents=True)
    bin_dir = tmp_path / "worker_bin"
    bin_dir.mkdir()
    tools = ("bash", "basename", "cat", "cp", "dirname", "mkdir", "mv", "nohup", "rm", "sed")
    for tool in (*tools, "setsid", "sleep", "wc"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    log = tmp_path / "worker.log"
    write_executable(bin_dir / "lsb_release", "#!/usr/bin/env bash\necho jammy\n")
    write_executable(bin_dir / "mountpoint", RECORDER + "exit $MOUNTED\n")
    write_executable(bin_dir / "gcsfuse.deb", RECORDER)
    # Training logs a line; with $PIDS it waits for SIGTERM (and then exits 0, as mlm.train does).
    write_executable(
        bin_dir / "python3",
        RECORDER
        + """echo "step 1 loss 9.9"
if [[ -n ${PIDS:-} ]]; then
  trap 'exit 0' TERM
  echo "$PPID $$" > "$PIDS"
  for ((i = 0; i < 400; i++)); do sleep 0.05; done  # At most 20 s, should the test fail.
fi
""",
    )
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
            ["bash", "-c", command], env=worker_env, capture_output=True, text=True, timeout=30
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
    # Training starts detached, gets the mounted path (the ~ expanded on the worker and the space
    # kept), logs to ~/mlm_train.log and leaves its exit status in ~/mlm_train.status.
    status_file = home / "mlm_train.status"

    def wait_for_status() -> str:
        deadline = time.monotonic() + 20
        while not status_file.exists():
            assert time.monotonic() < deadline, "training never wrote ~/mlm_train.status"
            time.sleep(0.05)
        return status_file.read_text().strip()

    on_worker(start)
    assert wait_for_status() == "0"
    [trained] = log.read_text().splitlines()
    trained_args = shlex.split(trained)
    assert trained_args[trained_args.index("--workdir") + 1] == f"{mount_point}/runs/base 1"
    assert (home / "mlm_train.log").read_text() == "step 1 loss 9.9\n"
    # Worker 0's answer to a poll: the log lines not shown yet, then the line count and status.
    answer = subprocess.run(
        ["bash", "-c", poll], env=worker_env, capture_output=True, text=True, check=True
    )
    assert answer.stdout == "step 1 loss 9.9\nmlm_train: 1 0\n"
    status_file.unlink()
    answer = subprocess.run(
        ["bash", "-c", poll], env=worker_env, capture_output=True, text=True, check=True
    )
    assert answer.stdout.endswith("mlm_train: 1 running\n")
    # SIGTERM (a preempted VM shutting down) reaches the wrapper and training: the status says so.
    pids = tmp_path / "pids"
    worker_env["PIDS"] = str(pids)
    on_worker(start)
    deadline = time.monotonic() + 20
    while not pids.exists() or not pids.read_text().endswith("\n"):
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    for pid in pids.read_text().split():
        os.kill(int(pid), signal.SIGTERM)
    assert wait_for_status() == "stopped"


def test_tpu_vm_deletes_the_slice_when_training_fails(stand_ins):
    env, calls = stand_ins
    env["FAIL_MATCH"] = "mlm.train"
    result = run_script("tpu_vm.sh", TPU_ARGS, env)
    assert result.returncode == 1
    assert [call[4] for call in calls()] == ["create", "scp", "ssh", "ssh", "delete"]


def test_tpu_vm_exits_with_the_training_status_of_worker_0(stand_ins, tmp_path):
    env, calls = stand_ins
    (tmp_path / "statuses").write_text("running\nrunning\n3\n")
    env["TRAIN_STATUSES"] = str(tmp_path / "statuses")
    result = run_script("tpu_vm.sh", ["--spot", *TPU_ARGS], env)
    assert result.returncode == 3  # A failure that is not a preemption is not retried.
    assert [call[4] for call in calls()] == [
        *["create", "scp", "ssh", "ssh"],
        *["describe", "ssh"] * 3,
        "delete",
    ]
    assert "error: training failed on worker 0 of mlm-test with exit status 3" in result.stderr


def test_tpu_vm_dry_run_prints_the_commands_a_run_makes_and_calls_nothing(stand_ins):
    env, calls = stand_ins
    dry = run_script("tpu_vm.sh", ["--dry-run", *TPU_ARGS], env)
    assert dry.returncode == 0, dry.stderr
    assert calls() == []
    lines = [shlex.split(line) for line in dry.stdout.splitlines() if not line.startswith("#")]
    assert lines[1][:2] == ["tar", "-czf"]
    printed = lines[:1] + lines[2:]
    # The same commands, in the same order, as a run whose training ends at the first poll.
    run = run_script("tpu_vm.sh", TPU_ARGS, env)
    assert run.returncode == 0, run.stderr
    recorded = calls()
    assert recorded[1][5].endswith("/mlm.tar.gz")
    recorded[1][5] = "mlm.tar.gz"
    assert printed == recorded


def test_tpu_vm_detach_returns_once_training_started(stand_ins):
    env, calls = stand_ins
    result = run_script("tpu_vm.sh", ["--detach", *TPU_ARGS], env)
    assert result.returncode == 0, result.stderr
    assert [call[4] for call in calls()] == ["create", "scp", "ssh", "ssh"]  # No poll, no delete.
    assert "--command='tail -f ~/mlm_train.log'" in result.stderr
    assert "kept TPU VM mlm-test (--detach)" in result.stderr


@pytest.mark.parametrize(
    ("states", "statuses", "after_start"),
    [
        # Preempted while training: deleted and created again.
        ("READY PREEMPTED READY", "running 0", ["describe", "ssh", "describe", "delete"]),
        # Gone (describe fails three times): created again.
        ("GONE GONE GONE READY", "0", ["describe"] * 3),
        # SIGTERM stopped training (it saved a checkpoint) before the state changed.
        ("READY", "stopped 0", ["describe", "ssh", "delete"]),
    ],
)
def test_tpu_vm_spot_recreates_a_preempted_slice_and_resumes(
    stand_ins, tmp_path, states, statuses, after_start
):
    env, calls = stand_ins
    (tmp_path / "states").write_text("\n".join(states.split()) + "\n")
    (tmp_path / "statuses").write_text("\n".join(statuses.split()) + "\n")
    env.update(TPU_STATES=str(tmp_path / "states"), TRAIN_STATUSES=str(tmp_path / "statuses"))
    result = run_script("tpu_vm.sh", ["--spot", *TPU_ARGS], env)
    assert result.returncode == 0, result.stderr
    recorded = calls()
    start = ["create", "scp", "ssh", "ssh"]
    assert [call[4] for call in recorded] == [
        *start,
        *after_start,
        *start,
        *["describe", "ssh", "delete"],
    ]
    creates = [call for call in recorded if call[4] == "create"]
    assert creates[0] == creates[1] and "--spot" in creates[0]
    # The same training command again: it resumes from the workdir's last checkpoint.
    first, second = (call for call in recorded if "nohup" in call[-1])
    assert first == second
    assert "recreating it (restart 1 of 5), training resumes from gs://bucket/run" in result.stderr


def test_tpu_vm_gives_up_after_max_restarts(stand_ins, tmp_path):
    env, calls = stand_ins
    (tmp_path / "states").write_text("PREEMPTED\n")
    env["TPU_STATES"] = str(tmp_path / "states")
    args = ["--preemptible", "--max-restarts", "1", *TPU_ARGS]
    result = run_script("tpu_vm.sh", args, env)
    assert result.returncode == 1
    attempt = ["create", "scp", "ssh", "ssh", "describe", "delete"]
    recorded = calls()
    assert [call[4] for call in recorded] == attempt * 2
    assert "--preemptible" in recorded[0]
    assert result.stderr.splitlines()[-1] == (
        "error: TPU VM mlm-test was preempted 2 times, more than --max-restarts 1; "
        "rerun the same command to resume from gs://bucket/run"
    )


def test_tpu_vm_without_spot_stops_when_the_slice_is_lost(stand_ins, tmp_path):
    env, calls = stand_ins
    (tmp_path / "states").write_text("READY\nTERMINATED\n")
    (tmp_path / "statuses").write_text("running\n")
    env.update(TPU_STATES=str(tmp_path / "states"), TRAIN_STATUSES=str(tmp_path / "statuses"))
    result = run_script("tpu_vm.sh", TPU_ARGS, env)
    assert result.returncode == 1
    assert [call[4] for call in calls()] == [
        *["create", "scp", "ssh", "ssh", "describe", "ssh", "describe"],
        "delete",
    ]
    assert (
        "error: TPU VM mlm-test is TERMINATED before training finished; rerun the same command"
        in result.stderr
    )


@pytest.mark.parametrize("option", ["--dry-rn", "--mode", "train"])
def test_tpu_vm_refuses_unknown_options_with_usage(stand_ins, option):
    env, calls = stand_ins
    args = [*TPU_ARGS[: TPU_ARGS.index("--")], option]
    result = run_script("tpu_vm.sh", args, env)
    assert result.returncode == 2
    message, usage = result.stderr.splitlines()
    assert message == (
        f"error: unknown option '{option}'; mlm.train flags other than --config.FIELD go after --"
    )
    assert usage.startswith("usage: launch/tpu_vm.sh --name NAME")
    assert calls() == []


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
    # No delete.
    assert [call[4] for call in recorded] == ["create", "scp", "ssh", "ssh", "describe", "ssh"]
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
        ({"--spot": None, "--preemptible": None}, "--spot and --preemptible exclude each other"),
        ({"--spot": None, "--accelerator-type": "v4-8", "--workdir": "/tmp/run"}, "is not gs://"),
        ({"--max-restarts": "many"}, "--max-restarts 'many' is not a whole number"),
    ],
)
def test_tpu_vm_refuses_bad_input_before_any_gcloud_call(stand_ins, tmp_path, change, message):
    env, calls = stand_ins
    outside = tmp_path / "config.py"
    outside.write_text("")
    args = list(TPU_ARGS)
    for flag, value in change.items():
        if value is None:  # An option without a value.
            args.insert(0, flag)
        elif flag not in args:
            args[:0] = [flag, value]
        else:
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
            "1",
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
