"""A finished run written as a *reference run*: ``annotated-resnet train`` writes these files
into the run folder when the run ends (and :mod:`annotated_resnet.reference_runs` reads them
back), beside the ``checkpoint.pt`` it resumes from::

    <run>/log.jsonl         one JSON object per epoch: epoch, iteration, train_loss,
                            train_error, val_error (null without a split), test_error, lr,
                            seconds (wall-clock since the start of training), and
                            processes in a data-parallel run
    <run>/weights-fp16.pt   the model's state_dict: learned weights in fp16, batch norm's
                            running statistics in fp32 (a running variance can pass
                            fp16's largest number, 65,504)
                            (``torch.load(..., weights_only=True)``; build the model with
                            ``cifar_resnet(**provenance["model"])``)
    <run>/provenance.json   where the numbers come from: the GPU (or the CPU's model, kernels
                            and threads), torch version, data source, training set (and
                            split), command, git commit, date, recipe (with its scaling),
                            precision and layout, training time, status, the number of
                            processes that trained it and their batch norm
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from .checkpoints import CHECKPOINT_NAME, PROVENANCE_NAME, WEIGHTS_NAME, atomic_save, load_checkpoint
from .recipe import Recipe
from .step import choose_device, describe_precision


def write_results(folder: Path, source: str, command: str, device: str | None, cuda_graph: bool = True) -> None:
    """``weights-fp16.pt`` and ``provenance.json`` of the finished run in ``folder``, from its
    checkpoint; ``command`` is the command that trains it (it also resumes it, with ``--resume``)."""
    checkpoint = load_checkpoint(folder / CHECKPOINT_NAME)
    recipe = Recipe(**checkpoint["recipe"])
    atomic_save(shipped_weights(checkpoint["model_state"]), folder / WEIGHTS_NAME)
    history = checkpoint["run"]["history"]
    provenance = {
        "run": folder.name, "status": "finished", "iterations_done": checkpoint["run"]["iteration"],
        "final_test_error": history[-1]["test_error"] if history else None,
        "device": device_name(device), "torch": torch.__version__,
        "precision": describe_precision(choose_device(device), checkpoint, cuda_graph),
        "data": {**checkpoint["data"], "source": source}, "training_set": training_set(checkpoint["data"]),
        "command": command, "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {**dataclasses.asdict(recipe), "description": recipe.describe()},
        "model": checkpoint["model"], "seed": checkpoint["seed"],
        "processes": checkpoint.get("processes", 1), "batch_norm": checkpoint.get("batch_norm", "per process"),
        "threads": torch.get_num_threads() if choose_device(device).type == "cpu" else None,
        "job_wall_seconds": round(checkpoint["run"]["seconds"], 1),  # training time, over all its sittings
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
    train, held_out = data["train_images"], data["validation_images"]
    if held_out:
        return f"{train:,} training images ({held_out:,} held out: the 45k/5k split)"
    return f"{train:,} training images (no split: all 50k, as we read the paper's reported models)"


def device_name(device: str | None) -> str:
    """The GPU's name, or the CPU's model, the kernels PyTorch uses on it and its core count."""
    device = choose_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU {cpu_model()} ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels, "
            f"{os.cpu_count()} cores)")


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (``platform.processor()`` where it does not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "of unknown model"


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
