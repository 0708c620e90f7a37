"""mlm.paths: the workdir layout and atomic text writes."""

import os
import stat

import pytest

from mlm import paths
from mlm.errors import WorkdirError


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old\n")
    paths.write_text_atomically(str(path), "new\n")
    assert path.read_text() == "new\n"
    paths.write_text_atomically(str(path), (f"{index}\n" for index in range(3)))
    assert path.read_text() == "0\n1\n2\n"
    assert os.listdir(tmp_path) == ["config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # Not mkstemp's 0600.


def test_an_error_while_writing_keeps_the_old_content(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n")

    def pieces():
        yield "[UNK]\n"
        raise ValueError("the source failed")

    with pytest.raises(ValueError, match="the source failed"):
        paths.write_text_atomically(str(path), pieces())
    assert path.read_text() == "[PAD]\n"
    assert os.listdir(tmp_path) == ["vocab.txt"]


def test_an_unwritable_directory_is_one_workdir_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(WorkdirError, match=r"cannot write x\.txt .*choose a writable workdir"):
        paths.write_text_atomically(str(blocker / "x.txt"), "text")


def test_metrics_streams_are_json_lines_files_in_the_workdir():
    assert paths.metrics_path("/runs/a", "eval_metrics") == "/runs/a/eval_metrics.jsonl"
