"""Several training runs side by side, each its own ``annotated-resnet train`` process.

A run is the command one would type for it alone, in a folder of its own under ``out``; the
launcher starts at most ``jobs`` of them at once, the next as one ends. On a CPU each process
gets its share of the cores (on a 2-core CPU two runs of one thread each trained 1.02-1.17x
faster than one run of two threads after another). Everything a run needs to stop and resume
cleanly is the trainer's own: at the time budget, or when the launcher gets SIGTERM or Ctrl-C,
it sends every run SIGTERM, each saves a checkpoint at its current batch and exits, and the
same launch resumes every unfinished run (``--resume`` is added where a checkpoint exists). A
run that fails leaves its message in its ``train.log`` and the others go on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..architecture import count_multiply_adds
from ..model import create_model
from .checkpoints import CHECKPOINT_NAME, LOG_NAME, PROVENANCE_NAME
from .stopping import StopRequest, stop_on_signals

TRAIN_LOG = "train.log"  # each run's own output, in its folder


@dataclass(frozen=True)
class Run:
    """One run of a launch: its folder's name, the model and the seed."""

    name: str
    model: str
    seed: int = 0

    def command(self, out: Path, options: list[str]) -> list[str]:
        """The ``annotated-resnet train`` command of this run (resuming where a checkpoint is)."""
        folder = out / self.name
        resume = ["--resume"] if (folder / CHECKPOINT_NAME).exists() else []
        return [sys.executable, "-m", "annotated_resnet.cli", "train", self.model, "--out", str(folder),
                "--seed", str(self.seed), "--no-progress", *options, *resume]

    def finished(self, out: Path) -> bool:
        """Whether the run's folder holds a finished run (the trainer writes its provenance last)."""
        provenance = out / self.name / PROVENANCE_NAME
        return provenance.exists() and json.loads(provenance.read_text()).get("status") == "finished"


def default_jobs(runs: int, device: str | None) -> tuple[int, int | None]:
    """How many runs train at once, and each one's threads: on a CPU one run per core (at most
    as many as there are runs), the cores shared out among them; on a GPU one run at a time,
    since processes on one GPU take turns (``--jobs`` overrides)."""
    if device is not None and device.startswith("cuda") or device is None and _has_cuda():
        return 1, None
    cores = os.cpu_count() or 1
    jobs = max(1, min(runs, cores))
    return jobs, max(1, cores // jobs)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def estimate_seconds(left: dict[str, int], rates: dict[str, float], costs: dict[str, float]) -> float:
    """Seconds the runs need for the iterations ``left``, from the iterations per second of the
    runs measured while they ran side by side (``rates``) and each one's cost per iteration
    (``costs``, e.g. multiply-adds): work left over work done per second, which assumes the
    machine stays as busy to the end."""
    throughput = sum(rates[name] * costs[name] for name in rates)
    return sum(left[name] * costs[name] for name in left) / throughput


def launch(runs: list[Run], out: str | os.PathLike, options: list[str], *, jobs: int, threads: int | None = None,
           iterations: int = 64_000, budget_seconds: float | None = None, report=print) -> dict[str, str]:
    """Train ``runs`` (each ``annotated-resnet train`` with ``options``), ``jobs`` at a time with
    ``threads`` threads each, until all have ended or ``budget_seconds`` have passed; each run's
    output goes to ``out/<run>/train.log`` and its epoch lines to ``report``. Returns each run's
    status: finished, stopped (run the launch again to continue) or failed (with its last line)."""
    out = Path(out)
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise ValueError(f"run names must differ, each run has its own folder; got {', '.join(names)}")
    statuses = {run.name: "finished" for run in runs if run.finished(out)}
    for name in statuses:
        report(f"{name}: already finished")
    pending = [run for run in runs if run.name not in statuses]
    running: dict[str, _Process] = {}
    timing = _Timing(out, {run.name: run for run in runs}, iterations, report)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started, stop = time.monotonic(), StopRequest()
    with stop_on_signals(stop):
        while running or pending and not stop.requested:
            while pending and len(running) < jobs and not stop.requested:
                run = pending.pop(0)
                running[run.name] = _Process(run, out, options, env, report)
            time.sleep(0.5)
            if budget_seconds is not None and time.monotonic() - started > budget_seconds:
                stop.request("the time budget")
            for name, process in list(running.items()):
                if stop.requested:
                    process.terminate()
                ended = process.returncode() is not None
                process.relay()  # after the check: an ended run's last lines are all written
                if ended:
                    statuses[name] = process.status()
                    del running[name]
            timing.update(running, pending)
    for run in pending:
        statuses[run.name] = f"not started ({stop.reason}); run the same command again to start it"
    return {name: statuses[name] for name in names}


class _Process:
    """One run's ``annotated-resnet train`` process, its log, and the lines it has relayed."""

    def __init__(self, run: Run, out: Path, options: list[str], env: dict, report):
        self.run, self.report = run, report
        self.log_path = out / run.name / TRAIN_LOG
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        resuming = (out / run.name / CHECKPOINT_NAME).exists()
        report(f"{run.name}: {'resuming' if resuming else 'starting'} (output in {self.log_path})")
        with open(self.log_path, "a") as log:
            self.relayed = log.tell()
            # its own session: a Ctrl-C in the terminal reaches the launcher, which passes it on once
            self.popen = subprocess.Popen(run.command(out, options), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        self.terminated = False

    def terminate(self) -> None:
        if not self.terminated and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        self.terminated = True

    def returncode(self) -> int | None:
        return self.popen.poll()

    def relay(self) -> None:
        """Report the lines the run has written since the last call, each with the run's name."""
        with open(self.log_path) as log:
            log.seek(self.relayed)
            text = log.read()
        complete = text[:text.rfind("\n") + 1]
        self.relayed += len(complete.encode())
        for line in complete.splitlines():
            self.report(f"{self.run.name}: {line}")

    def status(self) -> str:
        code = self.popen.returncode
        if code == 0:
            return "finished"
        if code in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT):
            return "stopped; run the same command again to continue"
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        return f"failed (exit status {code}): {lines[-1] if lines else 'no output'} (see {self.log_path})"


class _Timing:
    """Once every running run has logged two epochs since the launch, reports how long the set
    still needs (:func:`estimate_seconds`), from the speed of the last epoch in the runs' own
    logs: an epoch trained entirely within this launch (a resumed run's first epoch may span the
    time the machine was stopped)."""

    def __init__(self, out: Path, runs: dict[str, Run], iterations: int, report):
        self.out, self.runs, self.iterations, self.report = out, runs, iterations, report
        self.seen: dict[str, int] = {}  # each run's logged epochs when the launch first saw it
        self.done = False
        self.costs = {}

    def update(self, running: dict, pending: list[Run]) -> None:
        if self.done or not running:
            return
        logs = {name: self._history(name) for name in running}
        for name, history in logs.items():
            self.seen.setdefault(name, len(history))
        if any(len(history) < self.seen[name] + 2 for name, history in logs.items()):
            return
        self.done = True
        rates = {name: (history[-1]["iteration"] - history[-2]["iteration"]) /
                 (history[-1]["seconds"] - history[-2]["seconds"]) for name, history in logs.items()}
        left = {name: self.iterations - history[-1]["iteration"] for name, history in logs.items()}
        left.update({run.name: self.iterations for run in pending})
        costs = {name: count_multiply_adds(create_model(self.runs[name].model), 32) for name in left}
        seconds = estimate_seconds(left, rates, costs)
        finish = time.strftime("%a %H:%M", time.localtime(time.time() + seconds))
        each = ", ".join(f"{name} {rate:.2f}" for name, rate in rates.items())
        needed = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
        self.report(f"timing: iterations per second {each}; the {sum(left.values()):,} iterations left need about "
                    f"{needed} at this speed (until about {finish})")

    def _history(self, name: str) -> list[dict]:
        path = self.out / name / LOG_NAME
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
