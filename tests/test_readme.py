"""The README's library example runs as written (in a temporary workdir)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as file:
        return re.findall(r"```python\n(.*?)```", file.read(), flags=re.S)


def test_library_example_runs(tmp_path):
    (block,) = python_blocks()
    code = block.replace("/tmp/nb_run", str(tmp_path / "nb_run"))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert 0.0 <= float(lines[0]) <= 1.0
    assert "'step': 5" in lines[-1] and "masked_lm_accuracy" in lines[-1]
    assert os.path.exists(tmp_path / "nb_run" / "checkpoints" / "20")
