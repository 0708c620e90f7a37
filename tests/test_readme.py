"""The README's library example runs as written (in a temporary workdir)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as file:
        return re.findall(r"```python\n(.*?)```", file.read(), flags=re.S)


def test_library_example_runs_and_its_export_loads_in_transformers(tmp_path):
    block, fine_tune = python_blocks()
    code = block.replace("/tmp/nb_run", str(tmp_path / "nb_run"))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert 0.0 <= float(lines[0]) <= 1.0
    assert "'step': 5" in lines[-1] and "masked_lm_accuracy" in lines[-1]
    assert os.path.exists(tmp_path / "nb_run" / "checkpoints" / "20")
    # The fine-tuning recipe, on the model just trained, exported with mlm.convert.
    pytest.importorskip("transformers")
    exported = tmp_path / "exported"
    convert = [sys.executable, "-m", "mlm.convert", "--to", "hf"]
    convert += ["--input", str(tmp_path / "nb_run"), "--output", str(exported)]
    assert subprocess.run(convert, cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    code = fine_tune.replace("exported/my_domain_bert", str(exported))
    code += "\nprint(model(**tokenizer(['a list'], return_tensors='pt')).logits.shape)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "torch.Size([1, 2])"
