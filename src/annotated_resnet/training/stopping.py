"""Clean stops: a request to stop at the end of the current batch, from SIGTERM, Ctrl-C or a
time budget. The run that sees it saves a checkpoint at that very batch and returns; the same
command then resumes it (:func:`annotated_resnet.training.train.train`, :mod:`annotated_resnet.training.launcher`)."""

from __future__ import annotations

import contextlib
import signal
import threading


class StopRequest:
    """Set once, read after every batch by the run (or by the launcher, between its checks)."""

    def __init__(self):
        self.reason: str | None = None  # "SIGTERM", "SIGINT" or "the time budget"

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest):
    """Inside: SIGTERM and Ctrl-C (SIGINT) request a stop; a second Ctrl-C interrupts at once
    (the last checkpoint stays). Only the main thread can catch signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a new checkpoint
        stop.request(signal.Signals(signum).name)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
