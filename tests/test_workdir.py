"""Tests of the workdir: its lock, the run's config when config.json is gone, a new run's start."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mlm import checkpoint, workdir
from mlm import config as config_lib
from mlm.errors import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = """
import sys, time
from mlm import workdir
with workdir.locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with (
        workdir.locked(str(tmp_path)),
        pytest.raises(WorkdirError, match=rf"in use by another run \(host \S+ pid {os.getpid()} "),
        workdir.locked(str(tmp_path)),
    ):
        pass
    with workdir.locked(str(tmp_path)):  # Released on exit.
        pass


def test_kill_9_of_the_holder_frees_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(WorkdirError, match=rf"pid {holder.pid} "),
            workdir.locked(str(tmp_path)),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir.locked(str(tmp_path)):
        pass


def write_step(root, step, config=None):
    """A finished-looking step directory, with the run's config item when given."""
    directory = os.path.join(root, "checkpoints", str(step))
    os.makedirs(directory)
    if config is not None:
        manager = checkpoint.make_manager(os.path.join(root, "scratch"), keep=0)
        checkpoint.save(manager, step, {"x": np.zeros(2)}, None, config)
        manager.wait_until_finished()
        manager.close()
        os.rmdir(directory)
        os.replace(os.path.join(root, "scratch", str(step)), directory)


def test_without_config_json_the_steps_own_config_is_the_runs(tmp_path):
    run = config_lib.validate(config_lib.sized_config("tiny"))
    write_step(str(tmp_path), 4, run.to_dict())
    write_step(str(tmp_path), 8)  # No config item: the newest step that has one counts.
    config, where = workdir.run_config(str(tmp_path))
    assert config["model"]["hidden_size"] == run.model.hidden_size
    assert where == os.path.join(str(tmp_path), "checkpoints", "4", "config")
    bigger = config_lib.sized_config("tiny")
    bigger.model.hidden_size = 2 * run.model.hidden_size
    with pytest.raises(
        WorkdirError,
        match=rf"model\.hidden_size={run.model.hidden_size} \(.*checkpoints/4/config\), this "
        rf"config has {2 * run.model.hidden_size}; use a new --workdir or the same config$",
    ):
        workdir.check_consistent(config_lib.validate(bigger), str(tmp_path))
    assert workdir.check_consistent(
        config_lib.validate(config_lib.sized_config("tiny")), str(tmp_path)
    )


def test_a_run_written_before_a_model_field_existed_had_its_default(tmp_path):
    old = config_lib.validate(config_lib.sized_config("tiny")).to_dict()
    for field in ("norm_first", "embedding_size", "initializer_range", "mlm_activation"):
        del old["model"][field]
    write_step(str(tmp_path), 4)
    (tmp_path / "config.json").write_text(json.dumps(old))
    same = config_lib.validate(config_lib.sized_config("tiny"))
    assert workdir.check_consistent(same, str(tmp_path))  # Defaults: today's model.
    assert workdir.read_config(str(tmp_path)).model.norm_first is False
    pre_ln = config_lib.sized_config("tiny")
    pre_ln.model.norm_first = True
    with pytest.raises(
        WorkdirError, match=r"holds a run with model\.norm_first=False, this config has True"
    ):
        workdir.check_consistent(config_lib.validate(pre_ln), str(tmp_path))


def test_nested_model_fields_are_compared_and_named_one_by_one(tmp_path):
    old = config_lib.validate(config_lib.sized_config("tiny")).to_dict()
    del old["model"]["modernbert"]["norm_eps"]  # Written before that field existed.
    write_step(str(tmp_path), 4)
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert workdir.check_consistent(
        config_lib.validate(config_lib.sized_config("tiny")), str(tmp_path)
    )
    other = config_lib.sized_config("tiny")
    other.model.modernbert.local_attention = 2 * old["model"]["modernbert"]["local_attention"]
    with pytest.raises(
        WorkdirError,
        match=rf"^workdir '.*' holds a run with model\.modernbert\.local_attention="
        rf"{old['model']['modernbert']['local_attention']}, this config has "
        rf"{other.model.modernbert.local_attention}; use a new --workdir or the same config$",
    ):
        workdir.check_consistent(config_lib.validate(other), str(tmp_path))


def test_a_state_mismatch_names_only_the_changed_leaf_fields():
    run = config_lib.validate(config_lib.sized_config("tiny"))
    here = config_lib.sized_config("tiny")
    here.optimizer.clip_norm = 0.0
    error = checkpoint.StateMismatchError("differs", step=6, difference="opt_state")
    message = str(workdir.state_mismatch(error, run.to_dict(), config_lib.validate(here)))
    assert message == (
        f"checkpoint step 6 holds another train state than this config builds "
        f"(optimizer.clip_norm={run.optimizer.clip_norm!r} in the run, 0.0 here); resume with "
        "the run's config (WORKDIR/config.json) or use a new --workdir"
    )


def test_no_checkpoint_means_no_run_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {"hidden_size": 1}}))
    assert workdir.run_config(str(tmp_path)) is None
    assert (
        workdir.check_consistent(
            config_lib.validate(config_lib.sized_config("tiny")), str(tmp_path)
        )
        is None
    )


def test_a_new_run_sets_the_earlier_runs_best_checkpoint_aside(tmp_path):
    assert workdir.set_aside_previous_run(str(tmp_path)) is None
    best = tmp_path / "checkpoints_best" / "20"
    best.mkdir(parents=True)
    (best / "file").write_text("kept")
    (tmp_path / "init_report.txt").write_text("the earlier run's report")
    (tmp_path / "wandb_run_id").write_text("0123abcd\n")  # A new run starts a new W&B run.
    moved = workdir.set_aside_previous_run(str(tmp_path))
    assert moved == os.path.join(str(tmp_path), "previous_runs", "1")
    assert (tmp_path / "previous_runs" / "1" / "init_report.txt").exists()
    assert not (tmp_path / "init_report.txt").exists()
    assert (tmp_path / "previous_runs" / "1" / "wandb_run_id").read_text() == "0123abcd\n"
    assert not (tmp_path / "wandb_run_id").exists()
    assert (
        tmp_path / "previous_runs" / "1" / "checkpoints_best" / "20" / "file"
    ).read_text() == "kept"
    assert not (tmp_path / "checkpoints_best").exists()
    (tmp_path / "checkpoints_best" / "5").mkdir(parents=True)
    assert workdir.set_aside_previous_run(str(tmp_path)).endswith(
        os.path.join("previous_runs", "2")
    )
