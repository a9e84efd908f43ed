"""The rules by which the engine's runs share a GPU, checked with threads on the CPU: a capture
waits for the other runs' device work and holds it off; streams are taken while distinct."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from annotated_resnet.training.device_work import SharedExclusiveLock, distinct_streams


def in_thread(work):
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_the_exclusive_mode_waits_for_every_shared_holder_and_holds_new_ones_off():
    lock, events = SharedExclusiveLock(), []
    release_shared = threading.Event()

    def shared_work(name):
        with lock.shared():
            events.append(f"{name} in")
            release_shared.wait(5)
        events.append(f"{name} out")

    def capture():
        with lock.exclusive():
            events.append("capture in")
            time.sleep(0.05)
            events.append("capture out")

    first = in_thread(lambda: shared_work("step"))
    while "step in" not in events:
        time.sleep(0.001)
    capturing = in_thread(capture)
    time.sleep(0.05)
    assert "capture in" not in events  # a run is still inside a step
    late = in_thread(lambda: events.append("late asks") or shared_work("late"))
    time.sleep(0.05)
    assert "late in" not in events  # the waiting capture goes first
    release_shared.set()
    for thread in (first, capturing, late):
        thread.join(5)
    assert events.index("step out") < events.index("capture in") < events.index("capture out") < events.index("late in")


def test_the_shared_mode_may_be_taken_again_by_its_holder_but_not_turned_exclusive():
    lock, asked = SharedExclusiveLock(), threading.Event()

    def capture():
        asked.set()
        with lock.exclusive():
            pass

    with lock.shared():
        thread = in_thread(capture)
        asked.wait(5)
        time.sleep(0.02)
        with lock.shared():  # a batch inside a validation pass: no deadlock behind the waiting capture
            pass
        with pytest.raises(RuntimeError, match="cannot take the exclusive mode"):
            with lock.exclusive():
                pass
    thread.join(5)
    assert not thread.is_alive()


def test_streams_are_taken_until_the_pool_goes_round():
    pool = [SimpleNamespace(cuda_stream=n) for n in range(4)]
    drawn = iter(pool * 3)
    streams = distinct_streams(torch.device("cuda"), 10, make=lambda device: next(drawn))
    assert [s.cuda_stream for s in streams] == [0, 1, 2, 3]
    assert len(distinct_streams(torch.device("cuda"), 2, make=lambda device: next(drawn))) == 2
