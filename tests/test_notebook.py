"""notebooks/quickstart.ipynb runs top to bottom headless and shows what it promises."""

import json
import os
import re
import subprocess
import sys

import nbformat
from nbclient import NotebookClient

from mlm.config_file import packaged_config_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
KERNEL = "mlm-test-python"


def write_kernel_spec(jupyter_dir) -> None:
    """A kernel spec that runs this interpreter, whatever `python` or user kernel specs say."""
    spec_dir = jupyter_dir / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mlm test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def outputs(cell, output_type: str) -> list[dict]:
    return [out for out in cell.get("outputs", []) if out["output_type"] == output_type]


def stdout_of(cell) -> str:
    return "".join(out["text"] for out in outputs(cell, "stream") if out["name"] == "stdout")


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def install_cell() -> str:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return [cell for cell in nb.cells if cell.cell_type == "code"][0].source


def run_install_cell(tmp_path, url: str | None) -> subprocess.CompletedProcess:
    """Runs the install cell where mlm is not importable (no site-packages), with pip replaced
    by a stand-in that writes an empty `mlm` package into a directory on sys.path."""
    site = tmp_path / "site"
    site.mkdir()  # Listed (empty) before the install, as pip's target is.
    prelude = f"""
import os, subprocess, sys
sys.path.insert(0, {str(site)!r})
def pip(argv, check, env):
    print("RAN", argv[1:], env["GIT_TERMINAL_PROMPT"])
    os.mkdir(os.path.join({str(site)!r}, "mlm"))
    open(os.path.join({str(site)!r}, "mlm", "__init__.py"), "w").close()
subprocess.run = pip
"""
    # Nothing but the cell's own site directory may hold mlm (PYTHONPATH would).
    env = {k: v for k, v in os.environ.items() if k not in ("MLM_GIT_URL", "PYTHONPATH")}
    if url is not None:
        env["MLM_GIT_URL"] = url
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + install_cell()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_install_cell_installs_mlm_from_the_named_repository(tmp_path):
    url = "https://git.example.org/team/mlm.git"
    result = run_install_cell(tmp_path, url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"installing mlm from {url}",
        f"RAN ['-m', 'pip', 'install', '-q', 'mlm @ git+{url}'] 0",
        f"mlm is installed: {tmp_path / 'site' / 'mlm'}",
    ]


def test_install_cell_without_a_repository_says_what_to_set(tmp_path):
    result = run_install_cell(tmp_path, None)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "RuntimeError: mlm is not installed here: set MLM_GIT_URL (in this cell or the "
        "environment) to the git URL of the mlm repository, then run this cell again"
    )
    assert "RAN" not in result.stdout  # Nothing was installed.


def test_notebook_runs(tmp_path, monkeypatch):
    write_kernel_spec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's workdir goes under tmp_path
    # 60 steps of the quickstart model: here XLA's optimizations pay for themselves (41 s
    # against 58 s without them); tests/conftest.py turns them off for the other tests.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The notebook's own schedule (300 steps) shortened, so the suite stays fast on 2 cores;
    # every cell still runs as written.
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    train_cell = [cell for cell in code_cells if "train_and_evaluate(config" in cell.source][0]
    for field, value in (("num_steps", 300), ("eval_every", 100), ("checkpoint_every", 300)):
        assignment = f"config.train.{field} = {value}"
        assert assignment in train_cell.source
        train_cell.source = train_cell.source.replace(assignment, f"config.train.{field} = 60")
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=600,
        resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}},
    )
    client.execute()  # raises CellExecutionError if a cell fails
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    install, train, curves, fill = code

    assert "mlm is installed" in stdout_of(install)
    assert "installing mlm" not in stdout_of(install)  # CI runs the notebook on mlm installed.
    # The config comes from the installed package, wherever the notebook runs.
    assert f"config: {packaged_config_path('quickstart')}\n" in stdout_of(train)
    assert f"workdir: {tmp_path}" in stdout_of(train)

    pngs = [out for out in outputs(curves, "display_data") if "image/png" in out["data"]]
    assert len(pngs) == 1
    match = re.search(
        r"final eval \(step 60, \d+ examples\): masked_lm_accuracy=([0-9.]+) "
        r"validation_loss=([0-9.]+)",
        stdout_of(curves),
    )
    assert match, stdout_of(curves)
    assert 0.0 < float(match.group(1)) <= 1.0
    assert float(match.group(2)) > 0.0

    text = stdout_of(fill)
    assert "checkpoint step 60" in text
    assert "input:  Return a [MASK] of the list." in text
    candidates = re.findall(r"^ +([0-9.]+)  (\S+)$", text.split("[MASK] 1:")[1], flags=re.M)
    assert len(candidates) == 5
    probabilities = [float(p) for p, _ in candidates]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
