"""One GPU shared by the runs of the engine (:mod:`annotated_resnet.training.engine`), each
trained by a thread of its own on a CUDA stream of its own.

Two rules of CUDA decide what those threads may do at the same time:

* **Captures.** While a run captures its step as a CUDA graph, work of another thread that
  synchronises the device or loads code (a kernel launched for the first time, cuDNN setting
  itself up, the allocator handing memory back) breaks the capture. :data:`DEVICE_WORK` is a
  shared/exclusive lock: every piece of device work of a run (a batch built, a training step,
  an evaluation batch, a checkpoint) holds it shared, and a capture holds it exclusively, so a
  capture waits until the other runs are between two pieces of work and holds them there until
  it ends.
* **Streams.** ``torch.cuda.Stream()`` hands out streams round-robin from a pool of 32 per
  device: the 33rd is the 1st again, and two runs on one stream would capture each other's
  kernels. :func:`distinct_streams` takes streams while they are new; the engine trains at most
  that many runs at once, each on a stream no other run holds.
"""

from __future__ import annotations

import contextlib
import threading

import torch


class SharedExclusiveLock:
    """Many holders at once in :meth:`shared` mode, or one in :meth:`exclusive` mode. A thread
    may take the shared mode again while it holds it; a waiting exclusive holder goes first, so
    a capture is not put off for ever by the other runs' steady work."""

    def __init__(self):
        self._condition = threading.Condition()
        self._shared = {}  # thread id -> how many times it holds the shared mode
        self._exclusive = None  # the thread that holds the exclusive mode
        self._waiting = 0  # threads waiting for the exclusive mode

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._condition:
            if me not in self._shared and self._exclusive != me:
                self._condition.wait_for(lambda: self._exclusive is None and not self._waiting)
            self._shared[me] = self._shared.get(me, 0) + 1
        try:
            yield
        finally:
            with self._condition:
                self._shared[me] -= 1
                if not self._shared[me]:
                    del self._shared[me]
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        me = threading.get_ident()
        with self._condition:
            if me in self._shared:
                raise RuntimeError("a thread that holds the shared mode cannot take the exclusive mode: two such "
                                   "threads would wait for each other")
            self._waiting += 1
            try:
                self._condition.wait_for(lambda: self._exclusive is None and not self._shared)
            finally:
                self._waiting -= 1
            self._exclusive = me
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = None
                self._condition.notify_all()


#: Held shared by every piece of a run's device work, exclusively by a CUDA-graph capture.
DEVICE_WORK = SharedExclusiveLock()


def distinct_streams(device: torch.device, wanted: int, make=torch.cuda.Stream) -> list:
    """Up to ``wanted`` streams of ``device`` from ``make``, stopping at the first one that is
    a stream already handed out (the pool has gone round)."""
    streams, seen = [], set()
    while len(streams) < wanted:
        stream = make(device)
        if stream.cuda_stream in seen:
            break
        seen.add(stream.cuda_stream)
        streams.append(stream)
    return streams
