"""Test session set-up shared by every test file."""

import pytest

from mlm import kernels

# With the tpu extra installed on a host without TPU chips, keep JAX on the CPU quietly, as the
# command-line entry points do (their subprocesses call it themselves).
kernels.skip_absent_tpu()


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
