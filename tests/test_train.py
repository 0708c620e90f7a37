"""End-to-end tests of the driver: a short real run on the built-in corpus, resume, errors."""

import glob
import io
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mlm import config as config_lib
from mlm import fill_mask
from mlm.errors import DataError, WorkdirError
from mlm.kernels import cpu_host_memory
from mlm.train import train_and_evaluate
from mlm.workdir import check_consistent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40


def tiny_config() -> ml_collections.ConfigDict:
    config = config_lib.base_config()
    config.model.update(
        vocab_size=600,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    config.data.update(seq_length=32, max_predictions_per_seq=5, use_next_sentence_label=False)
    config.train.update(
        global_batch_size=8,
        num_steps=NUM_STEPS,
        log_every=5,
        eval_every=20,
        eval_steps=3,
        checkpoint_every=10,
        keep_checkpoints=5,
    )
    config.optimizer.update(learning_rate=5e-3, warmup_steps=5)
    return config


def read_jsonl(path):
    with open(path) as file:
        return [json.loads(line) for line in file]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "workdir")
    results = train_and_evaluate(tiny_config(), workdir)
    return workdir, results


def test_short_run_learns_and_writes_its_files(trained):
    workdir, results = trained
    for name in ("config.json", "vocab.txt", "metrics.jsonl", "eval_metrics.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30", "40"]
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(5, NUM_STEPS + 1, 5))
    for key in ("loss", "lm_example_loss", "masked_lm_accuracy", "learning_rate", "tokens_per_s"):
        assert key in records[-1], key
    assert (records[-1]["loss"] + records[-2]["loss"]) / 2 < records[0]["loss"] - 0.4
    evals = read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["validation_loss"] < evals[0]["validation_loss"]
    assert evals[-1]["eval_examples"] == 3 * 8
    assert results["eval"] == evals[-1]
    with open(os.path.join(workdir, "config.json")) as file:
        saved = json.load(file)
    assert saved["model"]["hidden_size"] == 32
    # A library call leaves this process's malloc as it was (only the command line tunes it).
    assert cpu_host_memory.in_effect() is False


def test_resume_continues_exactly_from_the_last_checkpoint(trained, tmp_path):
    workdir, _ = trained
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    for step in ("30", "40"):
        shutil.rmtree(os.path.join(resumed, "checkpoints", step))
    train_and_evaluate(tiny_config(), resumed)
    first = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    again = read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    # Records after the restored step 20 are dropped and logged again, identically.
    assert [r["step"] for r in again] == [r["step"] for r in first]
    for old, new in zip(first, again, strict=True):
        for key in ("loss", "masked_lm_accuracy", "learning_rate"):
            assert new[key] == old[key], (new["step"], key)


def test_eval_mode_reproduces_the_final_eval(trained, tmp_path):
    workdir, results = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    again = train_and_evaluate(tiny_config(), copy, mode="eval")
    assert again["eval"] == results["eval"]


def test_changed_model_config_is_refused_and_checkpoints_kept(trained):
    workdir, _ = trained
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    config = tiny_config()
    config.model.hidden_size = 64
    with pytest.raises(WorkdirError, match=r"model\.hidden_size=32.*has 64"):
        train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_fill_mask_predicts_from_the_latest_checkpoint(trained):
    workdir, _ = trained
    predictor = fill_mask.load_predictor(workdir)
    assert predictor.step == NUM_STEPS
    predictions = fill_mask.fill_mask(predictor, "Return the [MASK] of the [MASK].", top_k=4)
    assert len(predictions) == 2
    for candidates in predictions:
        probabilities = [p for _, p in candidates]
        assert len(candidates) == 4
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.0 + 1e-6
        assert all(not token.startswith("[") for token, _ in candidates)
    with pytest.raises(DataError, match="no \\[MASK\\]"):
        fill_mask.fill_mask(predictor, "Nothing to fill.")


def test_unwritable_workdir_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WorkdirError, match="not writable"):
        train_and_evaluate(tiny_config(), str(blocker / "workdir"))
    with pytest.raises(WorkdirError, match="'gs://bucket/run' is a URL; .* mounted path"):
        train_and_evaluate(tiny_config(), "gs://bucket/run")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_unknown_override_exits_2_with_one_line(tmp_path):
    result = run_cli(
        "mlm.train",
        "--config",
        "configs/quickstart.py",
        f"--workdir={tmp_path}",
        "--config.model.hiden_size=3",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown config field 'model.hiden_size'" in lines[0]
    assert "did you mean 'model.hidden_size'" in lines[0]


def test_fill_mask_cli_prints_predictions(trained):
    workdir, _ = trained
    result = run_cli(
        "mlm.fill_mask", "--workdir", workdir, "--text", "The [MASK] is empty.", "--top_k", "3"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"checkpoint step {NUM_STEPS}"
    assert lines[3] == "[MASK] 1:"
    assert len(lines) == 7
    missing = run_cli("mlm.fill_mask", "--workdir", "/nonexistent", "--text", "a [MASK]")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ")


def test_next_sentence_run_in_bfloat16_logs_nsp_metrics(tmp_path):
    config = tiny_config()
    config.data.use_next_sentence_label = True
    config.model.dtype = "bfloat16"
    config.optimizer.name = "lamb"
    config.train.update(num_steps=10, eval_every=0, checkpoint_every=10)
    results = train_and_evaluate(config, str(tmp_path / "nsp"))
    for metrics in (results["train"], results["eval"]):
        assert 0.0 <= metrics["next_sentence_accuracy"] <= 1.0
        assert metrics["next_sentence_loss"] > 0.0
    assert results["eval"]["validation_loss"] == pytest.approx(
        results["eval"]["lm_example_loss"] + results["eval"]["next_sentence_loss"]
    )
    assert results["train"]["step"] == 10


# ------------------------------------------------------------------ every data source resumes

SOURCE_WORDS = "river stone light garden window paper music winter market city north bridge"


def write_text_corpus(path, num_documents, seed):
    rng = np.random.default_rng(seed)
    words = SOURCE_WORDS.split()
    documents = []
    for _ in range(num_documents):
        sentences = [
            " ".join(rng.choice(words, rng.integers(3, 10))) + "."
            for _ in range(rng.integers(2, 6))
        ]
        documents.append("\n".join(sentences))
    path.write_text("\n\n".join(documents) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def source_configs(tmp_path_factory):
    """{source: data overrides} for text files, prepared shards, TFRecords and TFDS."""
    import tfds_testing

    from mlm.data import create_pretraining_data, prepare
    from mlm.data.tokenizer import load_vocab, train_wordpiece

    root = tmp_path_factory.mktemp("sources")
    train = write_text_corpus(root / "train.txt", 150, seed=0)
    evaluation = write_text_corpus(root / "eval.txt", 30, seed=1)
    vocab_path = train_wordpiece([train], 100, True, str(root / "vocab.txt"))
    vocab = load_vocab(vocab_path, True)
    prepare.prepare(
        [train],
        str(root / "prepared"),
        eval_files=[evaluation],
        vocab_file=vocab_path,
        lowercase=True,
        num_workers=1,
        documents_per_shard=50,
        progress=False,
    )
    records = {}
    for split, text in (("train", train), ("eval", evaluation)):
        records[split] = str(root / f"{split}.tfrecord")
        create_pretraining_data.create_pretraining_data(
            [text],
            [records[split]],
            vocab,
            max_seq_length=32,
            max_predictions_per_seq=5,
            dupe_factor=2,
        )
    tfds_dir = tfds_testing.build_tiny_text(str(root / "tfds"), "tfrecord")
    return {
        "train_files": dict(train_files=train, eval_files=evaluation, vocab_file=vocab_path),
        "prepared_dir": dict(prepared_dir=str(root / "prepared")),
        "tfrecord_files": dict(
            tfrecord_files=records["train"],
            eval_tfrecord_files=records["eval"],
            vocab_file=vocab_path,
            use_next_sentence_label=True,
        ),
        "tfds_name": dict(
            tfds_name=tfds_testing.NAME,
            tfds_data_dir=tfds_dir,
            tfds_eval_split="test",
            vocab_file=vocab_path,
        ),
    }


@pytest.mark.parametrize(
    "source,workers",
    [("train_files", 0), ("train_files", 2), ("prepared_dir", 0), ("tfrecord_files", 0)]
    + [("tfds_name", 0)],
)
def test_every_data_source_trains_and_resumes_batch_exactly(
    source_configs, source, workers, tmp_path
):
    config = tiny_config()
    config.model.vocab_size = 128
    config.data.update(**source_configs[source], num_workers=workers)
    config.train.update(num_steps=8, log_every=1, eval_every=8, checkpoint_every=4)
    workdir = str(tmp_path / "full")
    results = train_and_evaluate(config, workdir)
    assert results["train"]["step"] == 8 and results["eval"]["eval_examples"] in (8, 16, 24)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    again = train_and_evaluate(config, resumed)
    first = {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}
    second = {r["step"]: r for r in read_jsonl(os.path.join(resumed, "metrics.jsonl"))}
    for step in range(5, 9):
        for key in ("loss", "masked_lm_accuracy", "grad_norm"):
            assert second[step][key] == first[step][key], (source, step, key)
    assert again["eval"] == results["eval"]


def test_damaged_data_fails_before_training_and_keeps_the_checkpoints(source_configs, tmp_path):
    records = tmp_path / "train.tfrecord"
    shutil.copyfile(source_configs["tfrecord_files"]["tfrecord_files"], records)
    config = tiny_config()
    config.model.vocab_size = 128
    config.data.update(**{**source_configs["tfrecord_files"], "tfrecord_files": str(records)})
    config.train.update(num_steps=6, eval_every=0, checkpoint_every=6)
    workdir = str(tmp_path / "workdir")
    train_and_evaluate(config, workdir)
    saved = {
        path: os.path.getmtime(path)
        for path in glob.glob(os.path.join(workdir, "checkpoints", "**"), recursive=True)
    }
    data = bytearray(records.read_bytes())
    data[30] ^= 0xFF  # Inside the first record.
    records.write_bytes(bytes(data))
    config.train.num_steps = 8
    with pytest.raises(DataError, match=r"train.tfrecord: corrupt record at byte 0"):
        train_and_evaluate(config, workdir)
    after = {
        path: os.path.getmtime(path)
        for path in glob.glob(os.path.join(workdir, "checkpoints", "**"), recursive=True)
    }
    assert after == saved


def test_cli_records_of_another_seq_length_exit_2_naming_both(source_configs, tmp_path):
    data = source_configs["tfrecord_files"]
    result = run_cli(
        "mlm.train",
        "--config",
        "configs/quickstart.py",
        f"--workdir={tmp_path}",
        f"--config.data.tfrecord_files={data['tfrecord_files']}",
        f"--config.data.vocab_file={data['vocab_file']}",
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.tfrecord_files: the records have seq_length 32 but ")
    assert "data.seq_length is 128" in last
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_worker_count_is_fixed_for_a_run_but_prefetch_is_not(source_configs, tmp_path):
    config = tiny_config()
    config.model.vocab_size = 128
    config.data.update(**source_configs["train_files"])
    config.train.update(num_steps=6, eval_every=0, checkpoint_every=6)
    workdir = str(tmp_path / "workdir")
    train_and_evaluate(config, workdir)
    config.data.prefetch_batches = 0
    config.train.num_steps = 7
    assert train_and_evaluate(config, workdir)["train"]["step"] == 7
    config.data.num_workers = 2
    with pytest.raises(WorkdirError, match=r"data\.num_workers=0, this config has 2"):
        train_and_evaluate(config, workdir)


def test_consecutive_skipped_updates_stop_the_run_naming_the_last_checkpoint(tmp_path):
    from mlm.errors import DivergenceError
    from mlm.metrics import ConsoleProgress, MetricWriter
    from mlm.train import _TrainLogger

    writer = MetricWriter(str(tmp_path))
    progress = ConsoleProgress(0, 20, stream=io.StringIO())
    logger = _TrainLogger(writer, 1, 20, progress, 3, lambda: 4)
    base = {"loss": 1.0, "grad_norm": 1.0, "learning_rate": 0.1, "lm_weight_sum": 1.0}
    logger.add(5, dict(base, skipped_steps=0, consecutive_skips=0), 10)
    for step, count in ((6, 1), (7, 2), (8, 3)):
        logger.add(step, dict(base, loss=np.nan, skipped_steps=1, consecutive_skips=count), 10)
    with pytest.raises(DivergenceError, match=r"3 steps in a row \(up to step 8\).*from step 4"):
        logger.flush()
    writer.close()
    records = read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]


def test_the_best_eval_step_is_kept_aside_with_the_config_in_every_step(trained):
    workdir, _ = trained
    evals = read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))
    # Ties go to the later step.
    best = max(evals, key=lambda record: (record["masked_lm_accuracy"], record["step"]))
    kept = os.listdir(os.path.join(workdir, "checkpoints_best"))
    assert kept == [str(best["step"])], evals
    with open(os.path.join(workdir, "checkpoints", "40", "config", "metadata")) as file:
        assert json.load(file)["model"]["hidden_size"] == 32


def test_init_checkpoint_starts_a_new_run_from_trained_params(trained, tmp_path):
    workdir, _ = trained
    config = tiny_config()
    config.train.update(num_steps=5, log_every=1, eval_every=0, checkpoint_every=5)
    config.optimizer.warmup_steps = 1
    fresh = str(tmp_path / "fresh")
    train_and_evaluate(config, fresh)
    config.train.init_checkpoint = workdir
    started = str(tmp_path / "started")
    train_and_evaluate(config, started)
    with open(os.path.join(started, "init_report.txt")) as file:
        report = file.read()
    assert "encoder/word_embeddings/embedding" in report and "loaded" in report
    first = read_jsonl(os.path.join(fresh, "metrics.jsonl"))[0]
    from_trained = read_jsonl(os.path.join(started, "metrics.jsonl"))[0]
    assert from_trained["step"] == 1  # A new run: its own step count.
    assert from_trained["loss"] < first["loss"] - 0.3
    config.train.init_checkpoint = str(tmp_path / "missing")
    with pytest.raises(config_lib.ConfigError, match="missing"):
        train_and_evaluate(config, str(tmp_path / "third"))


def restore_state(workdir, config, step):
    """The TaskState of a workdir's checkpoint `step`, built as `config` builds it."""
    import jax

    from mlm import checkpoint, task
    from mlm.optim import create_optimizer

    config = config_lib.validate(config)
    model = task.build_model(config)
    tx = create_optimizer(config.optimizer, config.train.num_steps)
    init_fn = task.state_initializer(config, model, tx)
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(workdir), keep=0)
    state = checkpoint.restore(manager, step, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    manager.close()
    return state


def test_a_run_shorter_than_its_warmup_warns_and_trains_in_the_warmup(tmp_path, capfd):
    config = tiny_config()
    config.train.update(num_steps=3, log_every=3, eval_every=0, checkpoint_every=3)
    config.optimizer.update(warmup_steps=30)
    workdir = str(tmp_path / "short")
    results = train_and_evaluate(config, workdir)
    err = capfd.readouterr().err
    assert (
        "warning: optimizer.warmup_steps (30) is more than train.num_steps (3): the run ends in "
        "its warmup, at learning rate 0.0005 (10% of optimizer.learning_rate); lower "
        "optimizer.warmup_steps for a full schedule"
    ) in err.splitlines()
    # The rate of the last update (step 3 applies schedule(2)): on the ramp towards 5e-3.
    np.testing.assert_allclose(results["train"]["learning_rate"], 5e-3 * 2 / 30, rtol=1e-6)


def test_ema_run_evaluates_and_fills_masks_with_the_ema_params(trained, tmp_path, capfd):
    import jax

    config = tiny_config()
    config.train.update(num_steps=6, log_every=3, eval_every=0, checkpoint_every=6)
    config.optimizer.update(warmup_steps=1, ema_decay=0.5)
    workdir = str(tmp_path / "ema")
    train_and_evaluate(config, workdir)
    assert "eval step 6 (EMA params)" in capfd.readouterr().err
    predictor = fill_mask.load_predictor(workdir)
    assert predictor.ema and predictor.step == 6
    state = restore_state(workdir, config, 6)
    leaves = jax.tree.leaves
    for served, ema in zip(leaves(predictor.params), leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(served), np.asarray(ema))
    differs = [
        not np.array_equal(e, r)
        for e, r in zip(leaves(state.ema_params), leaves(state.params), strict=True)
    ]
    assert any(differs)
    # mlm.convert --to hf exports the EMA params too.
    from safetensors.numpy import load_file

    from mlm import convert

    exported = convert.to_hf(workdir, str(tmp_path / "hf"))
    assert exported.ema and "(the EMA params)" in exported.summary()
    tensors = load_file(os.path.join(exported.output, "model.safetensors"))
    np.testing.assert_array_equal(
        tensors["bert.embeddings.word_embeddings.weight"],
        np.asarray(state.ema_params["encoder"]["word_embeddings"]["embedding"]),
    )
    # --mode eval evaluates the same (EMA) params as the end of training did.
    again = train_and_evaluate(config, workdir, mode="eval")["eval"]
    assert again == read_jsonl(os.path.join(workdir, "eval_metrics.jsonl"))[-1]
    # From a run without EMA (train.init_checkpoint): the average starts at the loaded params.
    source = restore_state(trained[0], tiny_config(), NUM_STEPS)
    config.train.update(num_steps=1, init_checkpoint=trained[0], checkpoint_every=1)
    config.optimizer.update(warmup_steps=0)
    started = str(tmp_path / "ema_from_plain")
    train_and_evaluate(config, started)
    state = restore_state(started, config, 1)
    for ema, loaded, new in zip(
        leaves(state.ema_params), leaves(source.params), leaves(state.params), strict=True
    ):
        np.testing.assert_allclose(ema, 0.5 * loaded + 0.5 * new, rtol=1e-6, atol=1e-7)


def test_a_run_may_resume_with_another_kernel_set_but_not_another_model(tmp_path):
    config = config_lib.validate(config_lib.sized_config("tiny"))
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "config.json").write_text(config_lib.to_json(config))
    other = config_lib.sized_config("tiny")
    other.model.kernels = "standard"
    assert check_consistent(config_lib.validate(other), str(tmp_path))["model"]["kernels"] == "auto"
    bigger = config_lib.sized_config("tiny")
    bigger.model.hidden_size = 256
    with pytest.raises(WorkdirError, match="model.hidden_size=128, this config has 256"):
        check_consistent(config_lib.validate(bigger), str(tmp_path))
