"""Test session set-up shared by every test file."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

from mlm import kernels


def share_compilations() -> str:
    """Points JAX's persistent compilation cache at a fresh directory of this test process.

    Many tests compile the same tiny programs, in this process and in the subprocesses they
    start (which inherit the environment); with the cache each is compiled once per pytest
    worker. The directory is removed when the process exits.

    Returns:
      The cache directory.
    """
    path = tempfile.mkdtemp(prefix="mlm-tests-jax-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def compile_with_few_optimizations() -> None:
    """Turns on `jax_disable_most_optimizations` here and in the subprocesses tests start.

    The suite's programs are tiny models run for a few steps, so XLA's optimization passes
    (LLVM's above all) cost far more than they save: the train step of a 1-layer model took
    15 s to compile with them and 7 s without (one run each, on a 2-core AMD EPYC beside another
    test run). The tests compare numbers between runs
    and layouts, which all compile this way. tests/test_aot.py turns it off again for the real
    TPU compiler's memory and FLOP figures.
    """
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)


share_compilations()
compile_with_few_optimizations()
# With the tpu extra installed on a host without TPU chips, keep JAX on the CPU quietly, as the
# command-line entry points do (their subprocesses call it themselves).
kernels.skip_absent_tpu()

# The files that take longest (minutes each, serially), longest first. pytest-xdist hands whole
# files to its workers in collection order, so these go first and the short files fill in after
# them, rather than one long file running alone at the end.
LONGEST_FILES = (
    "test_errors.py",
    "test_train.py",
    "test_preemption.py",
    "test_parallel.py",
    "test_launch.py",
    "test_aot.py",
    "test_privacy.py",
    "test_readme.py",
    "test_notebook.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    """Orders the collected tests: LONGEST_FILES first, then the rest as collected."""

    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # Stable: tests keep their order within a file.


SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine stitches later.",
    "every good boy does fine on the long test.",
    "the rain in spain falls mainly on the plain.",
    "she sells sea shells by the sea shore today.",
]


@pytest.fixture(scope="module")
def bench_corpus(tmp_path_factory) -> str:
    """A text file in the BERT layout: 60 documents of 4 sentences."""
    lines = []
    for index in range(60):
        lines.extend(SENTENCES[(index + k) % len(SENTENCES)] for k in range(4))
        lines.append("")
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)
