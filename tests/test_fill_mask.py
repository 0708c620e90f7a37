"""Tests for mlm.fill_mask: its command line's one-line errors and how many candidates it gives.

The workdir is written the way `mlm.convert --from` writes one (config.json, vocab.txt and
checkpoints/0 with its `config` item), from a randomly initialised 1-layer model: the tests are
about inputs, not predictions.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm import config as config_lib
from mlm import convert, fill_mask, task
from mlm import workdir as workdir_lib
from mlm.errors import ConfigError, WorkdirError
from mlm.optim import create_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]"]
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "."]
TEXT = "the cat sat on the [MASK] ."


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = config_lib.base_config()
    config.model.update(
        vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    config.model.max_position_embeddings = 16
    config.data.update(seq_length=16, max_predictions_per_seq=2, use_next_sentence_label=False)
    config = config_lib.validate(config)
    model = task.build_model(config)
    tx = create_optimizer(config.optimizer, config.train.num_steps)
    state = task.state_initializer(config, model, tx)(jax.random.PRNGKey(0))
    params = jax.tree.map(np.asarray, state.params)
    path = str(tmp_path_factory.mktemp("fill_mask") / "run")
    convert.write_workdir(path, config, params, "\n".join(SPECIALS + WORDS) + "\n", "test")
    return path


@pytest.fixture
def damaged(workdir, tmp_path):
    """A copy of the workdir, for a test to damage."""
    return shutil.copytree(workdir, tmp_path / "run")


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "mlm.fill_mask", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_line(argv, capsys):
    """Runs the command line in-process; returns its one `error:` line (exit status 2)."""
    assert fill_mask.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("top_k", ["0", "-3"])
def test_top_k_below_one_is_refused(workdir, capsys, top_k):
    line = error_line(["--workdir", workdir, "--text", TEXT, "--top_k", top_k], capsys)
    assert line == (
        f"error: --top_k must be a whole number of at least 1, got {top_k}; e.g. --top_k 5 "
        "(values above the vocab show every candidate)"
    )


def test_negative_top_k_on_the_real_command_line_prints_one_line_not_the_vocab(workdir):
    result = run_cli("--workdir", workdir, "--text", TEXT, "--top_k", "-3", cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: --top_k must be a whole number of at least 1, got -3; e.g. --top_k 5 (values "
        "above the vocab show every candidate)"
    ]
    assert result.stdout == ""


def test_top_k_above_the_vocab_gives_every_word_once(workdir):
    predictor = fill_mask.load_predictor(workdir)
    [candidates] = fill_mask.fill_mask(predictor, TEXT, top_k=1000)
    assert sorted(token for token, _ in candidates) == sorted(WORDS)
    probabilities = [p for _, p in candidates]
    assert probabilities == sorted(probabilities, reverse=True) and min(probabilities) > 0
    with pytest.raises(ConfigError, match="--top_k must be a whole number of at least 1"):
        fill_mask.fill_mask(predictor, TEXT, top_k=0)


@pytest.mark.parametrize(
    "content,problem",
    [
        ('{"model": {"hidden_size": 16,', r"is not valid JSON \(Expecting"),
        ("", r"is not valid JSON \(Expecting value: line 1 column 1 \(char 0\)\)"),
        ("[1, 2]", r"holds a JSON array, not an object of config sections"),
        ("null", r"holds a JSON null, not an object of config sections"),
    ],
    ids=["truncated", "empty", "array", "null"],
)
def test_config_json_that_is_not_a_json_object_names_the_file_and_the_fix(
    damaged, capsys, content, problem
):
    config_path = damaged / "config.json"
    config_path.write_text(content)
    line = error_line(["--workdir", str(damaged), "--text", TEXT], capsys)
    saved = damaged / "checkpoints" / "0" / "config" / "metadata"
    assert line.startswith(f"error: {config_path} ")
    assert line.endswith(
        f"; restore it from the config saved with step 0: cp {saved} {config_path}"
    )
    assert re.search(problem, line), line
    # The fix the message gives works.
    shutil.copy(saved, config_path)
    assert fill_mask.main(["--workdir", str(damaged), "--text", TEXT, "--top_k", "2"]) == 0
    assert "[MASK] 1:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "section,field,value,problem",
    [
        ("model", "hidden_size", "16", r"config field 'model\.hidden_size' must be int, got '16'"),
        ("model", "num_heads", None, r"config field 'model\.num_heads' must be int, got None"),
        ("data", "lowercase", "yes", r"config field 'data\.lowercase' must be bool, got 'yes'"),
        ("model", "num_heads", 3, r"model\.hidden_size \(16\) must be divisible by"),
        ("model", None, [1], r"section 'model' must be an object of fields"),
    ],
    ids=["text_int", "null_int", "text_bool", "impossible", "section_not_object"],
)
def test_config_json_with_wrong_fields_is_one_workdir_error(
    damaged, capsys, section, field, value, problem
):
    config_path = damaged / "config.json"
    config = json.loads(config_path.read_text())
    if field is None:
        config[section] = value
    else:
        config[section][field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(WorkdirError) as caught:
        workdir_lib.read_config(str(damaged))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{config_path} is not a valid run config (")
    assert re.search(problem, message), message
    assert message.endswith(f"cp {damaged}/checkpoints/0/config/metadata {config_path}")
    line = error_line(["--workdir", str(damaged), "--text", TEXT], capsys)
    assert line == f"error: {message}"


def test_config_json_without_a_saved_config_points_to_the_checkpoint_items(damaged):
    shutil.rmtree(damaged / "checkpoints" / "0" / "config")
    (damaged / "config.json").write_text("{")
    with pytest.raises(WorkdirError, match=r"restore it from a checkpoint step's config item "):
        workdir_lib.read_config(str(damaged))


def test_usage_names_the_command_a_user_types(capsys):
    with pytest.raises(SystemExit) as caught:
        fill_mask.main(["--help"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m mlm.fill_mask ")


USAGE = "usage: python -m mlm.fill_mask --workdir DIR --text TEXT [--top_k K]"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--text", TEXT], "--workdir is required"),
        (["--workdir", "w", "--top_k", "5"], "--text is required"),
        (["--workdir", "w", "--text", TEXT, "--top_k", "five"], "flag --top_k=five: invalid"),
        (["--workdir", "w", "--text", TEXT, "--topk", "5"], "Unknown command line flag 'topk'"),
        (["--workdir", "w", "--text", "the", "[MASK]"], "unexpected argument '[MASK]'"),
        (["--workdir", "w", "--text"], "Missing value for flag --text"),
    ],
    ids=["no_workdir", "no_text", "top_k_not_a_number", "unknown_flag", "unquoted", "no_value"],
)
def test_flag_mistakes_are_one_line_with_the_usage(capsys, argv, message):
    line = error_line(argv, capsys)
    assert line.startswith(f"error: {message}") and line.endswith(f"; {USAGE}"), line


def test_main_runs_again_in_the_same_process_with_its_own_flags(workdir, capsys):
    # absl's global FLAGS are not used: each call parses its own argv, defaults included.
    assert fill_mask.main(["--workdir", workdir, "--text", TEXT, "--top_k", "2"]) == 0
    assert fill_mask.main(["--workdir", workdir, f"--text={TEXT}"]) == 0
    first, second = capsys.readouterr().out.split("checkpoint step 0\n")[1:]
    assert len(re.findall(r"^  ", first, flags=re.M)) == 2
    assert len(re.findall(r"^  ", second, flags=re.M)) == 5  # --top_k's default.


def test_real_command_line_help_names_the_command_and_every_flag():
    result = run_cli("--help", cwd=ROOT)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert result.stdout.startswith(USAGE + "\n")
    assert "fill_mask.py" not in result.stdout
    for flag in ("--workdir", "--text", "--top_k"):
        assert f"\n  {flag}: " in result.stdout
