"""The paper's CIFAR-10 runs on one GPU within a time budget, and the loader for the finished
runs ("reference runs") that the notebooks plot.

    annotated-resnet reproduce fig6 table6 --out runs/paper --budget-minutes 9

(or ``python -m annotated_resnet.gpu_job`` with the same options) trains the runs side by
side in one process (:mod:`annotated_resnet.engine`); runs still going when the budget ends
save a checkpoint, and the same command resumes them. Each finished run becomes a reference run.

The reference-run format (one folder per run; what :func:`load_reference_run` reads)::

    <run>/log.jsonl         one JSON object per epoch: epoch, iteration, train_loss,
                            train_error, val_error (null without a split), test_error, lr,
                            seconds (wall-clock since the start of training), and
                            processes in a data-parallel run
    <run>/weights-fp16.pt   the model's state_dict, floating tensors in fp16
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
import sys
import time
from pathlib import Path

import torch

from .checkpoints import CHECKPOINT_NAME, LOG_NAME, atomic_save, load_checkpoint
from .data import load_cifar10
from .engine import Run, train_runs
from .recipe import Recipe
from .step import choose_device, describe_precision

WEIGHTS_NAME = "weights-fp16.pt"
PROVENANCE_NAME = "provenance.json"
REFERENCE_RUNS = Path(__file__).resolve().parent / "reference_runs"


# --- Reading reference runs ---


def list_reference_runs(folder: str | os.PathLike | None = None) -> list[str]:
    """Names of the complete runs in ``folder`` (the package's shipped runs by default);
    an empty list when the folder is absent or holds none."""
    folder = Path(folder) if folder is not None else REFERENCE_RUNS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if all((p / n).is_file() for n in (LOG_NAME, WEIGHTS_NAME, PROVENANCE_NAME)))


def load_reference_run(path: str | os.PathLike) -> tuple[list[dict], dict, dict]:
    """``(history, provenance, state_dict)`` of a finished run: ``path`` is a run folder, or
    the name of a run shipped in ``annotated_resnet/reference_runs/``."""
    folder = Path(path)
    if not folder.is_dir() and not folder.is_absolute() and len(folder.parts) == 1:
        shipped = list_reference_runs()
        if not shipped:
            raise FileNotFoundError(
                f"no reference run {str(path)!r}: this copy of annotated_resnet ships no reference runs "
                f"({REFERENCE_RUNS} is absent or empty). Make them on a GPU with "
                "`annotated-resnet reproduce --runs ... --out DIR` and pass a run folder.")
        if folder.name not in shipped:
            raise FileNotFoundError(f"no reference run {str(path)!r}; shipped runs: {', '.join(shipped)}")
        folder = REFERENCE_RUNS / folder.name
    missing = [n for n in (LOG_NAME, WEIGHTS_NAME, PROVENANCE_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a finished run: {', '.join(missing)} missing "
                                f"(expected {LOG_NAME}, {WEIGHTS_NAME}, {PROVENANCE_NAME})")
    history = [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines() if line.strip()]
    provenance = json.loads((folder / PROVENANCE_NAME).read_text())
    if provenance.get("status") != "finished":
        raise ValueError(f"{str(folder)!r} is not a finished run (status: {provenance.get('status')!r}); "
                         "rerun its gpu_job command to finish it")
    state_dict = torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    return history, provenance, state_dict


def longest_reference_run(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The folder of the shipped run of model ``name`` (e.g. ``"plain56"``) trained for the
    most iterations, searched anywhere under ``folder`` (the package's reference runs by
    default), so a longer run shipped later is picked up without changing the caller."""
    root = Path(folder) if folder is not None else REFERENCE_RUNS
    candidates = []
    for provenance_path in sorted(root.rglob(PROVENANCE_NAME)):
        run = provenance_path.parent
        if all((run / n).is_file() for n in (LOG_NAME, WEIGHTS_NAME)):
            provenance = json.loads(provenance_path.read_text())
            if provenance.get("run") == name and provenance.get("status") == "finished":
                candidates.append((provenance["iterations_done"], str(run)))
    if not candidates:
        raise FileNotFoundError(f"no finished reference run of {name!r} under {str(root)!r}; "
                                f"shipped runs: {', '.join(list_reference_runs(root)) or 'none'}")
    return Path(max(candidates)[1])


# --- Running the job ---


def run_job(runs: list[Run], out: Path, data: str | None, budget_minutes: float | None, command: str,
            timing_seconds: float = 20.0, **options) -> dict[str, str]:
    """Train ``runs`` side by side in ``out`` within the budget (resuming what a checkpoint
    there holds), then write the weights and provenance of every finished run. ``options``
    go to :func:`~annotated_resnet.train.train`. Returns each run's status."""
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
    weights = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model_state"].items()}
    atomic_save(weights, folder / WEIGHTS_NAME)
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


if __name__ == "__main__":  # the same as `annotated-resnet reproduce`
    from .cli import main

    sys.exit(main(["reproduce", *sys.argv[1:]]))
