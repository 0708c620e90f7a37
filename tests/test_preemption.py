"""Tests of never losing a run: SIGTERM, kill -9 at random moments, damaged checkpoint steps."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mlm.data.tokenizer import train_wordpiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [
    "river",
    "stone",
    "light",
    "garden",
    "window",
    "paper",
    "music",
    "winter",
    "market",
    "city",
    "north",
    "bridge",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    documents = [
        "\n".join(
            " ".join(rng.choice(WORDS, rng.integers(3, 10))) + "."
            for _ in range(rng.integers(2, 6))
        )
        for _ in range(150)
    ]
    train = root / "train.txt"
    train.write_text("\n\n".join(documents[:130]) + "\n")
    evaluation = root / "eval.txt"
    evaluation.write_text("\n\n".join(documents[130:]) + "\n")
    vocab = train_wordpiece([str(train)], 100, True, str(root / "vocab.txt"))
    return str(train), str(evaluation), vocab


def command(corpus, workdir, num_steps, checkpoint_every):
    train, evaluation, vocab = corpus
    overrides = {
        "model.vocab_size": 128,
        "model.hidden_size": 32,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "model.intermediate_size": 64,
        "model.max_position_embeddings": 32,
        "model.dropout_rate": 0.1,
        "data.seq_length": 32,
        "data.max_predictions_per_seq": 5,
        "data.train_files": train,
        "data.eval_files": evaluation,
        "data.vocab_file": vocab,
        "train.global_batch_size": 8,
        "train.num_steps": num_steps,
        "train.log_every": 1,
        "train.checkpoint_every": checkpoint_every,
        "train.keep_checkpoints": 2,
        "train.eval_every": 15,  # Kills may land in an eval too.
        "train.eval_steps": 2,
        "optimizer.warmup_steps": 10,
    }
    args = [sys.executable, "-m", "mlm.train", "--config", "configs/quickstart.py"]
    args += ["--workdir", str(workdir)]
    return args + [f"--config.{name}={value}" for name, value in overrides.items()]


def start(args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        return {record["step"]: record["loss"] for record in map(json.loads, file)}


def final_params(workdir):
    """The params of step 60 as numpy arrays, read without a restore target."""
    import orbax.checkpoint as ocp

    path = os.path.join(str(workdir), "checkpoints", "60", "state")
    restored = ocp.StandardCheckpointer().restore(path)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(restored["params"])]


def logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as file:
        return sum(1 for _ in file)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full") / "run"
    result = subprocess.run(
        command(corpus, workdir, 60, 10), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The run says which kernels it compiled: the CPU set for a mesh of CPU devices.
    assert "kernels: cpu (model.kernels=auto, cpu mesh {'data': 1, 'fsdp': 1})" in result.stderr
    return workdir


def test_sigterm_saves_the_step_in_flight_and_the_run_resumes_exactly(
    corpus, uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    process = start(command(corpus, workdir, 60, 10))
    while logged_steps(workdir) < 13:  # Past the first checkpoint, between two of them.
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    line = [line for line in stderr.splitlines() if line.startswith("SIGTERM")][-1]
    stopped = int(line.split("at step ")[1].split()[0])
    assert stopped > 12 and stopped % 10  # Not a regular checkpoint step.
    assert "run the same command to resume" in line
    assert str(stopped) in os.listdir(workdir / "checkpoints")
    again = subprocess.run(
        command(corpus, workdir, 60, 10), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {workdir}/checkpoints step {stopped}" in again.stderr
    assert losses(workdir) == losses(uninterrupted)  # Bit for bit, every step.
    assert evals(workdir) == evals(uninterrupted)


def test_kill_9_at_random_moments_changes_nothing(corpus, uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    while True:
        process = start(command(corpus, workdir, 60, 10))
        target = logged_steps(workdir) + rng.randint(3, 15)
        while process.poll() is None and logged_steps(workdir) < target:
            time.sleep(0.01)
        if process.poll() is not None:  # Finished before the kill.
            assert process.returncode == 0, process.communicate()[1][-2000:]
            break
        time.sleep(rng.uniform(0, 0.3))  # Mid-step, mid-save or mid-log.
        process.kill()
        process.communicate()
        kills += 1
    print(f"kill -9 test: {kills} kills")
    assert kills >= 3
    assert losses(workdir) == losses(uninterrupted)
    assert evals(workdir) == evals(uninterrupted)  # Kills in an eval or after a save too.
    for a, b in zip(final_params(workdir), final_params(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)  # Bit for bit.


def test_a_damaged_step_is_reported_and_the_previous_one_is_used(corpus, uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["50", "60"]
    damaged = 0
    for root, _, names in os.walk(workdir / "checkpoints" / "60" / "state"):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "r+b") as file:
                size = os.path.getsize(path)
                file.seek(size // 2)
                file.write(b"\xff" * min(64, max(1, size - size // 2)))
                damaged += 1
    assert damaged
    result = subprocess.run(
        command(corpus, workdir, 60, 10), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint step 60 is incomplete or damaged" in result.stderr
    assert f"resumed from {workdir}/checkpoints step 50" in result.stderr
    assert os.path.isdir(workdir / "checkpoints" / "damaged" / "60")
    assert losses(workdir) == losses(uninterrupted)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_saved_step(corpus, tmp_path):
    workdir = tmp_path / "run"
    args = command(corpus, workdir, 3000, 1000)[3:]  # Without `python -m mlm.train`.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLM_", "SLURM_"))}
    env.update(PYTHON=sys.executable, MLM_LOCAL_DEVICES="1")
    launcher = subprocess.Popen(
        [os.path.join(ROOT, "launch", "local.sh"), "2", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while logged_steps(workdir) < 10:
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        time.sleep(0.05)
    pattern = f"mlm.train --config configs/quickstart.py --workdir {workdir}"
    processes = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    pids = [int(pid) for pid in processes.stdout.split()]
    assert len(pids) == 2
    os.kill(max(pids), signal.SIGTERM)  # One process only: JAX's preemption sync tells the other.
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, output[-3000:]
    line = [line for line in output.splitlines() if "SIGTERM: saved a checkpoint" in line][-1]
    stopped = line.split("at step ")[1].split()[0]
    assert os.listdir(workdir / "checkpoints") == [stopped]  # One step, saved by both.


def evals(workdir):
    with open(os.path.join(workdir, "eval_metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def test_sigterm_on_an_eval_step_keeps_that_eval(corpus, tmp_path):
    # Every step evaluates, so the signal lands on an eval step: the step is saved without its
    # eval, and the resumed run evaluates it first.
    def every_step_evaluates(workdir):
        return command(corpus, workdir, 14, 100) + [
            "--config.train.eval_every=1",
            "--config.train.eval_steps=1",
        ]

    full = tmp_path / "full"
    result = subprocess.run(
        every_step_evaluates(full), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    workdir = tmp_path / "run"
    process = start(every_step_evaluates(workdir))
    while logged_steps(workdir) < 4:
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    stopped = int(stderr.split("saved a checkpoint at step ")[1].split()[0])
    assert stopped < 14 and stopped not in [record["step"] for record in evals(workdir)]
    again = subprocess.run(
        every_step_evaluates(workdir), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"eval step {stopped}:" in again.stderr
    assert evals(workdir) == evals(full)  # The same steps, each once, with the same values.
    assert losses(workdir) == losses(full)
