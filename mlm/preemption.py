"""Preemption: finish the step in flight, save, and stop cleanly on SIGTERM / SIGINT.

One process: the signal handlers here record the request and the train loop asks `should_stop`
after every step. Several processes: JAX's preemption service (started by
`jax.distributed.initialize`) catches SIGTERM and agrees on one step for all processes; orbax's
`CheckpointManager.reached_preemption(step)` reports it, so every process saves the same step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

import jax

# The signals that ask a single-process run to stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
    """Records a stop request and tells the train loop when to save and stop.

    Use as a context manager around the train loop; the previous signal handlers come back on
    exit.

    Args:
      reached_sync_point: called with the step on multi-process runs (orbax's
        `manager.reached_preemption`); True when all processes should save at that step.
    """

    def __init__(self, reached_sync_point: Callable[[int], bool]):
        self._reached_sync_point = reached_sync_point
        self._multi_process = jax.process_count() > 1
        self._previous: dict[int, object] = {}
        self.signal_name: str | None = None

    def __enter__(self) -> PreemptionWatcher:
        # Python handlers replace JAX's own SIGTERM handling on multi-process runs, and can only
        # be installed from the main thread (a notebook's is).
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._request)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _request(self, number: int, frame: FrameType | None) -> None:
        del frame
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C stops at once.
        self.signal_name = signal.Signals(number).name

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save `step` and stop (call it after every step).

        Args:
          step: the step just dispatched.

        Returns:
          True once a stop was requested (single process) or the processes' agreed step is
          reached (several processes).
        """
        if self._multi_process:
            if self._reached_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None
