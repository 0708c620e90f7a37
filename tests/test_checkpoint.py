"""Tests for mlm.checkpoint: FUSE-mount detection and commit-file checkpoints."""

import os

import jax.numpy as jnp
import numpy as np

from mlm import checkpoint

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
