"""Tests for mlm.checkpoint: FUSE-mount detection, commit-file checkpoints, state structures."""

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mlm import checkpoint, task
from mlm import config as config_lib
from mlm.errors import ConfigError, DivergenceError
from mlm.optim import create_optimizer

MOUNTS = """\
sysfs /sys sysfs rw 0 0
/dev/root / ext4 rw,relatime 0 0
my-bucket /home/me/gcs/my-bucket fuse.gcsfuse rw,nosuid,nodev 0 0
tmpfs /home/me/gcs/my-bucket/local tmpfs rw 0 0
other /mnt/with\\040space fuse.gcsfuse rw 0 0
"""


def test_fuse_mounts_are_found_by_the_longest_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert checkpoint.on_fuse_mount("/home/me/gcs/my-bucket/run/checkpoints", str(mounts))
    assert checkpoint.on_fuse_mount("/home/me/gcs/my-bucket", str(mounts))
    assert checkpoint.on_fuse_mount("/mnt/with space/run", str(mounts))
    assert not checkpoint.on_fuse_mount("/home/me/gcs/my-bucket/local/run", str(mounts))
    assert not checkpoint.on_fuse_mount("/home/me/gcs/my-bucket-2/run", str(mounts))
    assert not checkpoint.on_fuse_mount("/tmp/run", str(mounts))
    assert not checkpoint.on_fuse_mount("/tmp/run", str(tmp_path / "missing"))


def test_commit_file_checkpoints_save_and_restore(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "on_fuse_mount", lambda path: True)
    directory = str(tmp_path / "checkpoints")
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3)}
    manager = checkpoint.make_manager(directory, keep=2)
    checkpoint.save(manager, 3, state, None)
    manager.wait_until_finished()
    assert os.path.exists(os.path.join(directory, "3", "commit_success.txt"))
    assert manager.latest_step() == 3
    restored = checkpoint.restore(manager, 3, state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    manager.close()


@flax.struct.dataclass
class TaskStateBeforeEma:
    """TaskState as it was before ema_params / loss_scale, saved as that code saved it."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def tiny_state(ema_decay=0.0, dtype="float32", hidden_size=8):
    config = config_lib.base_config()
    config.model.update(
        vocab_size=40, hidden_size=hidden_size, num_layers=1, num_heads=2, intermediate_size=16
    )
    config.model.update(max_position_embeddings=16, dtype=dtype)
    config.data.update(seq_length=16, max_predictions_per_seq=2, use_next_sentence_label=False)
    config.optimizer.update(warmup_steps=0, ema_decay=ema_decay)
    config.train.num_steps = 10
    config = config_lib.validate(config)
    model = task.build_model(config)
    tx = create_optimizer(config.optimizer, config.train.num_steps)
    init_fn = task.state_initializer(config, model, tx)
    return init_fn(jax.random.PRNGKey(1)), jax.eval_shape(init_fn, jax.random.PRNGKey(0))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_checkpoint_written_before_ema_and_loss_scale_restores(tmp_path):
    state, abstract = tiny_state()
    assert state.ema_params is None and state.loss_scale is None
    old = TaskStateBeforeEma(state.step + 7, state.params, state.opt_state, state.rng)
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), keep=0)
    item = {checkpoint.STATE_ITEM: ocp.args.StandardSave(old)}  # The old checkpoint.save.
    manager.save(7, args=ocp.args.Composite(**item))
    manager.wait_until_finished()
    restored, step = checkpoint.restore_latest_intact(manager, abstract, report=print)
    assert step == 7 and isinstance(restored, task.TaskState)
    assert restored.ema_params is None and restored.loss_scale is None
    assert int(restored.step) == 7
    assert_trees_equal((restored.params, restored.opt_state), (state.params, state.opt_state))
    # Turning EMA on for that run builds another state: refused with the one-line error.
    _, with_ema = tiny_state(ema_decay=0.9)
    with pytest.raises(ConfigError, match="another shape or structure"):
        checkpoint.restore_latest_intact(manager, with_ema, report=print)
    manager.close()


def test_ema_params_and_loss_scale_are_saved_and_restored(tmp_path):
    state, abstract = tiny_state(ema_decay=0.5, dtype="float16")
    state = state.replace(ema_params=jax.tree.map(lambda p: p + 1.0, state.params))
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), keep=0)
    checkpoint.save(manager, 3, state, None)
    manager.wait_until_finished()
    restored = checkpoint.restore(manager, 3, abstract)
    assert_trees_equal(restored, state)
    manager.close()


def files_of(directory):
    """path -> bytes of every file under `directory`."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as file:
                found[os.path.join(root, name)] = file.read()
    return found


def damage(step_dir):
    """Overwrites the middle of every file of a step's state item."""
    for root, _, names in os.walk(os.path.join(step_dir, checkpoint.STATE_ITEM)):
        for name in names:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as file:
                file.seek(size // 2)
                file.write(b"\xff" * min(64, max(1, size - size // 2)))


def test_a_reader_skips_a_damaged_step_and_leaves_it_in_place(tmp_path):
    state, abstract = tiny_state()
    directory = str(tmp_path / "checkpoints")
    manager = checkpoint.make_manager(directory, keep=0)
    for step in (1, 2):
        checkpoint.save(manager, step, state.replace(step=jnp.asarray(step)), None)
    checkpoint.finish(manager)
    damage(os.path.join(directory, "2"))
    before = files_of(directory)
    reports = []
    reader = checkpoint.open_reader(directory)
    restored, step = checkpoint.restore_latest_intact(
        reader, abstract, report=reports.append, move_damaged=False
    )
    reader.close()
    assert step == 1 and int(restored.step) == 1
    assert len(reports) == 1 and reports[0].startswith("checkpoint step 2 is incomplete or damaged")
    assert reports[0].endswith("left in place, trying the previous step")
    assert files_of(directory) == before  # Nothing moved, written or cleaned up.
    # The run that owns the directory moves it aside instead, and resumes from the same step.
    owner = checkpoint.make_manager(directory, keep=0)
    _, step = checkpoint.restore_latest_intact(
        owner, abstract, report=reports.append, move_damaged=True
    )
    owner.close()
    assert step == 1 and os.path.isdir(os.path.join(directory, "damaged", "2"))


def test_a_step_of_other_shapes_is_a_mismatch_not_damage(tmp_path):
    state, _ = tiny_state()
    directory = str(tmp_path / "checkpoints")
    manager = checkpoint.make_manager(directory, keep=0)
    checkpoint.save(manager, 5, state, None)
    checkpoint.finish(manager)
    _, wider = tiny_state(hidden_size=64)
    before = files_of(directory)
    manager = checkpoint.make_manager(directory, keep=0)
    with pytest.raises(
        checkpoint.StateMismatchError,
        match=r"checkpoint step 5 holds a train state of another shape or structure than this "
        r"config builds \(params/\S+ is \([\d, ]+\) in the checkpoint, \([\d, ]+\) here\)",
    ) as caught:
        checkpoint.restore_latest_intact(manager, wider, report=print)
    manager.close()
    assert caught.value.step == 5
    assert files_of(directory) == before  # Not moved to damaged/.


def test_non_finite_parameters_are_never_saved(tmp_path):
    state, _ = tiny_state()
    directory = str(tmp_path / "checkpoints")
    manager = checkpoint.make_manager(directory, keep=0)
    checkpoint.save(manager, 1, state, None)
    broken = state.replace(
        params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params)
    )
    with pytest.raises(
        DivergenceError,
        match=r"^training diverged: the parameters at step 2 are not finite, so step 2 was not "
        r"saved; .* resume from step 1$",
    ):
        checkpoint.save(manager, 2, broken, None)
    checkpoint.finish(manager)
    assert manager.all_steps() == [1]
    assert checkpoint.all_finite(state) and not checkpoint.all_finite(broken)


@pytest.mark.parametrize(
    "metric,comp,kept",
    [
        ("validation_loss", "", 1),  # By the name: a loss is better lower.
        ("validation_loss", "higher", 2),
        ("masked_lm_accuracy", "", 2),
        ("masked_lm_accuracy", "lower", 1),
    ],
)
def test_best_metric_comp_overrides_the_guess_from_the_name(tmp_path, metric, comp, kept):
    manager = checkpoint.make_best_manager(str(tmp_path / "checkpoints_best"), metric, comp)
    # Step 2 has the higher loss and the higher accuracy.
    for step, loss, accuracy in ((1, 2.0, 0.1), (2, 3.0, 0.3)):
        metrics = {"step": step, "validation_loss": loss, "masked_lm_accuracy": accuracy}
        checkpoint.save_best(manager, step, {"w": jnp.ones(2) * step}, metrics)
    checkpoint.finish(manager)
    assert os.listdir(tmp_path / "checkpoints_best") == [str(kept)]


def test_late_wakeups_of_a_closed_event_loop_stay_off_the_console(monkeypatch):
    import asyncio
    import logging
    import sys

    import tensorstore as ts

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
    monkeypatch.setattr(logging.getLogger("absl"), "filters", [])
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    checkpoint.quiet_background_failures()
    checkpoint.quiet_background_failures()  # Idempotent: one filter each, one hook.
    assert len(logging.getLogger("absl").filters) == 1
    assert len(logging.getLogger("asyncio").filters) == 1

    # What a failed orbax save leaves behind: a tensorstore write that completes after the
    # event loop awaiting it was closed.
    promise, future = ts.Promise.new()

    async def wait_for_write():
        await future

    loop = asyncio.new_event_loop()
    pending = loop.create_task(wait_for_write())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    promise.set_result(1)
    assert seen == []

    class FailsOnDelete:
        def __del__(self):
            raise ValueError("a real problem")

    FailsOnDelete()
    assert [repr(error) for error in seen] == ["ValueError('a real problem')"]
    pending._log_destroy_pending = False  # The never-woken task is the point here.


def test_unretrieved_write_failures_are_dropped_only_after_a_save_failed(monkeypatch, caplog):
    import logging
    import threading

    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    monkeypatch.setattr(checkpoint, "_SAVE_HAS_FAILED", threading.Event())
    checkpoint.quiet_background_failures()
    asyncio_logger = logging.getLogger("asyncio")
    echo = "Future exception was never retrieved\nfuture: <Future finished exception=OSError(28)>"
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio_logger.error(echo)  # No save failed: a real problem, shown.
        checkpoint._SAVE_HAS_FAILED.set()
        asyncio_logger.error(echo)  # The failed save's other writes: already reported.
        asyncio_logger.error("Unclosed client session")
    assert [record.getMessage().split("\n")[0] for record in caplog.records] == [
        "Future exception was never retrieved",
        "Unclosed client session",
    ]
