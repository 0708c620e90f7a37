"""The bad-input catalogue: each user mistake the framework recognises, made the way a user makes
it, stops with one typed error naming the field or file and the fix, and leaves the checkpoints of
an existing run exactly as they were (docs/reference.md "Bad input", README "A run is never lost").

Two short runs (text files, TFRecords) are trained once per module; every test works on its own
copy, with data paths relative to the copy, so damaging the data keeps the config unchanged, as
when a file changes under a run.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from mlm import config as config_lib
from mlm import config_file as config_file_lib
from mlm.errors import ConfigError, DataError, DivergenceError, WorkdirError
from mlm.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 128
SEQ_LENGTH = 32
MAX_PREDICTIONS = 5
NUM_RECORDS = 16
WORKDIR = "workdir"  # Relative to the copy of a run the test works in.
CONFIG_FILE = "tiny_config.py"
WORDS = ("river", "stone", "light", "garden", "window", "paper", "music", "winter", "market")


def tiny_config(**data) -> ml_collections.ConfigDict:
    """A 1-layer, 32-wide BERT that trains 6 steps with a checkpoint every 3."""
    config = config_lib.base_config()
    config.model.update(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    config.data.update(
        seq_length=SEQ_LENGTH,
        max_predictions_per_seq=MAX_PREDICTIONS,
        use_next_sentence_label=False,
        **data,
    )
    config.train.update(
        global_batch_size=8,
        num_steps=6,
        log_every=3,
        eval_every=0,
        checkpoint_every=3,
        keep_checkpoints=0,
    )
    config.optimizer.update(learning_rate=5e-3, warmup_steps=2)
    return config


TEXT_DATA = dict(train_files="data/train.txt", vocab_file="data/vocab.txt")
RECORD_DATA = dict(tfrecord_files="data/train.tfrecord")


def text_config() -> ml_collections.ConfigDict:
    """The config of the text run, asking for 3 more steps than it trained."""
    config = tiny_config(**TEXT_DATA)
    config.train.num_steps = 9
    return config


def record_config() -> ml_collections.ConfigDict:
    config = tiny_config(**RECORD_DATA)
    config.train.num_steps = 9
    return config


def write_text_corpus(path, num_documents, seed):
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(num_documents):
        sentences = [
            " ".join(rng.choice(WORDS, rng.integers(3, 10))) + "."
            for _ in range(rng.integers(2, 6))
        ]
        documents.append("\n".join(sentences))
    with open(path, "w") as file:
        file.write("\n\n".join(documents) + "\n")


def write_tfrecords(path, *, seq_length=SEQ_LENGTH, top_id=VOCAB_SIZE - 1):
    """16 BERT pretraining records (two batches); record i ends with token id 5 + i."""
    from mlm.data.pretraining_records import write_records

    rng = np.random.default_rng(0)
    rows = []
    for index in range(NUM_RECORDS):
        ids = rng.integers(5, top_id + 1, seq_length)
        ids[0], ids[-1] = top_id, 5 + index
        rows.append(
            dict(
                input_word_ids=ids,
                input_mask=np.ones(seq_length, np.int64),
                input_type_ids=np.zeros(seq_length, np.int64),
                masked_lm_positions=np.arange(1, MAX_PREDICTIONS + 1),
                masked_lm_ids=rng.integers(5, top_id + 1, MAX_PREDICTIONS),
                masked_lm_weights=np.ones(MAX_PREDICTIONS, np.float32),
            )
        )
    write_records(path, rows)


def first_batch_records():
    """The records the first train batch holds, which the run reads before anything else."""
    from mlm.data.inputs import build_inputs

    batch = next(iter(build_inputs(record_config(), WORKDIR, need_eval=False).train))
    return {int(tag) - 5 for tag in batch["input_word_ids"][:, -1]}


def damage_record(path, index):
    """Flips a byte inside the data of record `index`; returns the record's byte offset."""
    from mlm.data.tfrecord_source import index_records

    offset = int(index_records(path)[index])
    with open(path, "r+b") as file:
        file.seek(offset + 12 + 5)  # After the 12-byte frame header.
        byte = file.read(1)[0]
        file.seek(offset + 12 + 5)
        file.write(bytes([byte ^ 0xFF]))
    return offset


def write_config_file(path, config):
    """A config file for the CLI whose get_config() returns `config`."""
    text = json.dumps(config.to_dict())
    with open(path, "w") as file:
        file.write(
            "import json\n\nfrom mlm import config as config_lib\n\n\ndef get_config():\n"
            "    config = config_lib.base_config()\n"
            f"    for section, fields in json.loads({text!r}).items():\n"
            "        config[section].update(fields)\n"
            "    return config\n"
        )


@contextlib.contextmanager
def working_directory(path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A finished 6-step run on text files: data/, workdir/ with checkpoints 3 and 6."""
    from mlm.data.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("text_run")
    with working_directory(root):
        os.makedirs("data")
        write_text_corpus("data/train.txt", 60, seed=0)
        train_wordpiece(["data/train.txt"], 100, True, "data/vocab.txt")
        train_and_evaluate(tiny_config(**TEXT_DATA), WORKDIR)
        write_config_file(CONFIG_FILE, text_config())
    assert sorted(os.listdir(root / WORKDIR / "checkpoints")) == ["3", "6"]
    return root


@pytest.fixture(scope="module")
def record_run(tmp_path_factory):
    """A finished 6-step run on 16 Model Garden TFRecords (seq 32, ids below 128)."""
    root = tmp_path_factory.mktemp("record_run")
    with working_directory(root):
        os.makedirs("data")
        write_tfrecords("data/train.tfrecord")
        train_and_evaluate(tiny_config(**RECORD_DATA), WORKDIR)
    assert sorted(os.listdir(root / WORKDIR / "checkpoints")) == ["3", "6"]
    return root


def copy_of(run, tmp_path, monkeypatch):
    """Copies a run into tmp_path and makes the copy the working directory."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    monkeypatch.chdir(copy)
    return copy


@pytest.fixture
def text_copy(text_run, tmp_path, monkeypatch):
    return copy_of(text_run, tmp_path, monkeypatch)


@pytest.fixture
def record_copy(record_run, tmp_path, monkeypatch):
    return copy_of(record_run, tmp_path, monkeypatch)


def snapshot(workdir=WORKDIR):
    """path -> (size, mtime_ns, sha1) of every file under the checkpoint directories; dirs too."""
    found = {}
    for name in ("checkpoints", "checkpoints_best"):
        for directory, _, filenames in os.walk(os.path.join(workdir, name)):
            found[directory] = "dir"
            for filename in filenames:
                path = os.path.join(directory, filename)
                with open(path, "rb") as file:
                    digest = hashlib.sha1(file.read()).hexdigest()
                stat = os.stat(path)
                found[path] = (stat.st_size, stat.st_mtime_ns, digest)
    assert any(path.endswith(os.sep + "6") for path in found), "no checkpoint to protect"
    return found


@contextlib.contextmanager
def one_line_error(error, pattern):
    """Expects `error` whose message (what the CLI prints after `error: `) matches `pattern`."""
    with pytest.raises(error) as caught:
        yield caught
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(pattern, message), message


def fails_leaving_checkpoints(error, pattern, config, workdir=WORKDIR):
    """Runs on an existing workdir, expects `error` matching `pattern`, checks the checkpoints."""
    before = snapshot(workdir)
    with one_line_error(error, pattern) as caught:
        train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before
    return caught.value


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "mlm.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def tmpfs(path, size_kb):
    """Mounts a tmpfs of `size_kb` KiB at `path`; skips the test where mounting is not allowed."""
    os.makedirs(path)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a tmpfs here ({error}); run as root to cover this row")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def disk_usage_kb(path):
    return int(subprocess.check_output(["du", "-sk", str(path)]).split()[0])


def fill_up(directory, leave_kb):
    """Writes a filler file until about `leave_kb` KiB are left on the file system."""
    free = lambda: shutil.disk_usage(directory).free // 1024  # noqa: E731
    with open(os.path.join(directory, "filler"), "wb") as file:
        try:
            while free() > leave_kb:
                file.write(b"\0" * 4096)
                file.flush()
        except OSError:
            pass


# ---------------------------------------------------------------------------------- config


def test_unknown_config_field_suggests_the_closest(text_copy):
    config = text_config()
    config.model.hiden_size = 64
    fails_leaving_checkpoints(
        ConfigError,
        r"^unknown config field 'model\.hiden_size' \(did you mean 'model\.hidden_size'\?\); "
        r"the fields are listed in docs/reference\.md 'Config reference'$",
        config,
    )


def test_cli_unknown_override_exits_2_with_one_error_line(text_copy):
    before = snapshot()
    result = run_cli(
        "--config", CONFIG_FILE, "--workdir", WORKDIR, "--config.train.num_step=9", cwd=text_copy
    )
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == [
        "error: unknown config field 'train.num_step' in override '--config.train.num_step=9' "
        "(did you mean 'train.num_steps'?); the fields are listed in docs/reference.md "
        "'Config reference'"
    ]
    assert snapshot() == before


def test_wrong_type_names_the_field_and_both_types(text_copy, tmp_path):
    # A config built from a dict (JSON, YAML) keeps whatever types the dict had.
    fields = text_config().to_dict()
    fields["train"]["num_steps"] = "9"
    fails_leaving_checkpoints(
        ConfigError,
        r"^config field 'train\.num_steps' must be int, got '9' \(str\); fix the value in the "
        r"config file or the override$",
        ml_collections.ConfigDict(fields),
    )
    # A config file assigning one: ml_collections refuses it, reported as one line.
    path = tmp_path / "bad_config.py"
    path.write_text(
        "from mlm import config as config_lib\n\n\ndef get_config():\n"
        "    config = config_lib.base_config()\n    config.train.num_steps = '9'\n"
        "    return config\n"
    )
    with one_line_error(ConfigError, r"^config file '.*bad_config\.py': .*'num_steps'.*str"):
        config_file_lib.load_config_file(str(path))


ARG_CONFIG = """from mlm import config as config_lib


def get_config(num_steps):
    config = config_lib.base_config()
    config.train.num_steps = int(num_steps)
    return config
"""


@pytest.mark.parametrize(
    "files,args,line",
    [
        (
            {"bad.py": "def get_config(:\n    pass\n"},
            ["--config", "bad.py"],
            "error: config file 'bad.py': line 1: SyntaxError: invalid syntax; fix the file",
        ),
        (
            {"bad.py": "def get_config():\n    return 1 / 0\n"},
            ["--config", "bad.py"],
            "error: config file 'bad.py': line 2: ZeroDivisionError: division by zero; fix the "
            "file",
        ),
        (
            {"bad.py": "import mlm_no_such_module\n"},
            ["--config", "bad.py"],
            "error: config file 'bad.py': line 1: ModuleNotFoundError: No module named "
            "'mlm_no_such_module'; install the module or fix the import",
        ),
        (
            {},
            ["--config", "."],
            "error: config file '.' is a directory; pass a file in it, e.g. configs/quickstart.py",
        ),
        (
            {},
            ["--config", CONFIG_FILE + ":9"],
            f"error: config file '{CONFIG_FILE}': get_config() takes no argument but "
            f"'{CONFIG_FILE}:9' passes it '9'; drop ':9' or give get_config a parameter",
        ),
        (
            {},
            ["--config", CONFIG_FILE, "--config.optimizer.learning_rate=inf"],
            "error: config field 'optimizer.learning_rate' must be a finite number, got inf; fix "
            "the value in the config file or the override",
        ),
        (
            {},
            ["--config", CONFIG_FILE, "--config.train.num_steps=3000000000"],
            "error: config field 'train.num_steps' must be at most 2147483647 (steps, sizes and "
            "ids are int32), got 3000000000; fix the value in the config file or the override",
        ),
        (
            # Refused by validation after absl has read the file and overrides.
            {},
            ["--config", CONFIG_FILE, "--config.train.best_metric=next_sentence_accuracy"],
            "error: train.best_metric 'next_sentence_accuracy' needs "
            "data.use_next_sentence_label=True (without it eval has no next-sentence metrics); "
            "pick masked_lm_accuracy, lm_example_loss or validation_loss, or set "
            "data.use_next_sentence_label=True",
        ),
        (
            # FILE:ARG reaches get_config through absl too: the run got num_steps=0 from it.
            {"steps.py": ARG_CONFIG},
            ["--config", "steps.py:0"],
            "error: train.num_steps must be positive, got 0",
        ),
    ],
)
def test_cli_bad_config_exits_2_with_one_line_before_any_file_is_written(
    tmp_path, files, args, line
):
    write_config_file(tmp_path / CONFIG_FILE, tiny_config())
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    listing = lambda: sorted(set(os.listdir(tmp_path)) - {"__pycache__"})  # noqa: E731
    before = listing()
    result = run_cli(*args, "--workdir", WORKDIR, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_lines(result) == [line], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert listing() == before  # No workdir, no vocab, no corpus.


def test_cli_wrong_type_override_exits_2_with_one_error_line(text_copy):
    result = run_cli(
        "--config", CONFIG_FILE, "--workdir", WORKDIR, "--config.train.num_steps=abc", cwd=text_copy
    )
    assert result.returncode == 2, result.stderr
    assert len(error_lines(result)) == 1
    assert "train.num_steps" in error_lines(result)[0]


def test_negative_warmup_is_refused(text_copy):
    config = text_config()
    config.optimizer.warmup_steps = -1
    fails_leaving_checkpoints(
        ConfigError, r"^optimizer\.warmup_steps must be >= 0, got -1$", config
    )


def test_two_data_sources_are_refused(text_copy):
    config = text_config()
    config.data.prepared_dir = "data/prepared"
    fails_leaving_checkpoints(
        ConfigError,
        r"^data\.train_files and data\.prepared_dir are both set; set one data source "
        r"\(train_files, prepared_dir, tfds_name, [^)]*tfrecord_files, synthetic\), or none for "
        r"the built-in",
        config,
    )


# ------------------------------------------------------------------------------------ data


def test_missing_data_glob_names_the_field_and_the_glob(text_copy):
    os.remove("data/train.txt")
    fails_leaving_checkpoints(
        DataError,
        r"^data\.train_files: no file matches 'data/train\.txt'; check the glob or leave it "
        r"empty for the built-in corpus$",
        text_config(),
    )


def test_empty_data_file_names_the_file(text_copy):
    open("data/train.txt", "w").close()
    fails_leaving_checkpoints(
        DataError,
        r"^data/train\.txt: holds no sentences; write one sentence per line with a blank line "
        r"between documents$",
        text_config(),
    )


def test_text_too_small_for_the_input_shards_names_the_shard(text_copy):
    with open("data/train.txt", "w") as file:
        file.write("one short document.\n")
    config = text_config()
    config.data.input_shards = 8
    with one_line_error(
        DataError,
        r"^data\.train_files: input shard 1 of 8 holds no documents; add more text or use "
        r"fewer processes \(or data\.input_shards\)$",
    ):
        train_and_evaluate(config, "fresh_workdir")


def test_non_utf8_text_names_the_file_and_line(text_copy):
    with open("data/train.txt", "ab") as file:
        file.write("\ncafé in latin-1.\n".encode("latin-1"))
    with open("data/train.txt", "rb") as file:
        lines = file.read().count(b"\n")
    fails_leaving_checkpoints(
        DataError,
        rf"^data/train\.txt:{lines}: not valid UTF-8 \(invalid continuation byte at byte 3 of "
        r"the line\); re-encode the file as UTF-8$",
        text_config(),
    )


def big_vocab(path, size):
    with open("data/vocab.txt") as file:
        tokens = file.read().split()
    tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    with open(path, "w") as file:
        file.write("\n".join(tokens) + "\n")


def test_vocab_larger_than_model_vocab_size(text_copy):
    # Only a new run: an existing run keeps its WORKDIR/vocab.txt and model.vocab_size.
    big_vocab("data/big_vocab.txt", 200)
    config = tiny_config(**{**TEXT_DATA, "vocab_file": "data/big_vocab.txt"})
    with one_line_error(
        DataError,
        r"^data\.vocab_file 'data/big_vocab\.txt' has 200 tokens but model\.vocab_size is 128; set "
        r"--config\.model\.vocab_size=200 or use a smaller vocab$",
    ):
        train_and_evaluate(config, "fresh")


def test_the_smaller_vocab_the_message_suggests_then_works(text_copy):
    big_vocab("data/big_vocab.txt", 200)
    config = tiny_config(**{**TEXT_DATA, "vocab_file": "data/big_vocab.txt"})
    with one_line_error(DataError, r"data\.vocab_file"):
        train_and_evaluate(config, "fresh")
    config = tiny_config(**TEXT_DATA)
    config.train.num_steps = 1
    config.optimizer.warmup_steps = 0
    assert train_and_evaluate(config, "fresh")["train"]["step"] == 1


def test_records_of_another_seq_length_name_both(record_copy):
    write_tfrecords("data/train.tfrecord", seq_length=16)
    fails_leaving_checkpoints(
        ConfigError,
        r"^data\.tfrecord_files: the records have seq_length 16 but data\.seq_length is 32; set "
        r"--config\.data\.seq_length=16 \(and --config\.data\.max_predictions_per_seq=5\) or use "
        r"records made for 32$",
        record_config(),
    )


def test_corrupt_record_names_the_file_and_offset(record_copy):
    first = min(first_batch_records())
    offset = damage_record("data/train.tfrecord", first)
    fails_leaving_checkpoints(
        DataError,
        rf"^data/train\.tfrecord: corrupt record at byte {offset} \(data checksum mismatch\); "
        r"copy or regenerate the file$",
        record_config(),
    )


def test_record_damaged_further_in_stops_at_that_step_keeping_saved_steps(record_copy):
    later = min(set(range(NUM_RECORDS)) - first_batch_records())
    offset = damage_record("data/train.tfrecord", later)
    config = record_config()
    config.train.num_steps = 30
    before = snapshot()
    with pytest.raises(DataError) as caught:
        train_and_evaluate(config, WORKDIR)
    assert str(caught.value) == (
        f"data/train.tfrecord: corrupt record at byte {offset} (data checksum mismatch); copy "
        "or regenerate the file"
    )
    after = snapshot()
    # Steps saved before the bad record was reached may be added; saved ones stay as they were.
    assert {path: after.get(path) for path in before} == before


def test_token_id_beyond_the_model_vocab(record_copy):
    write_tfrecords("data/train.tfrecord", top_id=200)
    fails_leaving_checkpoints(
        DataError,
        r"^data/train\.tfrecord record \d+: token id 200 >= model\.vocab_size 128; the records "
        r"were made with a bigger vocab: set --config\.model\.vocab_size / data\.vocab_file",
        record_config(),
    )


def test_corrupt_prepared_shard_names_the_shard_and_record(text_copy):
    from mlm.data import prepare

    prepare.prepare(
        ["data/train.txt"],
        "data/prepared",
        vocab_file="data/vocab.txt",
        lowercase=True,
        num_workers=1,
        documents_per_shard=30,
        progress=False,
    )
    shard = "data/prepared/train-00001.array_record"
    with open(shard, "r+b") as file:
        data = bytearray(file.read())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(byte ^ 0xFF for byte in data[middle : middle + 8])
        file.seek(0)
        file.write(data)
    with one_line_error(
        DataError,
        r"^data/prepared/train-00001\.array_record: record \d+ cannot be read \(.+\); the "
        r"shard is damaged: copy it again or run python -m mlm\.data\.prepare --input GLOB "
        r"--output DIR --overwrite$",
    ):
        train_and_evaluate(tiny_config(prepared_dir="data/prepared"), "fresh")


def test_tfds_dataset_not_prepared(text_copy):
    import tfds_testing  # Registers the builder, as a user's import of their dataset would.

    config = tiny_config(
        tfds_name=tfds_testing.NAME, tfds_data_dir="tfds", vocab_file="data/vocab.txt"
    )
    with one_line_error(
        DataError,
        r"^TFDS dataset mlm_tiny_text is not prepared in tfds; run `tfds build "
        r"mlm_tiny_text --data_dir tfds` \(or download_and_prepare\) on a machine with network "
        r"first$",
    ):
        train_and_evaluate(config, "fresh")


def test_tfds_text_field_that_is_not_a_text_feature(text_copy):
    import tfds_testing

    tfds_testing.build_tiny_text("tfds", "array_record")
    config = tiny_config(
        tfds_name=tfds_testing.NAME,
        tfds_data_dir="tfds",
        vocab_file="data/vocab.txt",
        text_field="body",
    )
    with one_line_error(
        ConfigError,
        r"^data\.text_field='body' is not a text feature of TFDS dataset mlm_tiny_text; set "
        r"it to one of: text, title$",
    ):
        train_and_evaluate(config, "fresh")


# --------------------------------------------------------------------------------- workdir


def test_unwritable_workdir(text_copy, tmp_path):
    if os.geteuid() != 0:
        os.chmod(WORKDIR, 0o555)
        try:
            fails_leaving_checkpoints(
                WorkdirError, r"is not writable \(Permission denied\)", text_config()
            )
        finally:
            os.chmod(WORKDIR, 0o755)
        return
    # root writes anywhere: a read-only mount holds the run instead.
    with tmpfs(tmp_path / "ro", disk_usage_kb(text_copy) + 1024) as mount:
        shutil.copytree(text_copy, mount / "run", dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        os.chdir(mount / "run")
        try:
            fails_leaving_checkpoints(
                WorkdirError,
                r"^workdir 'workdir' is not writable \(Read-only file system\); pass a writable "
                r"--workdir$",
                text_config(),
            )
        finally:
            os.chdir(text_copy)


def test_workdir_url_is_refused():
    with one_line_error(
        WorkdirError,
        r"^workdir 'gs://bucket/run' is a URL; mlm\.train writes its workdir through the "
        r"local filesystem: mount the bucket \(e\.g\. gcsfuse, as launch/tpu_vm\.sh does\) and "
        r"pass the mounted path$",
    ):
        train_and_evaluate(tiny_config(), "gs://bucket/run")


def test_changed_model_field_names_the_field(text_copy):
    config = text_config()
    config.model.hidden_size = 64
    fails_leaving_checkpoints(
        WorkdirError,
        r"^workdir 'workdir' holds a run with model\.hidden_size=32, this config has 64; use a "
        r"new --workdir or the same config$",
        config,
    )


def test_old_config_json_with_a_changed_data_field(text_copy):
    # config.json of an older mlm (no data.input_shards yet); the data field changed since.
    with open(os.path.join(WORKDIR, "config.json")) as file:
        old = json.load(file)
    del old["data"]["input_shards"]
    with open(os.path.join(WORKDIR, "config.json"), "w") as file:
        json.dump(old, file)
    config = text_config()
    config.data.masking_rate = 0.2
    fails_leaving_checkpoints(
        WorkdirError,
        r"^workdir 'workdir' holds a run with data\.masking_rate=0\.15, this config has 0\.2; "
        r"use a new --workdir or the same config$",
        config,
    )


def test_unreadable_config_json_names_the_file(text_copy):
    with open(os.path.join(WORKDIR, "config.json"), "w") as file:
        file.write('{"model": {')
    fails_leaving_checkpoints(WorkdirError, r"config\.json", text_config())


def test_changed_optimizer_structure_is_refused_before_any_restore(text_copy):
    config = text_config()
    config.optimizer.clip_norm = 0.0
    fails_leaving_checkpoints(ConfigError, r"optimizer\.clip_norm", config)
    with open(os.path.join(WORKDIR, "config.json")) as file:
        assert json.load(file)["optimizer"]["clip_norm"] == 1.0  # Still the run's own.


def test_full_workdir_at_the_start(text_copy, tmp_path):
    with tmpfs(tmp_path / "full", disk_usage_kb(text_copy) + 512) as mount:
        shutil.copytree(text_copy, mount / "run", dirs_exist_ok=True)
        fill_up(mount, leave_kb=0)
        os.chdir(mount / "run")
        try:
            fails_leaving_checkpoints(
                WorkdirError,
                r"^workdir 'workdir' is not writable \(No space left on device\); pass a "
                r"writable --workdir$",
                text_config(),
            )
        finally:
            os.chdir(text_copy)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_workdir_filling_up_during_a_save(text_copy, tmp_path):
    with tmpfs(tmp_path / "full", disk_usage_kb(text_copy) + 1024) as mount:
        shutil.copytree(text_copy, mount / "run", dirs_exist_ok=True)
        fill_up(mount, leave_kb=128)  # Room for the logs, not for a checkpoint step (~360 KiB).
        os.chdir(mount / "run")
        try:
            fails_leaving_checkpoints(
                WorkdirError, r"No space left on device.*step 6", text_config()
            )
        finally:
            os.chdir(text_copy)


def test_init_checkpoint_of_another_model_size(text_copy):
    source = os.path.abspath(WORKDIR)
    config = tiny_config(**TEXT_DATA)
    config.model.hidden_size = 64
    config.train.init_checkpoint = source
    before = snapshot(source)
    with one_line_error(
        ConfigError,
        r"^parameter '[\w/]+' has shape \([\d, ]*32[\d, ]*\) in checkpoint '.*' step 6 but "
        r"\([\d, ]*64[\d, ]*\) in this model: checkpoint from a different model size; set the "
        r"model fields of the source run or another train\.init_checkpoint$",
    ):
        train_and_evaluate(config, "fresh")
    assert snapshot(source) == before


def test_init_checkpoint_that_does_not_exist(text_copy):
    config = tiny_config(**TEXT_DATA)
    config.train.init_checkpoint = "runs/missing"
    with one_line_error(
        ConfigError,
        r"^train\.init_checkpoint 'runs/missing' does not exist; set "
        r"train\.init_checkpoint to an mlm workdir, its checkpoints/ directory or a "
        r"checkpoints/STEP directory$",
    ):
        train_and_evaluate(config, "fresh")


# ------------------------------------------------------------------------------ divergence


def test_divergence_stops_the_run_naming_the_step_to_resume_from(text_copy):
    config = text_config()
    config.optimizer.learning_rate = 1e30
    config.train.update(num_steps=30, checkpoint_every=100, max_consecutive_skips=3)
    fails_leaving_checkpoints(
        DivergenceError,
        r"^training diverged: the loss or gradients were not finite for 3 steps in a row \(up to "
        r"step \d+\); those updates were skipped and nothing was saved after step 6; lower "
        r"optimizer\.learning_rate \(or check the data\) and run again to resume from step 6$",
        config,
    )


def test_cli_divergence_prints_one_error_line(text_copy):
    before = snapshot()
    result = run_cli(
        "--config",
        CONFIG_FILE,
        "--workdir",
        WORKDIR,
        "--config.optimizer.learning_rate=1e30",
        "--config.train.num_steps=30",
        "--config.train.checkpoint_every=100",
        "--config.train.max_consecutive_skips=3",
        cwd=text_copy,
    )
    assert result.returncode == 2, result.stderr
    assert snapshot() == before
    assert len(error_lines(result)) == 1, result.stderr[-2000:]
    assert error_lines(result)[0].startswith("error: training diverged")


# ------------------------------------------------------------------------- workdir and readers


def lock_holder(path):
    """The holder line of a workdir lock file, once a run has taken the lock, else ''."""
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def test_two_runs_in_one_workdir_the_second_stops_at_once(text_copy):
    before = snapshot()
    first = subprocess.Popen(
        [sys.executable, "-m", "mlm.train", "--config", CONFIG_FILE, "--workdir", WORKDIR]
        + ["--config.train.num_steps=100000", "--config.train.checkpoint_every=100000"],
        cwd=text_copy,
        env=dict(os.environ, PYTHONPATH=ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while f"pid {first.pid} " not in lock_holder(os.path.join(WORKDIR, "lock")):
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.05)  # Leave the cores to the run that is starting.
        second = run_cli("--config", CONFIG_FILE, "--workdir", WORKDIR, cwd=text_copy)
        assert second.returncode == 2, second.stderr[-2000:]
        assert error_lines(second) == [
            f"error: workdir '{WORKDIR}' is in use by another run (host {os.uname().nodename} "
            f"pid {first.pid} since " + error_lines(second)[0].split(" since ")[1]
        ]
        assert error_lines(second)[0].endswith(
            "); wait for it to finish or stop it, or pass another --workdir"
        )
        assert "Traceback" not in second.stderr
    finally:
        first.kill()  # kill -9: the kernel releases the lock.
        first.communicate()
    assert snapshot() == before
    third = run_cli("--config", CONFIG_FILE, "--workdir", WORKDIR, cwd=text_copy)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resumed from workdir/checkpoints step 6" in third.stderr


def test_config_json_gone_and_another_model_size_is_a_mismatch_not_damage(text_copy):
    os.remove(os.path.join(WORKDIR, "config.json"))
    config = text_config()
    config.model.hidden_size = 64
    fails_leaving_checkpoints(
        WorkdirError,
        r"^workdir 'workdir' holds a run with model\.hidden_size=32 "
        r"\(workdir/checkpoints/6/config\), this config has 64; use a new --workdir or the same "
        r"config$",
        config,
    )
    assert not os.path.exists(os.path.join(WORKDIR, "checkpoints", "damaged"))
    # The right config still resumes from the last step, not from 0.
    train_and_evaluate(text_config(), WORKDIR)
    with open(os.path.join(WORKDIR, "metrics.jsonl")) as file:
        assert [json.loads(line)["step"] for line in file] == [3, 6, 9]


def test_a_mismatch_with_no_saved_config_at_all_is_still_not_damage(text_copy):
    os.remove(os.path.join(WORKDIR, "config.json"))
    for step in ("3", "6"):
        shutil.rmtree(os.path.join(WORKDIR, "checkpoints", step, "config"))
    config = text_config()
    config.model.hidden_size = 64
    fails_leaving_checkpoints(
        ConfigError,
        r"^checkpoint step 6 holds a train state of another shape or structure than this config "
        r"builds \(params/\S+ is \([\d, ]*32[\d, ]*\) in the checkpoint, \([\d, ]*64[\d, ]*\) "
        r"here\); resume with the config the run was started with",
        config,
    )
    assert not os.path.exists(os.path.join(WORKDIR, "checkpoints", "damaged"))


def damage_step(step):
    for root, _, names in os.walk(os.path.join(WORKDIR, "checkpoints", str(step), "state")):
        for name in names:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as file:
                file.seek(size // 2)
                file.write(b"\xff" * min(64, max(1, size - size // 2)))


def run_module(module, *args, cwd):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_readers_use_the_latest_intact_step_and_leave_the_damaged_one(text_copy):
    damage_step(6)
    before = snapshot()
    result = run_module(
        "mlm.fill_mask", "--workdir", WORKDIR, "--text", "river [MASK]", cwd=text_copy
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint step 6 is incomplete or damaged" in result.stderr
    assert "left in place, trying the previous step" in result.stderr
    assert "checkpoint step 3" in result.stdout
    result = run_module(
        "mlm.convert", "--to", "hf", "--input", WORKDIR, "--output", "hf_out", cwd=text_copy
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(os.path.join("hf_out", "model.safetensors"))
    config = tiny_config(**TEXT_DATA)
    config.train.update(init_checkpoint=WORKDIR, num_steps=2)
    train_and_evaluate(config, "started")
    with open(os.path.join("started", "init_report.txt")) as file:
        assert "step 3" in file.read()
    assert snapshot() == before  # Nothing moved, cleaned up or rewritten by a reader.


def test_mode_eval_on_a_new_workdir_stops_before_any_file(text_copy):
    result = run_cli("--config", CONFIG_FILE, "--workdir", "new", "--mode", "eval", cwd=text_copy)
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_lines(result) == [
        "error: --mode eval: workdir 'new' has no checkpoint; train first, or pass the workdir "
        "of a trained run"
    ]
    assert "Traceback" not in result.stderr
    assert not os.path.exists("new")


def test_mode_eval_without_eval_data_is_refused(text_copy):
    before = snapshot()
    result = run_cli("--config", CONFIG_FILE, "--workdir", WORKDIR, "--mode", "eval", cwd=text_copy)
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_lines(result) == [
        "error: --mode eval: data.train_files has no eval data; set the eval data of the source "
        "(data.eval_files, data.tfds_eval_split, data.hf_eval_split or data.eval_tfrecord_files)"
    ]
    assert snapshot() == before


def test_a_new_run_in_a_workdir_whose_checkpoints_are_gone_starts_afresh(text_copy):
    shutil.rmtree(os.path.join(WORKDIR, "checkpoints"))
    old_best = os.path.join(WORKDIR, "checkpoints_best", "6")
    os.makedirs(old_best)
    with open(os.path.join(old_best, "kept"), "w") as file:
        file.write("the earlier run's best step")
    config = text_config()
    config.model.hidden_size = 64  # Another model: no checkpoint holds the old one any more.
    train_and_evaluate(config, WORKDIR)
    with open(os.path.join(WORKDIR, "metrics.jsonl")) as file:
        assert [json.loads(line)["step"] for line in file] == [3, 6, 9]  # Each step once.
    moved = os.path.join(WORKDIR, "previous_runs", "1", "checkpoints_best", "6", "kept")
    with open(moved) as file:
        assert file.read() == "the earlier run's best step"
    assert not os.path.exists(os.path.join(WORKDIR, "checkpoints_best"))


def test_cli_save_failing_mid_run_prints_one_line_and_keeps_the_saved_steps(text_copy, tmp_path):
    with tmpfs(tmp_path / "full", disk_usage_kb(text_copy) + 1536) as mount:
        shutil.copytree(text_copy, mount / "run", dirs_exist_ok=True)
        fill_up(mount, leave_kb=700)  # Room for a step or so (~360 KiB each), not for four.
        before = snapshot(mount / "run" / WORKDIR)
        result = run_cli(
            "--config",
            CONFIG_FILE,
            "--workdir",
            WORKDIR,
            "--config.train.num_steps=18",
            cwd=mount / "run",
        )
        assert result.returncode == 2, result.stderr[-2000:]
        lines = error_lines(result)
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert re.fullmatch(
            r"error: saving a checkpoint in '\S+/checkpoints' failed \(No space left on device\); "
            r"free space or fix the disk, then run the same command again to resume from step "
            r"\d+",
            lines[0],
        ), lines[0]
        after = snapshot(mount / "run" / WORKDIR)
        assert {path: after.get(path) for path in before} == before
        names = os.listdir(mount / "run" / WORKDIR / "checkpoints")
        assert not [name for name in names if "tmp" in name], names
