"""The engine on the CPU: runs trained side by side in one process reach exactly the weights
they reach alone, stop at a budget and resume to the same weights, and a NaN in one run
leaves the others going. GPU time estimates from a timing."""

import os
import signal
import threading
import time

import pytest
import torch
from fastai.callback.core import Callback

from annotated_resnet.training.checkpoints import load_checkpoint
from annotated_resnet.data import load_cifar10
from annotated_resnet.training.engine import Run, _Timing, estimate_seconds, train_runs
from annotated_resnet.training.recipe import paper_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar(make_image_tree, tmp_path_factory):
    """5 train and 2 test PNGs per class: 5 iterations per epoch at batch 10."""
    return load_cifar10(make_image_tree(5), data_dir=tmp_path_factory.mktemp("cache"))


def tiny(name, seed=0, **changes):
    recipe = paper_recipe(name).scaled(iterations=10, batch_size=10)
    return Run(name if not seed else f"{name}-seed{seed}", recipe.scaled(**changes), seed=seed, base_width=4)


def weights(folder):
    return load_checkpoint(folder)["model_state"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class SigtermAt(Callback):
    """Sends this process a real SIGTERM on this run's iteration ``iteration``, from the run's thread."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_batch(self):
        if self.training and self.learn.run_recorder.run.iteration == self.iteration - 1:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10
            while not self.learn.run_recorder.stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)  # until the main thread has seen the signal, so that this run stops here


def test_a_run_beside_others_reaches_its_weights_alone_and_resumes_exactly(cifar, tmp_path):
    runs = [tiny("resnet20"), tiny("plain20", seed=1)]
    statuses = train_runs(runs[:1], cifar, tmp_path / "alone", device="cpu")
    assert statuses == {"resnet20": "finished"}
    assert set(train_runs(runs, cifar, tmp_path / "together", device="cpu").values()) == {"finished"}
    assert_same_weights(weights(tmp_path / "alone" / "resnet20"), weights(tmp_path / "together" / "resnet20"))
    assert [load_checkpoint(tmp_path / "together" / run.name)["seed"] for run in runs] == [0, 1]  # each its own
    # the same set stopped twice (by the budget, then by SIGTERM) and resumed twice
    parts = tmp_path / "parts"
    stopped = train_runs(runs, cifar, parts, device="cpu", budget_seconds=0)
    assert all(status.startswith("stopped (the time budget at iteration") for status in stopped.values())
    stopped = train_runs(runs, cifar, parts, device="cpu", cbs={"plain20-seed1": [SigtermAt(7)]})
    assert stopped["plain20-seed1"].startswith("stopped (SIGTERM at iteration 7)")
    assert all(status == "finished" or status.startswith("stopped (SIGTERM") for status in stopped.values())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the engine's handler is gone
    assert set(train_runs(runs, cifar, parts, device="cpu").values()) == {"finished"}
    for run in runs:
        assert_same_weights(weights(tmp_path / "together" / run.name), weights(parts / run.name))
    assert train_runs(runs, cifar, parts, device="cpu") == {run.name: "finished" for run in runs}  # nothing left


def test_a_nan_in_one_run_stops_that_run_with_its_message_and_not_the_others(cifar, tmp_path):
    runs = [tiny("resnet20"), tiny("plain20", lr=1e10)]
    statuses = train_runs(runs, cifar, tmp_path, device="cpu")
    assert statuses["resnet20"] == "finished"
    assert statuses["plain20"].startswith("failed: the training loss became nan at iteration")
    assert "smaller learning rate" in statuses["plain20"]
    assert load_checkpoint(tmp_path / "resnet20")["run"]["iteration"] == 10


def test_the_engine_refuses_two_runs_in_one_folder_and_a_folder_of_another_recipe(cifar, tmp_path):
    with pytest.raises(ValueError, match="run names must differ"):
        train_runs([tiny("resnet20"), tiny("resnet20")], cifar, tmp_path, device="cpu")
    train_runs([tiny("resnet20")], cifar, tmp_path, device="cpu", budget_seconds=0)
    with pytest.raises(ValueError, match="holds a run of another recipe"):
        train_runs([tiny("resnet20", iterations=20)], cifar, tmp_path, device="cpu")


def test_the_estimate_is_the_work_left_over_the_work_done_per_second():
    # a ResNet-56 iteration costs three ResNet-20 iterations; together they did 30 + 10 a second
    costs = {"resnet20": 1.0, "resnet56": 3.0}
    seconds = estimate_seconds({"resnet20": 600, "resnet56": 200}, {"resnet20": 30.0, "resnet56": 10.0}, costs)
    assert seconds == pytest.approx((600 * 1 + 200 * 3) / (30 * 1 + 10 * 3))


class FakeRun:
    """What the timing reads from a run's thread."""

    def __init__(self, name, iterations):
        self.name, self.iteration, self.alive = name, 0, True
        self.run_ = Run(name, paper_recipe("resnet20").scaled(iterations=iterations))

    def is_alive(self):
        return self.alive


def test_the_timing_waits_for_every_run_to_settle_then_reports_once(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("annotated_resnet.training.engine.time.monotonic", lambda: clock[0])
    runs = [FakeRun("a", 1_000), FakeRun("b", 1_000)]
    reports = []
    timing = _Timing(runs, {"a": 1.0, "b": 2.0}, seconds=10, report=reports.append)
    runs[0].iteration = 50
    timing.update()
    assert timing.start is None  # b has not settled (graph capture, first steps)
    runs[1].iteration = 10
    timing.update()
    clock[0] = 10.0
    runs[0].iteration, runs[1].iteration = 150, 60  # 10 and 5 iterations a second
    timing.update()
    timing.update()
    assert len(reports) == 1
    expected = (850 * 1 + 940 * 2) / (10 * 1 + 5 * 2) / 60
    assert f"a 10.0, b 5.0; the 1,790 iterations left need about {expected:.1f} minutes" in reports[0]


class RunsAtOnce(Callback):
    """Counts the engine's runs that are inside a training batch at the same moment."""

    lock, inside, most = threading.Lock(), 0, 0

    def before_batch(self):
        if self.training:
            with RunsAtOnce.lock:
                RunsAtOnce.inside += 1
                RunsAtOnce.most = max(RunsAtOnce.most, RunsAtOnce.inside)
            time.sleep(0.01)  # long enough for another run's batch to overlap, if one may

    def after_batch(self):
        if self.training:
            with RunsAtOnce.lock:
                RunsAtOnce.inside -= 1


def test_runs_beyond_the_slots_wait_their_turn_and_reach_the_same_weights(cifar, tmp_path):
    runs = [tiny("resnet20"), tiny("plain20", seed=1), tiny("resnet20", seed=2)]
    cbs = {run.name: [RunsAtOnce()] for run in runs}
    statuses = train_runs(runs, cifar, tmp_path / "two", device="cpu", max_at_once=2, cbs=cbs)
    assert set(statuses.values()) == {"finished"} and RunsAtOnce.most == 2
    RunsAtOnce.most = 0
    train_runs(runs[:1], cifar, tmp_path / "alone", device="cpu", cbs={"resnet20": [RunsAtOnce()]})
    assert RunsAtOnce.most == 1
    assert_same_weights(weights(tmp_path / "alone" / "resnet20"), weights(tmp_path / "two" / "resnet20"))


def test_a_run_waiting_for_a_slot_stops_with_the_others(cifar, tmp_path):
    statuses = train_runs([tiny("resnet20"), tiny("plain20")], cifar, tmp_path, device="cpu", max_at_once=1,
                          budget_seconds=0)
    assert all(status.startswith("stopped") for status in statuses.values())
    assert train_runs([tiny("resnet20"), tiny("plain20")], cifar, tmp_path, device="cpu") == {
        "resnet20": "finished", "plain20": "finished"}


def test_the_engine_refuses_to_compile_several_runs(cifar, tmp_path):
    with pytest.raises(ValueError, match="not thread-safe"):
        train_runs([tiny("resnet20"), tiny("plain20")], cifar, tmp_path, device="cpu", compile=True)
