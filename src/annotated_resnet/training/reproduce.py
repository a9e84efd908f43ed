"""The paper's CIFAR-10 runs (Sec. 4.2, Fig. 6, Table 6) side by side within a time budget:

    annotated-resnet reproduce fig6 table6 --out runs/paper --budget-minutes 60

trains the runs in one process (:mod:`annotated_resnet.training.engine`); runs still going when
the budget ends save a checkpoint, and the same command resumes them. Each finished run is
written in the reference-run format (the names below), which
:mod:`annotated_resnet.reference_runs` reads back (one folder per run)::

    <run>/log.jsonl         one JSON object per epoch: epoch, iteration, train_loss,
                            train_error, val_error (null without a split), test_error, lr,
                            seconds (wall-clock since the start of training), and
                            processes in a data-parallel run
    <run>/weights-fp16.pt   the model's state_dict: learned weights in fp16, batch norm's
                            running statistics in fp32 (a running variance can pass
                            fp16's largest number, 65,504)
                            (``torch.load(..., weights_only=True)``; build the model with
                            ``cifar_resnet(**provenance["model"])``)
    <run>/provenance.json   where the numbers come from: GPU, torch version, data source,
                            training set (and split), command, git commit, date, recipe
                            (with its scaling), precision, status, the number of processes
                            that trained it and their batch norm (per process or synchronised)

The job also leaves ``checkpoint.pt`` (to resume) in each run folder; it is not part of the format.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from ..data import load_cifar10
from .checkpoints import CHECKPOINT_NAME, LOG_NAME, atomic_save, load_checkpoint
from .engine import Run, train_runs
from .recipe import Recipe
from .step import choose_device, describe_precision

WEIGHTS_NAME = "weights-fp16.pt"
PROVENANCE_NAME = "provenance.json"


def run_job(runs: list[Run], out: Path, data: str | None, budget_minutes: float | None, command: str,
            timing_seconds: float = 20.0, **options) -> dict[str, str]:
    """Train ``runs`` side by side in ``out`` within the budget (resuming what a checkpoint
    there holds), then write the weights and provenance of every finished run. ``options``
    go to :func:`~annotated_resnet.training.train.train`. Returns each run's status."""
    started = time.monotonic()
    cifar = load_cifar10(data)
    print(f"{len(runs)} runs side by side in {out} ({cifar.source}); budget: "
          f"{f'{budget_minutes:g} minutes' if budget_minutes else 'none'}", flush=True)
    budget = 60 * budget_minutes if budget_minutes else None
    statuses = train_runs(runs, cifar, out, budget_seconds=budget, timing_seconds=timing_seconds,
                          report=lambda line: print(line, flush=True), **options)
    for run in runs:
        folder = out / run.name
        provenance = folder / PROVENANCE_NAME
        trained_now = not provenance.exists() or provenance.stat().st_mtime < (folder / CHECKPOINT_NAME).stat().st_mtime
        if statuses[run.name] == "finished" and trained_now:
            write_results(out / run.name, run.name, cifar.source, command, options.get("device"),
                          time.monotonic() - started, cuda_graph=options.get("cuda_graph", True))
    return statuses


def write_results(folder: Path, name: str, source: str, command: str, device: str | None,
                  wall_seconds: float, cuda_graph: bool = True) -> None:
    """``weights-fp16.pt`` and ``provenance.json`` of a finished run, from its checkpoint."""
    checkpoint = load_checkpoint(folder / CHECKPOINT_NAME)
    recipe = Recipe(**checkpoint["recipe"])
    atomic_save(shipped_weights(checkpoint["model_state"]), folder / WEIGHTS_NAME)
    history = checkpoint["run"]["history"]
    provenance = {
        "run": name, "status": "finished", "iterations_done": checkpoint["run"]["iteration"],
        "final_test_error": history[-1]["test_error"] if history else None,
        "device": device_name(device), "torch": torch.__version__,
        "precision": describe_precision(choose_device(device), checkpoint.get("precision", "fp32"), cuda_graph),
        "data": {**checkpoint["data"], "source": source}, "training_set": training_set(checkpoint["data"]),
        "command": command, "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {**dataclasses.asdict(recipe), "description": recipe.describe()},
        "model": checkpoint["model"], "seed": checkpoint["seed"],
        "processes": checkpoint.get("processes", 1), "batch_norm": checkpoint.get("batch_norm", "per process"),
        "job_wall_seconds": round(wall_seconds, 1),
    }
    tmp = folder / f".{PROVENANCE_NAME}.tmp"
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    os.replace(tmp, folder / PROVENANCE_NAME)


def shipped_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trained state_dict as the reference-run format stores it: learned weights rounded to
    fp16 (half the size), batch norm's running means and variances kept in fp32 (a plain
    net's variances can pass fp16's largest number, 65,504, and would become infinity)."""
    def stored(key: str, value: torch.Tensor) -> torch.Tensor:
        if not value.is_floating_point():
            return value
        return value.float() if key.endswith(("running_mean", "running_var")) else value.half()
    return {key: stored(key, value) for key, value in state_dict.items()}


def training_set(data: dict) -> str:
    """Which images a run trained on, in words (the provenance's ``training_set``)."""
    held_out = data["validation_images"]
    split = f"{held_out:,} held out for validation" if held_out else "no validation split"
    return f"{data['train_images']:,} training images, {split}"


def device_name(device: str | None) -> str:
    """The GPU's name, or the CPU's architecture and core count."""
    device = choose_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str | None:
    """The commit of the code that ran (with ``-dirty`` if it had changes), if git knows it."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
