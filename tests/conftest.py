"""Test session set-up shared by every test file."""

from mlm import kernels

# With the tpu extra installed on a host without TPU chips, keep JAX on the CPU quietly, as the
# command-line entry points do (their subprocesses call it themselves).
kernels.skip_absent_tpu()
