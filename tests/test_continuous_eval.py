"""`--mode continuous_eval`: a second job evaluates each checkpoint a training job saves."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mlm import continuous_eval
from mlm.data.tokenizer import train_wordpiece
from mlm.train import train_and_evaluate
from mlm.workdir import read_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["river", "stone", "light", "garden", "window", "paper", "music", "winter", "market"]
NUM_STEPS = 12
CHECKPOINT_EVERY = 3
# What the training job (--mode train) writes; the evaluator adds only the last two.
TRAINING_FILES = {"checkpoints", "config.json", "lock", "metrics.jsonl", "tensorboard", "vocab.txt"}
EVALUATOR_FILES = {"eval_metrics.jsonl", "tensorboard_eval"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    documents = [
        "\n".join(
            " ".join(rng.choice(WORDS, rng.integers(3, 10))) + "."
            for _ in range(rng.integers(2, 6))
        )
        for _ in range(60)
    ]
    (root / "train.txt").write_text("\n\n".join(documents[:50]) + "\n")
    (root / "eval.txt").write_text("\n\n".join(documents[50:]) + "\n")
    train_wordpiece([str(root / "train.txt")], 100, True, str(root / "vocab.txt"))
    return {
        "data.train_files": str(root / "train.txt"),
        "data.eval_files": str(root / "eval.txt"),
        "data.vocab_file": str(root / "vocab.txt"),
    }


def overrides(corpus, **more):
    fields = {
        "model.vocab_size": 128,
        "model.hidden_size": 32,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "model.intermediate_size": 64,
        "model.max_position_embeddings": 32,
        "data.seq_length": 32,
        "data.max_predictions_per_seq": 5,
        "train.global_batch_size": 8,
        "train.num_steps": NUM_STEPS,
        "train.log_every": 3,
        "train.checkpoint_every": CHECKPOINT_EVERY,
        "train.keep_checkpoints": 0,
        "train.eval_steps": 2,
        "train.continuous_eval_timeout_s": 120,
        "optimizer.warmup_steps": 2,
        **corpus,
    }
    fields.update(more)
    return fields


def command(workdir, mode, fields):
    args = [sys.executable, "-m", "mlm.train", "--config", "configs/quickstart.py"]
    args += ["--workdir", str(workdir), "--mode", mode]
    return args + [f"--config.{name}={value}" for name, value in fields.items()]


def start(args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process, timeout=240):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # Only a process this test started.
        out, err = process.communicate()
    return process.returncode, out, err


def read_jsonl(path):
    with open(path) as file:
        return [json.loads(line) for line in file]


def snapshot(workdir, names):
    """(size, mtime, SHA-1) of every file under the given top-level names."""
    found = {}
    for name in names:
        top = os.path.join(workdir, name)
        walk = [(workdir, [], [name])] if os.path.isfile(top) else os.walk(top)
        for folder, _, files in walk:
            for file in files:
                path = os.path.join(folder, file)
                with open(path, "rb") as handle:
                    digest = hashlib.sha1(handle.read()).hexdigest()
                stat = os.stat(path)
                found[os.path.relpath(path, workdir)] = (stat.st_size, stat.st_mtime_ns, digest)
    return found


@pytest.fixture(scope="module")
def watched(corpus, tmp_path_factory):
    """A training job (--mode train) with an evaluator started first, before the workdir exists."""
    workdir = tmp_path_factory.mktemp("run") / "workdir"
    evaluator = start(command(workdir, "continuous_eval", overrides(corpus)))
    trainer = start(command(workdir, "train", overrides(corpus)))
    trained = finish(trainer)
    evaluated = finish(evaluator)
    assert trained[0] == 0, trained[2]
    assert evaluated[0] == 0, evaluated[2]
    return str(workdir), evaluated[2]


def test_every_checkpoint_is_evaluated_once_beside_the_training_job(watched, corpus, tmp_path):
    workdir, stderr = watched
    steps = list(range(CHECKPOINT_EVERY, NUM_STEPS + 1, CHECKPOINT_EVERY))
    assert sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))) == steps
    records = read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))
    assert [record["step"] for record in records] == steps
    assert [f"eval step {step}: " in stderr for step in steps] == [True] * len(steps)
    assert stderr.strip().splitlines()[-1] == (
        f"continuous eval: step {NUM_STEPS} (train.num_steps) is evaluated; stopped"
    )
    # The evaluator wrote only its own files: no lock taken, no best checkpoint, no config.
    assert set(os.listdir(workdir)) == TRAINING_FILES | EVALUATOR_FILES
    # --mode eval of the last step writes the same record, key for key and value for value.
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    os.remove(os.path.join(copy, "eval_metrics.jsonl"))
    again = train_and_evaluate(read_config(copy), copy, mode="eval")["eval"]
    assert again == records[-1]


def test_a_restarted_evaluator_skips_what_it_evaluated_and_times_out_in_one_line(watched, capfd):
    workdir, _ = watched
    path = os.path.join(workdir, "eval_metrics.jsonl")
    records = read_jsonl(path)
    with open(path, "w") as file:  # As if it had stopped after step 6.
        file.writelines(json.dumps(record) + "\n" for record in records[:2])
    before = snapshot(workdir, TRAINING_FILES)
    config = read_config(workdir)
    config.train.num_steps = 15  # A step that never comes.
    config.train.continuous_eval_timeout_s = 1.5
    capfd.readouterr()
    results = train_and_evaluate(config, workdir, mode="continuous_eval")
    assert [record["step"] for record in read_jsonl(path)] == [3, 6, 9, 12]
    assert read_jsonl(path)[2:] == records[2:]  # The same params give the same metrics.
    assert results["eval"] == records[-1]
    lines = capfd.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("eval step")] == [
        "eval step 9",
        "eval step 12",
    ]
    timed_out = [line for line in lines if "timed out" in line]
    assert timed_out == [lines[-1]]
    assert lines[-1].startswith("continuous eval timed out: no new checkpoint in ")
    assert lines[-1].endswith(" for 1.5 s (train.continuous_eval_timeout_s); stopped")
    assert snapshot(workdir, TRAINING_FILES) == before  # Read, never written.


def test_the_timeout_ends_the_command_with_status_0_and_creates_nothing(corpus, tmp_path):
    workdir = tmp_path / "never"
    fields = overrides(corpus, **{"train.continuous_eval_timeout_s": 0.5})
    code, _, stderr = finish(start(command(workdir, "continuous_eval", fields)))
    assert code == 0, stderr
    timed_out = [line for line in stderr.splitlines() if "timed out" in line]
    assert timed_out == [stderr.strip().splitlines()[-1]]
    assert not workdir.exists()
    assert continuous_eval.evaluated_steps(str(workdir)) == set()
