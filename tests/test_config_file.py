"""Tests for mlm.config_file: config files (`FILE:ARG` too), `--config` and its overrides."""

import filecmp
import os
import re
import subprocess
import sys

import pytest
from ml_collections import config_flags

from mlm import config as config_lib
from mlm import config_file as config_file_lib
from mlm.errors import ConfigError


def test_check_overrides_rejects_unknown_names_only():
    config = config_lib.base_config()
    config_file_lib.check_overrides(config, ["--config.train.num_steps=5", "--workdir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"optimizer\.lr.*did you mean"):
        config_file_lib.check_overrides(config, ["--config.optimizer.lr=0.1"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_file_lib.load_config_file(str(tmp_path / "nope.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        config_file_lib.load_config_file(str(empty))


def test_ill_typed_assignment_in_config_file_is_one_line(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from mlm.config import base_config\n"
        "def get_config():\n"
        "    config = base_config()\n"
        "    config.train.num_steps = 'many'\n"
        "    return config\n"
    )
    with pytest.raises(ConfigError, match=r"typo\.py.*num_steps") as error:
        config_file_lib.load_config_file(str(path))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.optimizer.learning_rate=inf", r"'optimizer\.learning_rate' must be a finite"),
        ("--config.privacy.delta=nan", r"'privacy\.delta' must be a finite number, got nan"),
        ("--config.optimizer.b1=1e400", r"'optimizer\.b1' must be a finite number, got inf"),
        ("--config.train.num_steps=3000000000", r"'train\.num_steps' must be at most 2147483647"),
    ],
)
def test_check_overrides_refuses_what_validate_refuses(override, message):
    with pytest.raises(ConfigError, match=message):
        config_file_lib.check_overrides(
            config_lib.base_config(), ["prog", "--config", "c.py", override]
        )
    config = config_lib.base_config()
    flag, value = override.split("=")
    section, field = flag.removeprefix("--config.").split(".")
    with config.unlocked():
        config[section][field] = type(config[section][field])(value)
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config)


# ------------------------------------------------------------------------------- config files

CONFIG_BODY = (
    "from mlm.config import base_config\n\n\ndef get_config():\n    return base_config()\n"
)


@pytest.mark.parametrize(
    "source,message",
    [
        ("def get_config(:\n    pass\n", r": line 1: SyntaxError: invalid syntax; fix the file$"),
        (
            "def get_config():\nreturn 1\n",
            r": line 2: IndentationError: expected an indented block .*; fix the file$",
        ),
        (
            "def get_config():\n    x = 1\n    return x / 0\n",
            r": line 3: ZeroDivisionError: division by zero; fix the file$",
        ),
        (
            "def get_config():\n    raise ValueError('two\\nlines')\n",
            r": line 2: ValueError: two lines; fix the file$",
        ),
        (
            "import mlm_no_such_module\n",
            r": line 1: ModuleNotFoundError: No module named 'mlm_no_such_module'; install the "
            r"module or fix the import$",
        ),
        (
            "from mlm.config import sized_config\n\n\ndef get_config():\n"
            "    return sized_config('huge')\n",
            r": line 5: unknown model size 'huge'; use one of tiny, mini",
        ),
        (
            "def get_config():\n    pass\n",
            r" get_config\(\) returned NoneType, not a ConfigDict; return the config built from "
            r"mlm\.config\.base_config\(\)$",
        ),
        ("def get_config():\n    return {'model': {}}\n", r" get_config\(\) returned dict, not"),
        (
            "import ml_collections\nfrom mlm.config import base_config\n\n\ndef get_config():\n"
            "    return ml_collections.FrozenConfigDict(base_config())\n",
            r" get_config\(\) returned FrozenConfigDict, not a ConfigDict",
        ),
        ("get_config = 3\n", r" defines no get_config\(\)"),
    ],
)
def test_config_file_errors_are_one_line_naming_the_file(tmp_path, source, message):
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(ConfigError) as error:
        config_file_lib.load_config_file(str(path))
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(f"config file '{path}'"), text
    assert re.search(message, text), text


def test_syntax_error_in_a_module_the_config_imports_names_both(tmp_path, monkeypatch):
    (tmp_path / "helper_bad.py").write_text("x = (\n")
    (tmp_path / "uses.py").write_text("import helper_bad  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=r"^config file '.*uses\.py': line 1: SyntaxError: .*"
        r"\('.*helper_bad\.py' line 1\); fix the file$",
    ):
        config_file_lib.load_config_file(str(tmp_path / "uses.py"))


def test_config_path_that_is_a_directory_or_empty(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file '.*' is a directory; pass a file in it"):
        config_file_lib.load_config_file(str(tmp_path))
    with pytest.raises(ConfigError, match="config file path is empty"):
        config_file_lib.load_config_file("")


ARG_CONFIG = (
    "from mlm.config import sized_config\n\n\ndef get_config(size):\n"
    "    config = sized_config(size.split(':')[0])\n"
    "    config.data.text_field = size\n"
    "    return config\n"
)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # absl's loader.
@pytest.mark.parametrize("arg", ["tiny", "mini:extra"])
def test_file_colon_arg_is_passed_to_get_config_as_absl_passes_it(tmp_path, arg):
    path = tmp_path / "sized.py"
    path.write_text(ARG_CONFIG)
    spec = f"{path}:{arg}"
    config = config_file_lib.load_config_file(spec)
    assert config.data.text_field == arg  # Split at the first ':' only.
    assert config.model.hidden_size == config_lib.MODEL_SIZES[arg.split(":")[0]][1]
    absl = config_flags.config_flags.ConfigFileFlagParser("config").parse(spec)
    assert absl.to_dict() == config.to_dict()
    config_file_lib.check_overrides(
        config, ["prog", "--config", spec, "--config.train.num_steps=5"]
    )


def test_file_colon_arg_mismatches_with_get_config(tmp_path):
    (tmp_path / "sized.py").write_text(ARG_CONFIG)
    (tmp_path / "plain.py").write_text(CONFIG_BODY)
    with pytest.raises(ConfigError) as error:
        config_file_lib.load_config_file(f"{tmp_path}/plain.py:tiny")
    assert str(error.value) == (
        f"config file '{tmp_path}/plain.py': get_config() takes no argument but "
        f"'{tmp_path}/plain.py:tiny' passes it 'tiny'; drop ':tiny' or give get_config a "
        "parameter"
    )
    with pytest.raises(ConfigError) as error:
        config_file_lib.load_config_file(f"{tmp_path}/sized.py")
    assert str(error.value) == (
        f"config file '{tmp_path}/sized.py': get_config(size) needs an argument; pass it after a "
        f"colon: --config '{tmp_path}/sized.py:ARG'"
    )
    (tmp_path / "two.py").write_text("def get_config(a, b):\n    pass\n")
    with pytest.raises(ConfigError, match=r"get_config\(a, b\) cannot be called with the one"):
        config_file_lib.load_config_file(f"{tmp_path}/two.py:x")
    with pytest.raises(ConfigError) as error:
        config_file_lib.load_config_file(f"{tmp_path}/missing.py:tiny")
    assert str(error.value) == (
        f"config file '{tmp_path}/missing.py' (from '{tmp_path}/missing.py:tiny') does not "
        "exist; pass e.g. configs/quickstart.py"
    )


def test_a_path_with_a_colon_loads_in_python_but_is_refused_on_the_command_line(tmp_path):
    odd = tmp_path / "odd:name.py"
    odd.write_text(CONFIG_BODY)
    assert config_file_lib.load_config_file(str(odd)).model.hidden_size == 768
    with pytest.raises(ConfigError) as error:
        config_file_lib.config_file_from_argv(["prog", "--config", str(odd)])
    assert str(error.value) == (
        f"--config '{odd}': the path holds a ':', and --config reads 'FILE:ARG' (file "
        f"'{tmp_path}/odd', get_config('name.py')); rename the file or folder, or link it from "
        "a path without ':'"
    )


def test_config_file_from_argv_reads_the_flag_as_absl_does():
    read = config_file_lib.config_file_from_argv
    assert read(["prog", "--workdir", "w"]) is None
    assert read(["prog", "--config", "a.py", "--config=b.py:x"]) == "b.py:x"  # The last one.
    assert read(["prog", "-config", "a.py"]) == "a.py"
    assert read(["prog", "--config=a.py", "--", "--config=b.py"]) == "a.py"
    with pytest.raises(ConfigError, match=r"^--config is empty; pass a config file"):
        read(["prog", "--config="])


def test_override_before_the_config_flag_is_refused():
    config = config_lib.base_config()
    with pytest.raises(ConfigError) as error:
        config_file_lib.check_overrides(
            config, ["prog", "--config.train.num_steps=5", "--config", "c.py"]
        )
    assert str(error.value) == (
        "override '--config.train.num_steps=5' comes before --config; put --config FILE first "
        "(absl applies overrides to the file's config)"
    )
    config_file_lib.check_overrides(
        config, ["prog", "--config", "c.py", "--noconfig.data.lowercase"]
    )
    with pytest.raises(ConfigError, match=r"unknown config field 'data\.lowercas'"):
        config_file_lib.check_overrides(config, ["prog", "-config.data.lowercas=1"])


# ----------------------------------------------------------------------------- shipped configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(
    name[: -len(".py")]
    for name in os.listdir(os.path.join(ROOT, "configs"))
    if name.endswith(".py") and not name.startswith("_")
)


def test_shipped_configs_are_the_configs_folder():
    assert "quickstart" in SHIPPED
    assert config_file_lib.packaged_config_names() == SHIPPED
    for name in SHIPPED:
        path = config_file_lib.packaged_config_path(name)
        assert filecmp.cmp(path, os.path.join(ROOT, "configs", f"{name}.py"), shallow=False)


def test_pyproject_installs_the_configs_folder_and_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        setuptools = tomllib.load(file)["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"mlm.configs": "configs"}
    on_disk = {
        os.path.relpath(directory, ROOT).replace(os.sep, ".")
        for directory, _, files in os.walk(os.path.join(ROOT, "mlm"))
        if "__init__.py" in files
    }
    assert set(setuptools["packages"]) == on_disk | {"mlm.configs"}


@pytest.mark.parametrize("spec", ["configs/quickstart.py", "quickstart", "quickstart.py"])
def test_a_shipped_config_loads_by_name_from_a_directory_without_configs(
    tmp_path, monkeypatch, spec
):
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists("configs")
    packaged = config_file_lib.packaged_config_path("quickstart")
    assert config_file_lib.resolve_config_path(spec) == packaged
    expected = config_file_lib.load_config_file(os.path.join(ROOT, "configs", "quickstart.py"))
    assert config_file_lib.load_config_file(spec).to_dict() == expected.to_dict()


def test_a_file_where_the_command_runs_comes_before_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("configs")
    (tmp_path / "configs" / "quickstart.py").write_text(
        "from mlm.config import base_config\n\n\ndef get_config():\n"
        "    config = base_config()\n    config.train.num_steps = 3\n    return config\n"
    )
    assert config_file_lib.resolve_config_path("configs/quickstart.py") == "configs/quickstart.py"
    assert config_file_lib.load_config_file("configs/quickstart.py").train.num_steps == 3
    # A missing file elsewhere is not taken for a shipped config of the same name.
    with pytest.raises(ConfigError) as error:
        config_file_lib.load_config_file(str(tmp_path / "other" / "quickstart.py"))
    assert str(error.value) == (
        f"config file '{tmp_path}/other/quickstart.py' does not exist; pass e.g. "
        "configs/quickstart.py"
    )


@pytest.mark.parametrize(
    "spec,stem,hint",
    [
        ("configs/quikstart.py", "quikstart", " (did you mean 'quickstart'?)"),
        ("bert_huge", "bert_huge", " (did you mean 'bert_large'?)"),
        ("nothing_like_it.py", "nothing_like_it", ""),
    ],
)
def test_an_unknown_config_name_is_one_line_listing_the_shipped_ones(
    tmp_path, monkeypatch, spec, stem, hint
):
    monkeypatch.chdir(tmp_path)
    file = spec.partition(":")[0]
    with pytest.raises(ConfigError) as error:
        config_file_lib.load_config_file(spec)
    assert str(error.value) == (
        f"config file '{file}' does not exist here, and mlm ships no config '{stem}'{hint}; pass "
        f"one of {', '.join(SHIPPED)}, or a config file"
    )
    with pytest.raises(ConfigError, match=rf"^mlm ships no config '{stem}'"):
        config_file_lib.packaged_config_path(spec)


def test_with_config_path_replaces_the_value_absl_reads():
    replace = config_file_lib.with_config_path
    argv = ["p", "--config", "a", "--w", "x"]
    assert replace(argv, "/c.py") == ["p", "--config", "/c.py", "--w", "x"]
    argv = ["p", "--config=a", "--config=b:1"]  # absl reads the last one.
    assert replace(argv, "/c.py:1") == ["p", "--config=a", "--config=/c.py:1"]
    argv = ["p", "-config", "a", "--", "--config=b"]  # After '--': not a flag.
    assert replace(argv, "/c.py") == ["p", "-config", "/c.py", "--", "--config=b"]


def run_train(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "mlm.train", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_command_line_reads_a_shipped_config_from_any_directory(tmp_path):
    # --mode eval on a new workdir stops after absl has read the config and its override.
    result = run_train(
        "--config", "configs/quickstart.py", "--workdir", "new", "--mode", "eval",
        "--config.train.num_steps=5", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --mode eval: workdir 'new' has no checkpoint; train first, or pass the workdir of "
        "a trained run"
    )
    result = run_train("--config", "configs/quikstart.py", "--workdir", "new", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: config file 'configs/quikstart.py' does not exist here, and mlm ships no config "
        f"'quikstart' (did you mean 'quickstart'?); pass one of {', '.join(SHIPPED)}, or a "
        "config file"
    ]
    assert sorted(os.listdir(tmp_path)) == []
