"""Multi-host tests of mlm.parallel and the per-process input: 2 CPU processes on 127.0.0.1."""

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from mlm import config as config_lib
from mlm.data.corpus import read_documents
from mlm.data.instances import chunk_documents
from mlm.data.tokenizer import encode_documents, load_vocab, train_wordpiece

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "river",
    "stone",
    "cloud",
    "light",
    "shadow",
    "field",
    "garden",
    "window",
]


def write_corpus(path, num_documents: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(num_documents):
        for _ in range(rng.integers(2, 6)):
            lines.append(" ".join(rng.choice(WORDS, rng.integers(4, 12))) + ".")
        lines.append("")
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train = write_corpus(root / "train.txt", 120, seed=0)
    evaluation = write_corpus(root / "eval.txt", 40, seed=1)
    vocab = train_wordpiece([train], 120, True, str(root / "vocab.txt"))
    return train, evaluation, vocab


def tiny_config(corpus, **train):
    train_files, eval_files, vocab = corpus
    config = config_lib.base_config()
    config.model.update(
        vocab_size=128,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        dropout_rate=0.1,
        attention_dropout_rate=0.0,
    )
    config.data.update(
        seq_length=32,
        max_predictions_per_seq=5,
        use_next_sentence_label=False,
        train_files=train_files,
        eval_files=eval_files,
        vocab_file=vocab,
    )
    config.train.update(
        global_batch_size=4,
        num_steps=6,
        log_every=1,
        eval_every=0,
        eval_steps=2,
        checkpoint_every=3,
        keep_checkpoints=0,
    )
    config.train.update(**train)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    return config_lib.validate(config)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(mode, config, workdir, tmp_path, num_processes=2, devices=2, name=""):
    """Runs the worker as processes 0..N-1; returns their JSON reports."""
    name = name or mode
    config_path = tmp_path / f"{name}_config.json"
    config_path.write_text(config_lib.to_json(config))
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    outputs = [tmp_path / f"{name}_{i}.json" for i in range(num_processes)]
    count = [str(num_processes), str(devices), port]
    processes = [
        subprocess.Popen(
            [sys.executable, WORKER, mode, *count, str(i), str(config_path), workdir, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, out in enumerate(outputs)
    ]
    logs = [process.communicate(timeout=240)[0] for process in processes]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]
    return [json.loads(out.read_text()) for out in outputs]


def test_two_processes_read_disjoint_shards_that_cover_the_data(corpus, tmp_path):
    # Global batch 2: one row per process, so one eval pass drops nothing.
    config = tiny_config(corpus, global_batch_size=2)
    reports = run_processes("inputs", config, str(tmp_path / "workdir"), tmp_path, devices=1)
    vocab = load_vocab(corpus[2], lowercase=True)
    docs = encode_documents(vocab, read_documents([corpus[1]]))
    expected = Counter(
        tuple(chunk.tolist()) for chunk in chunk_documents(docs, 32, vocab.cls_id, vocab.sep_id)
    )
    shards = [Counter(tuple(chunk) for chunk in report["chunks"]) for report in reports]
    assert shards[0] and shards[1]
    assert not shards[0].keys() & shards[1].keys()
    assert shards[0] + shards[1] == expected
    for report in reports:
        assert report["num_devices"] == 2
        assert report["global_shape"] == [2, 32]
        assert report["global_sum"] == sum(report["local_sums"])  # Both hosts' rows, once each.
        assert report["local_sums"][0] != report["local_sums"][1]


def test_two_process_training_resumes_batch_exactly(corpus, tmp_path):
    config = tiny_config(corpus)
    workdir = str(tmp_path / "full")
    reports = run_processes("train", config, workdir, tmp_path, name="full")
    assert reports[0]["train"]["step"] == 6
    assert reports[0]["train"]["loss"] == reports[1]["train"]["loss"]  # One global step.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    again = run_processes("train", config, resumed, tmp_path, name="resumed")

    def by_step(directory):
        with open(os.path.join(directory, "metrics.jsonl")) as file:
            return {record["step"]: record for record in map(json.loads, file)}

    first, second = by_step(workdir), by_step(resumed)
    for step in (4, 5, 6):
        for key in ("loss", "masked_lm_accuracy", "grad_norm"):
            assert second[step][key] == first[step][key], (step, key)
    assert again[0]["eval"] == reports[0]["eval"]


# ----------------------------------------------------------- the same numbers on any layout

EQUIVALENT_LAYOUTS = {
    # name: (processes, devices per process, mesh.data, mesh.fsdp)
    "1 device": (1, 1, -1, 1),
    "8 devices, data=8": (1, 8, 8, 1),
    "8 devices, data=2 x fsdp=4": (1, 8, 2, 4),
    "2 processes x 2 devices": (2, 2, -1, 1),
}
# Data parallelism over 8 devices against one device is the private-training test's pair below.
LAYOUTS_COMPARED = ("1 device", "8 devices, data=2 x fsdp=4", "2 processes x 2 devices")


def test_every_layout_logs_the_same_losses(corpus, tmp_path):
    losses = {}
    for name in LAYOUTS_COMPARED:
        processes, devices, data, fsdp = EQUIVALENT_LAYOUTS[name]
        config = tiny_config(corpus, global_batch_size=8, checkpoint_every=6)
        with config.unlocked():
            config.mesh.update(data=data, fsdp=fsdp, fsdp_min_size=256)
            config.data.input_shards = 2  # The same global batches for 1 or 2 processes.
        workdir = str(tmp_path / name.replace(" ", "_"))
        slug = name.replace(" ", "_").replace(",", "").replace("=", "")
        run_processes("train", config, workdir, tmp_path, processes, devices, name=slug)
        with open(os.path.join(workdir, "metrics.jsonl")) as file:
            losses[name] = [json.loads(line)["loss"] for line in file]
    reference = np.asarray(losses["1 device"])
    assert len(reference) == 6
    for name, values in losses.items():
        np.testing.assert_allclose(values, reference, rtol=1e-5, err_msg=name)


def test_a_dp_run_logs_the_same_losses_on_one_device_and_on_eight(corpus, tmp_path):
    # Noise is drawn once per global step from the replicated step key, and each row's dropout
    # key is its index in the global batch: the layout changes neither.
    logged = {}
    for name, (processes, devices, data, fsdp) in (
        ("dp_1_device", EQUIVALENT_LAYOUTS["1 device"]),
        ("dp_data8", EQUIVALENT_LAYOUTS["8 devices, data=8"]),
    ):
        config = tiny_config(corpus, global_batch_size=8, checkpoint_every=6)
        with config.unlocked():
            config.mesh.update(data=data, fsdp=fsdp)
            config.data.input_shards = 2
            config.privacy.update(enabled=True, l2_clip=0.5, noise_multiplier=1.0, num_examples=400)
        workdir = str(tmp_path / name)
        run_processes("train", config, workdir, tmp_path, processes, devices, name=name)
        with open(os.path.join(workdir, "metrics.jsonl")) as file:
            logged[name] = [json.loads(line) for line in file]
    one, eight = logged["dp_1_device"], logged["dp_data8"]
    assert len(one) == 6
    for key in ("loss", "grad_norm", "privacy_epsilon"):
        np.testing.assert_allclose(
            [r[key] for r in eight], [r[key] for r in one], rtol=1e-5, err_msg=key
        )
