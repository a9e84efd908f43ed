"""Several training runs at once in one process, so that their kernels overlap on one GPU.

A CIFAR-10 net of Sec. 4.2 leaves most of a large GPU idle: ResNet-20's step at batch 128 is a
few hundred small kernels. Separate processes do not fill it either, because without NVIDIA's
MPS the GPU runs one process at a time, in time slices. Kernels of one process queued on
different CUDA streams do run side by side. So the engine gives each run a thread of its own
and each thread a stream of its own, on which the run's CUDA-graphed step is replayed
(:class:`~annotated_resnet.training.step.TrainingStep`; a replay releases Python's GIL, so the other
threads go on queueing their own steps meanwhile). A run's stream is its own: the engine trains
at most as many runs at once as it could get distinct streams (32 on one GPU), the others
waiting for a stream to come free, and no run captures its graph while another works on the
device (:mod:`annotated_resnet.training.device_work`). ``torch.compile`` compiles in the thread
that first calls the model and is not thread-safe, so the engine refuses it for several runs.

Each run is an ordinary :func:`~annotated_resnet.training.train.train` on fastai's ``Learner``: its own
seed, data order, augmentation, schedule, log, atomic checkpoints and exact resume. The runs
share the device, the decoded images and one :class:`~annotated_resnet.training.stopping.StopRequest`,
nothing else, so a run reaches the weights it reaches alone. Every model is built and seeded
before the threads start, and training draws no numbers from torch's global generator.
A NaN in one run stops that run with its message; the others go on. When the budget is spent
(or at SIGTERM / Ctrl-C) every run saves a checkpoint at its current batch; the same call
resumes them all.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..architecture import count_multiply_adds
from ..data import CIFAR10
from ..model import create_model
from .checkpoints import CHECKPOINT_NAME, load_checkpoint
from .device_work import distinct_streams
from .recipe import Recipe
from .step import choose_device
from .stopping import StopRequest, stop_on_signals
from .train import NonFiniteLossError, train

from fastai.callback.core import Callback  # noqa: E402 - after .train, which quiets fastai's import


@dataclass(frozen=True)
class Run:
    """One run of the engine: a folder name, the model, its recipe and its seed."""

    name: str
    recipe: Recipe
    seed: int = 0
    base_width: int | None = None

    def build(self) -> torch.nn.Module:
        """The run's model, initialised from its own seed."""
        torch.manual_seed(self.seed)
        return create_model(self.recipe.model, **({"base_width": self.base_width} if self.base_width else {}))


def iterations_done(folder: Path, recipe: Recipe) -> int:
    """Iterations the checkpoint in ``folder`` holds (0 without one); an error if it holds a
    run of another recipe, which cannot be continued with this one."""
    if not (folder / CHECKPOINT_NAME).exists():
        return 0
    checkpoint = load_checkpoint(folder)
    if Recipe(**checkpoint["recipe"]) != recipe:
        raise ValueError(f"{str(folder)!r} holds a run of another recipe ({checkpoint['recipe']['iterations']:,} "
                         f"iterations of batch {checkpoint['recipe']['batch_size']}); give the options it was "
                         "started with, or another output folder")
    return checkpoint["run"]["iteration"]


class _Counter(Callback):
    """Copies the run's iteration to its thread after every batch (for the timing)."""

    order = 60  # after the run's recorder has counted the batch

    def __init__(self, thread: RunThread):
        self.thread = thread

    def after_batch(self):
        if self.training:
            self.thread.iteration = self.learn.run_recorder.run.iteration


class RunThread(threading.Thread):
    """Trains one run with :func:`~annotated_resnet.training.train.train` on its own CUDA stream;
    :attr:`status` says how it ended."""

    def __init__(self, run: Run, model, cifar: CIFAR10, folder: Path, stop: StopRequest, options: dict, cbs: list,
                 slots: queue.Queue):
        super().__init__(name=run.name, daemon=True)
        self.run_, self.model, self.cifar, self.folder, self.stop = run, model, cifar, folder, stop
        self.slots = slots  # a stream of its own on a GPU (None on the CPU), taken while training
        self.options, self.cbs = options, [_Counter(self), *cbs]
        self.iteration = iterations_done(folder, run.recipe)
        self.status = "not started"

    def run(self):
        stream = self._take_slot()
        if stream is False:
            self.status = f"stopped ({self.stop.reason}) before it started; run the same command again to start it"
            return
        try:
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                result = train(self.model, self.cifar, self.run_.recipe, seed=self.run_.seed, progress=False,
                               out=self.folder, resume=(self.folder / CHECKPOINT_NAME).exists(), stop=self.stop,
                               cbs=self.cbs, **self.options)
            self.status = "finished" if result.stopped is None else (
                f"stopped ({result.stopped}); run the same command again to continue")
        except NonFiniteLossError as error:
            self.status = f"failed: {error}"
        except Exception as error:  # one run's failure (out of memory, a bad file) ends that run only
            self.status = f"failed: {type(error).__name__}: {error}"
        finally:
            self.slots.put(stream)

    def _take_slot(self):
        """A free slot (its stream, or None on the CPU), waiting while all are taken; False if
        the runs are stopped meanwhile."""
        while not self.stop.requested:
            try:
                return self.slots.get(timeout=0.2)
            except queue.Empty:
                continue
        return False


def run_slots(device: torch.device, runs: int, max_at_once: int | None = None) -> queue.Queue:
    """The slots runs train in: on a GPU one distinct stream each (:func:`distinct_streams`), on
    the CPU as many as ``max_at_once`` (every run by default)."""
    wanted = min(runs, max_at_once or runs)
    slots = queue.Queue()
    for stream in distinct_streams(device, wanted) if device.type == "cuda" else [None] * wanted:
        slots.put(stream)
    return slots


def estimate_seconds(left: dict[str, int], rates: dict[str, float], costs: dict[str, float]) -> float:
    """Seconds the runs need for the iterations ``left``, from the iterations per second each
    reached while all ran together (``rates``) and each one's cost per iteration (``costs``,
    e.g. multiply-adds): work left over work done per second, which assumes the device stays
    as busy when fewer runs are left."""
    throughput = sum(rates[name] * costs[name] for name in rates)
    return sum(left[name] * costs[name] for name in left) / throughput


def train_runs(runs: list[Run], cifar: CIFAR10, out: str | Path, *, budget_seconds: float | None = None,
               timing_seconds: float = 20.0, report=print, cbs: dict | None = None, max_at_once: int | None = None,
               **options) -> dict[str, str]:
    """Train ``runs`` side by side, each in ``out/<run.name>``, resuming any that has a
    checkpoint there, until all are done or ``budget_seconds`` have passed. ``options`` go to
    :func:`~annotated_resnet.training.train.train` (device, precision, compile, train_per_class, ...);
    ``cbs`` maps a run's name to extra fastai callbacks; ``max_at_once`` caps how many runs train
    at the same time (on a GPU, also the number of distinct streams it hands out). After ``timing_seconds`` with every
    run past its first steps, ``report`` gets an estimate of the time the whole set needs.
    Returns each run's status: finished, stopped (to be resumed) or failed with its message."""
    started = time.monotonic()
    out, stop = Path(out), StopRequest()
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise ValueError(f"run names must differ, each run has its own folder; got {', '.join(names)}")
    if options.get("compile") and len(runs) > 1:
        raise ValueError("torch.compile is not thread-safe, so several runs side by side cannot be compiled; "
                         "drop --compile, or train one run at a time with `annotated-resnet train --compile`")
    models = {run.name: run.build() for run in runs}  # in this thread, one seed after another
    costs = {run.name: count_multiply_adds(models[run.name], 32) * run.recipe.batch_size for run in runs}
    slots = run_slots(choose_device(options.get("device")), len(runs), max_at_once)
    threads = [RunThread(run, models[run.name], cifar, out / run.name, stop, options, (cbs or {}).get(run.name, []),
                         slots) for run in runs]
    for thread in threads:
        if thread.iteration >= thread.run_.recipe.iterations:
            thread.status = "finished"
            report(f"{thread.name}: already finished")
            continue
        report(f"{thread.name}: resuming at iteration {thread.iteration:,}" if thread.iteration else
               f"{thread.name}: starting")
        thread.start()
    timing = _Timing([t for t in threads if t.is_alive()], costs, timing_seconds, report)
    with stop_on_signals(stop):
        while any(t.is_alive() for t in threads):
            if budget_seconds is not None and time.monotonic() - started > budget_seconds:
                stop.request("the time budget")
            time.sleep(0.2)
            timing.update()
    return {thread.name: thread.status for thread in threads}


class _Timing:
    """Measures the iterations per second of every run while all run together, once, and
    reports the time the set needs from there (:func:`estimate_seconds`)."""

    SETTLE_ITERATIONS = 10  # past the eager steps and the graph capture

    def __init__(self, threads: list[RunThread], costs: dict, seconds: float, report):
        self.threads, self.costs, self.seconds, self.report = threads, costs, seconds, report
        self.first = {t.name: t.iteration for t in threads}
        self.start = None  # (time, iterations) once every run has settled
        self.done = not threads

    def update(self):
        running = [t for t in self.threads if t.is_alive()]
        if self.done or len(running) < len(self.threads):  # a run ended: the timing would mislead
            self.done = True
            return
        now = time.monotonic()
        if self.start is None:
            if all(t.iteration >= self.first[t.name] + self.SETTLE_ITERATIONS for t in running):
                self.start = (now, {t.name: t.iteration for t in running})
            return
        began, iterations = self.start
        if now - began < self.seconds:
            return
        self.done = True
        rates = {t.name: (t.iteration - iterations[t.name]) / (now - began) for t in running}
        left = {t.name: t.run_.recipe.iterations - t.iteration for t in running}
        total = estimate_seconds(left, rates, self.costs)
        each = ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
        self.report(f"timing: {now - began:.0f} s with {len(running)} runs side by side, iterations per second: "
                    f"{each}; the {sum(left.values()):,} iterations left need about {total / 60:.1f} minutes")
