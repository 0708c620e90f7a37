"""Reading configs from files and the command line: `--config FILE[:ARG]` and its overrides.

`load_config_file` runs a config file's `get_config()` (the ml_collections `FILE:ARG`
convention), `config_file_from_argv` and `check_overrides` read `--config` and `--config.x.y=v`
as absl will, and `run_with_config` runs an entry point's absl `main` after those checks, so a
mistake in the file or an override is one line (exit 2) rather than a traceback. The schema and
its validation are `mlm.config`.

The configs shipped in the repository's `configs/` folder are installed as the package
`mlm.configs` (pyproject.toml maps it onto the folder, so nothing is copied): a `--config`
value that names one (`quickstart`, `configs/quickstart.py`) and is not a file where the command
runs loads the shipped file (`resolve_config_path`, `packaged_config_path`), so the documented
commands work from any directory once mlm is installed.

`parse_flags` reads the absl flags of the commands that take no config (`mlm.fill_mask`,
`mlm.convert`) with the same one-line errors.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections

from mlm.config import check_number, did_you_mean, leaves
from mlm.errors import ConfigError, MlmError

if TYPE_CHECKING:
    from absl import flags

PACKAGED_CONFIGS = "mlm.configs"
# A `--config` value that may name a shipped config: NAME, NAME.py or configs/NAME.py.
_SHIPPED_NAME = re.compile(r"^(?:configs/)?([A-Za-z][A-Za-z0-9_]*)(?:\.py)?$")


def _split_config_path(spec: str) -> tuple[str, tuple[str, ...]]:
    """Splits `FILE:ARG` into the file and the arguments its `get_config` receives.

    The split is at the first ':', as ml_collections' `config_flags` (which loads the file again
    for the command line) and launch/tpu_vm.sh make it, and only when the part before it is a
    file; otherwise the whole string is the path.

    Args:
      spec: a path, or `FILE:ARG` (get_config(ARG)).

    Returns:
      (path, ()) or (path, (arg,)).
    """
    path, colon, arg = spec.partition(":")
    if colon and os.path.isfile(path):
        return path, (arg,)
    return spec, ()


def _packaged_configs_dir() -> str:
    """The directory of the shipped configs (the installed package `mlm.configs`).

    Raises:
      ConfigError: `mlm.configs` is not installed (mlm imported from a checkout that was never
        installed, or installed before the configs were packaged).
    """
    spec = importlib.util.find_spec(PACKAGED_CONFIGS)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the shipped configs ({PACKAGED_CONFIGS}) are not installed; install mlm again "
            "(in a checkout: pip install -e .) or pass a config file"
        )
    return list(spec.submodule_search_locations)[0]


def packaged_config_names() -> list[str]:
    """The names of the configs shipped with mlm (`quickstart`, `bert_base`, ...), sorted.

    Raises:
      ConfigError: `mlm.configs` is not installed.
    """
    directory = _packaged_configs_dir()
    return sorted(
        name[: -len(".py")]
        for name in os.listdir(directory)
        if name.endswith(".py") and not name.startswith("_")
    )


def packaged_config_path(name: str) -> str:
    """The path of a config shipped with mlm, wherever mlm is installed (notebooks use it).

    Args:
      name: `quickstart`, `quickstart.py` or `configs/quickstart.py`.

    Returns:
      The file's absolute path, for `load_config_file` or `--config`.

    Raises:
      ConfigError: no shipped config has that name (the message lists them), or `mlm.configs`
        is not installed.
    """
    match = _SHIPPED_NAME.match(os.path.normpath(name) if name else name)
    names = packaged_config_names()
    if not match or match.group(1) not in names:
        stem = match.group(1) if match else name
        raise ConfigError(
            f"mlm ships no config '{stem}'{did_you_mean(stem, names)}; pass one of "
            f"{', '.join(names)}, or a config file"
        )
    return os.path.join(_packaged_configs_dir(), match.group(1) + ".py")


def resolve_config_path(spec: str) -> str:
    """The config file a `--config` value means: the file when it exists, else the shipped one.

    A value that is not a file (or directory) here and has the form of a shipped config's name,
    `NAME`, `NAME.py` or `configs/NAME.py` (with `:ARG` or not), means the file `NAME.py` of
    `mlm.configs`, so `--config configs/quickstart.py` works from any directory once mlm is
    installed. Any other value is returned as it is (loading it names what is wrong).

    Args:
      spec: the `--config` value, a path or `FILE:ARG`.

    Returns:
      `spec`, or the shipped file's path (with `:ARG` when `spec` had one).

    Raises:
      ConfigError: `spec` has the form of a name but no shipped config has it (the message lists
        them and says the file does not exist), or `mlm.configs` is not installed.
    """
    file, args = _split_config_path(spec)
    if args or not file or os.path.exists(file):
        return spec
    file, colon, arg = spec.partition(":")
    if os.path.exists(file) or not _SHIPPED_NAME.match(os.path.normpath(file)):
        return spec  # Not a shipped config's name: loading it names what is wrong.
    try:
        return packaged_config_path(file) + colon + arg
    except ConfigError as error:
        raise ConfigError(f"config file '{file}' does not exist here, and {error}") from None


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file (for notebooks and tools; the CLI uses absl flags).

    Args:
      path: a Python file defining `get_config()`, or `FILE:ARG` to call `get_config(ARG)`
        (the ml_collections convention); a shipped config's name (`quickstart`,
        `configs/quickstart.py`) that is not a file here loads the shipped file
        (`resolve_config_path`).

    Returns:
      The config it returns (not yet validated).

    Raises:
      ConfigError: one line naming the file and what is wrong: missing (a name no shipped
        config has: listing them), not Python, an exception (with its line), no get_config, a
        get_config that takes other arguments, or a result that is not a ConfigDict.
    """
    path = resolve_config_path(path)
    file, args = _split_config_path(path)
    _check_config_path(file, path)
    name = "mlm_user_config"
    loader = importlib.machinery.SourceFileLoader(name, file)  # Any extension, as absl's.
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location(name, file, loader=loader)
    )
    try:
        loader.exec_module(module)
    except Exception as error:  # The user's file: any error it raises is one line.
        raise _file_error(file, error) from error
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(
            f"config file '{file}' defines no get_config(); see configs/quickstart.py"
        )
    _check_arguments(get_config, file, args)
    try:
        config = get_config(*args)
    except Exception as error:
        raise _file_error(file, error) from error
    if not isinstance(config, ml_collections.ConfigDict) or isinstance(
        config, ml_collections.FrozenConfigDict
    ):
        raise ConfigError(
            f"config file '{file}': get_config() returned {type(config).__name__}, not a "
            "ConfigDict; return the config built from mlm.config.base_config()"
        )
    return config


def _check_config_path(file: str, spec: str) -> None:
    """Raises ConfigError unless `file` (from the `--config` value `spec`) is a file."""
    given = f" (from '{spec}')" if file != spec else ""
    if not file:
        raise ConfigError("the config file path is empty; pass e.g. configs/quickstart.py")
    if os.path.isdir(file):
        raise ConfigError(
            f"config file '{file}'{given} is a directory; pass a file in it, e.g. "
            "configs/quickstart.py"
        )
    if not os.path.isfile(file):
        if not given and ":" in file:  # FILE:ARG whose FILE is missing: name that file.
            file, given = file.partition(":")[0], f" (from '{spec}')"
        raise ConfigError(
            f"config file '{file}'{given} does not exist; pass e.g. configs/quickstart.py"
        )


def _check_arguments(get_config: Any, file: str, args: tuple[str, ...]) -> None:
    """Raises ConfigError when get_config cannot take `args` (the text after ':' or nothing)."""
    try:
        inspect.signature(get_config).bind(*args)
    except ValueError:  # No signature to check (a builtin); the call will tell.
        return
    except TypeError:
        signature = inspect.signature(get_config)
        if args and not signature.parameters:
            raise ConfigError(
                f"config file '{file}': get_config() takes no argument but '{file}:{args[0]}' "
                f"passes it '{args[0]}'; drop ':{args[0]}' or give get_config a parameter"
            ) from None
        if args:
            raise ConfigError(
                f"config file '{file}': get_config{signature} cannot be called with the one "
                f"argument '{args[0]}' that '{file}:{args[0]}' passes; give it one parameter"
            ) from None
        raise ConfigError(
            f"config file '{file}': get_config{signature} needs an argument; pass it after a "
            f"colon: --config '{file}:ARG'"
        ) from None


def _file_error(file: str, error: Exception) -> ConfigError:
    """One line for an exception raised while running a config file, with the line it came from."""
    target = os.path.abspath(file)
    frames = traceback.extract_tb(error.__traceback__)
    lines = [frame.lineno for frame in frames if os.path.abspath(frame.filename) == target]
    from_config_dict = bool(frames) and os.sep + "ml_collections" + os.sep in frames[-1].filename
    cause = error.args[0] if from_config_dict and error.args else None
    if isinstance(cause, KeyError) and cause.args:  # ml_collections wraps a KeyError.
        cause = cause.args[0]
    if isinstance(error, SyntaxError):
        reason = error.msg
        if not error.filename or os.path.abspath(error.filename) == target:
            lines.append(error.lineno)
        else:  # In a module the file imports.
            reason += f" ('{error.filename}' line {error.lineno})"
    elif isinstance(cause, str):  # Its text, not its repr.
        reason = re.sub(r" Other fields present: .*?\n", " ", cause)
    else:
        reason = str(error)
    if isinstance(error, MlmError):
        fix = ""  # Its message names the fix already.
    elif from_config_dict:
        # ml_collections refuses ill-typed assignments (TypeError) and, on locked configs,
        # unknown fields (AttributeError, KeyError).
        fix = "; fix the field in the file"
    else:
        reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
        if isinstance(error, ImportError):
            fix = "; install the module or fix the import"
        else:
            fix = "; fix the file"
    where = f"line {lines[-1]}: " if lines and lines[-1] else ""
    reason = " ".join(reason.split())
    return ConfigError(f"config file '{file}': {where}{reason}{fix}")


# absl reads `--config.x.y=v`, `-config.x.y=v` and, for a bool, `--noconfig.x.y`.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([A-Za-z0-9_.]+)(=.*)?$")
_CONFIG_FLAG = re.compile(r"^--?config(?:=(.*))?$")


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """Raises ConfigError for a `--config.x.y=v` flag the config flag would refuse or misread.

    absl's config flags already type-check values; an unknown name would otherwise surface as a
    traceback from inside flag parsing. Values are checked as `validate` checks them (finite
    floats, ints in range), so the mistake is named before anything loads.

    Args:
      config: the config loaded from the `--config` file.
      argv: the command line.
    """
    known = leaves(config)
    config_index = next((i for i, arg in enumerate(argv) if _CONFIG_FLAG.match(arg)), None)
    for index, arg in enumerate(argv):
        match = _OVERRIDE.match(arg)
        if match and config_index is not None and index < config_index:
            raise ConfigError(
                f"override '{arg}' comes before --config; put --config FILE first (absl applies "
                "overrides to the file's config)"
            )
        if match and match.group(1) not in known:
            name = match.group(1)
            raise ConfigError(
                f"unknown config field '{name}' in override '{arg}'{did_you_mean(name, known)};"
                " the fields are listed in docs/reference.md 'Config reference'"
            )
        if match and match.group(2):
            _check_override_type(match.group(1), match.group(2)[1:], known[match.group(1)])


def _check_override_type(name: str, text: str, default: Any) -> None:
    """Raises ConfigError when an override's value cannot be read as its field's type."""
    expected = type(default)
    if expected is bool:
        ok = text.lower() in ("true", "false", "1", "0")
    elif expected in (int, float):
        try:
            value = expected(text)
            ok = True
        except ValueError:
            ok = False
    else:
        return
    if not ok:
        raise ConfigError(
            f"config field '{name}' must be {expected.__name__}, got '{text}' in override "
            f"'--config.{name}={text}'; fix the value"
        )
    if expected is not bool:
        check_number(name, value)


def config_file_from_argv(argv: Sequence[str]) -> str | None:
    """Returns the value of `--config FILE` / `--config=FILE` in argv, if any.

    The last one counts, as absl reads it; `FILE:ARG` is returned whole (see `load_config_file`).

    Raises:
      ConfigError: an empty value, or a path with ':' that the config flag would split (it
        reads everything after the first ':' as the argument of get_config).
    """
    value = None
    args = iter(argv)
    for arg in args:
        if arg == "--":  # absl's end of flags.
            break
        match = _CONFIG_FLAG.match(arg)
        if match:
            value = match.group(1) if match.group(1) is not None else next(args, None)
    if value is None:
        return None
    if not value:
        raise ConfigError(
            "--config is empty; pass a config file, e.g. --config configs/quickstart.py"
        )
    if ":" in value and not _split_config_path(value)[1] and os.path.exists(value):
        file, _, arg = value.partition(":")
        raise ConfigError(
            f"--config '{value}': the path holds a ':', and --config reads 'FILE:ARG' (file "
            f"'{file}', get_config('{arg}')); rename the file or folder, or link it from a path "
            "without ':'"
        )
    return value


def with_config_path(argv: Sequence[str], path: str) -> list[str]:
    """argv with the value of its last `--config` (the one absl reads) replaced by `path`."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    for index in reversed(range(end)):
        match = _CONFIG_FLAG.match(argv[index])
        if match and match.group(1) is not None:
            argv[index] = argv[index][: match.start(1)] + path
            return argv
        if match and index + 1 < len(argv):
            argv[index + 1] = path
            return argv
    return argv


def parse_flags(
    flag_values: flags.FlagValues,
    argv: Sequence[str] | None,
    usage: str,
    description: str,
    required: Sequence[str] = (),
) -> flags.FlagValues:
    """Parses the command line of a command that takes no config into its absl flags.

    Such commands (`mlm.fill_mask`, `mlm.convert`) define their flags on an `absl.flags.FlagValues`
    of their own, so their `main(argv)` can run more than once in one process (tests, notebooks)
    and their flags never meet another command's. `--help` (`-h`, `--helpshort`, `--helpfull`)
    prints `usage: USAGE`, the description and the flags on stdout and exits with status 0.

    Args:
      flag_values: a fresh `flags.FlagValues()` holding the command's flags.
      argv: the arguments after the command name; None: `sys.argv[1:]`.
      usage: the command line a user types, e.g. `python -m mlm.fill_mask --workdir DIR ...`.
      description: what the command does, for `--help`.
      required: the flags that must be given.

    Returns:
      `flag_values`, parsed.

    Raises:
      ConfigError: an unknown flag, a value absl cannot read, a required flag missing or an
        argument that is not a flag: one line naming it, with the usage.
    """
    from absl import flags  # The command line only.

    argv = list(sys.argv[1:] if argv is None else argv)
    flags_part = argv[: argv.index("--")] if "--" in argv else argv
    if any(arg in ("-h", "--help", "-help", "--helpshort", "--helpfull") for arg in flags_part):
        lines = flag_values.get_help(prefix="", include_special_flags=False).splitlines()
        flag_lines = [line for line in lines if line.startswith(" ")]  # Not module headers.
        print(f"usage: {usage}\n\n{description.strip()}\n\nflags:\n" + "\n".join(flag_lines))
        sys.exit(0)
    try:
        rest = flag_values([usage.split(" --")[0], *argv])
    except flags.Error as error:
        raise ConfigError(f"{error}; usage: {usage}") from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected argument '{rest[1]}' (not a --flag); usage: {usage}")
    for name in required:
        if flag_values[name].value is None:
            raise ConfigError(f"--{name} is required; usage: {usage}")
    return flag_values


def run_with_config(main: Callable[[list[str]], None]) -> None:
    """Runs an entry point's absl `main`, a user mistake ending it with one line and exit 2.

    Before absl parses the flags, the `--config` file is loaded and the `--config.x.y=v`
    overrides are checked against its config, so a mistake in either is named in one line
    rather than in a traceback from flag parsing; a shipped config's name that is not a file
    here becomes the shipped file's path in `sys.argv` (`resolve_config_path`). An MlmError
    from these checks or from `main` is printed as `error: MESSAGE` on stderr and the process
    exits with status 2.

    Args:
      main: the absl main (`absl.app.run(main)`); the entry point has defined its flags, the
        config with `config_flags.DEFINE_config_file` (mlm.bench, whose `--config` may be
        absent, checks its overrides itself: a config-dict flag reads them when defined).
    """
    from absl import app  # The command line only.

    try:
        config_path = config_file_from_argv(sys.argv)
        if config_path:
            # absl's config flag loads the file again: give it the file loaded here.
            config_path = resolve_config_path(config_path)
            check_overrides(load_config_file(config_path), sys.argv)
            sys.argv[:] = with_config_path(sys.argv, config_path)
        app.run(main)
    except MlmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
