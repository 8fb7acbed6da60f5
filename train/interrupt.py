"""SIGTERM (how clusters preempt a job) and SIGINT (Ctrl-C) end a run at a step boundary: the step in flight
finishes, a resumable checkpoint of the epoch so far is written, and the run exits non-zero saying how to
continue. A second Ctrl-C stops at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any, Optional

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by the signal handlers; the training loop reads ``signum`` after every step."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: no waiting for the step
        self.signum = signum


class RunInterrupted(Exception):
    """A run stopped by a signal after writing its resumable checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[StopRequest]:
    """SIGTERM and SIGINT set the request instead of killing the process, for the block's duration (the
    main thread only: Python delivers signals there; elsewhere, or when not ``enabled``, nothing changes)."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request) for s in _SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
