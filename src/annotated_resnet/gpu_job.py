"""One command that trains several CIFAR-10 runs side by side on one GPU within a time budget,
and the loader for the finished runs ("reference runs") that the notebooks plot.

    python -m annotated_resnet.gpu_job --runs plain20,plain56,resnet20,resnet56 \\
        --budget-minutes 8 --out gpu/fig6 --data cifar10-jpeg.tar.gz --iterations 4000

Each run is one ``annotated-resnet train`` process (the GPU interleaves their kernels);
when the budget is spent the job sends each unfinished run SIGTERM, which saves its
checkpoint. Running the same command again resumes every run from its checkpoint.

The reference-run format (one folder per run; what :func:`load_reference_run` reads)::

    <run>/log.jsonl         one JSON object per epoch: epoch, iteration, train_loss,
                            train_error, val_error (null without a split), test_error, lr,
                            seconds (wall-clock since the start of training)
    <run>/weights-fp16.pt   the model's state_dict, floating tensors in fp16
                            (``torch.load(..., weights_only=True)``; build the model with
                            ``cifar_resnet(**provenance["model"])``)
    <run>/provenance.json   where the numbers come from: GPU, torch version, data source,
                            training set (and split), command, git commit, date, recipe
                            (with its scaling), precision, status

The job also leaves ``checkpoint.pt`` (to resume) and ``train.out`` (the process's output) in
each run folder; they are not part of the format.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from .cli import positive_float, positive_int
from .data import load_cifar10
from .checkpoints import CHECKPOINT_NAME, LOG_NAME, atomic_save, load_checkpoint
from .recipe import CIFAR_MODEL_NAMES, Recipe, paper_recipe
from .step import autocast_dtype, choose_device

WEIGHTS_NAME = "weights-fp16.pt"
PROVENANCE_NAME = "provenance.json"
OUTPUT_NAME = "train.out"
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
                "`python -m annotated_resnet.gpu_job --runs ... --out DIR` and pass a run folder.")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m annotated_resnet.gpu_job", description=__doc__.split("\n\n")[0],
        epilog="Rerun the same command to resume unfinished runs from their checkpoints.")
    parser.add_argument("--runs", required=True, type=run_names, help="comma-separated model names, e.g. plain20,resnet20")
    parser.add_argument("--budget-minutes", type=positive_float, required=True, help="wall-clock budget for the whole job")
    parser.add_argument("--out", required=True, type=Path, help="output folder, one subfolder per run")
    parser.add_argument("--data", help="CIFAR-10 source (default: $ANNOTATED_RESNET_CIFAR10, else torchvision's download)")
    parser.add_argument("--iterations", type=positive_int, help="shrink each run's schedule to N iterations (default: the paper's 64k)")
    parser.add_argument("--batch-size", type=positive_int, help="mini-batch size (paper: 128)")
    parser.add_argument("--split", action="store_true",
                        help="hold out 5k training images for validation (the paper's 45k/5k split); "
                             "default: train on all 50k, as the paper's reported models were")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda (default when there is one) or cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--base-width", type=positive_int, help="filters of the first stage (paper: 16)")
    parser.add_argument("--train-per-class", type=positive_int, help="train on a class-balanced subset")
    parser.add_argument("--test-per-class", type=positive_int, help="test on a class-balanced subset")
    return parser


def run_names(text: str) -> list[str]:
    """The comma-separated model names of ``--runs``, each known and given once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CIFAR_MODEL_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown run(s) {unknown or text!r}; valid names: {', '.join(CIFAR_MODEL_NAMES)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given twice; each run needs its own folder")
    return names


def recipe_for(name: str, args):
    """Each run's recipe: the paper's, shrunk to ``--iterations`` and changed by the flags."""
    recipe = paper_recipe(name, split=args.split)
    if args.iterations is not None:
        recipe = recipe.scaled(iterations=args.iterations)
    return recipe.scaled(batch_size=args.batch_size)


def train_command(name: str, folder: Path, args, resume: bool) -> list[str]:
    """The ``annotated-resnet train`` command line of one run (the same recipe as :func:`recipe_for`)."""
    command = [sys.executable, "-m", "annotated_resnet.cli", "train", name, "--out", str(folder),
               "--seed", str(args.seed), "--no-progress"]
    options = {"--data": args.data, "--scale-to": args.iterations, "--batch-size": args.batch_size,
               "--device": args.device, "--base-width": args.base_width,
               "--train-per-class": args.train_per_class, "--test-per-class": args.test_per_class}
    for flag, value in options.items():
        if value is not None:
            command += [flag, str(value)]
    flags = {"--split": args.split, "--compile": args.compile, "--resume": resume}
    return command + [flag for flag, on in flags.items() if on]


def is_finished(folder: Path, recipe) -> bool:
    """Whether ``folder`` holds a checkpoint of ``recipe`` that has run to its end (an error if
    it holds a run of another recipe, which this job cannot continue)."""
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        return False
    checkpoint = load_checkpoint(path)
    if checkpoint["recipe"] != dataclasses.asdict(recipe):
        raise ValueError(f"{str(folder)!r} holds a run of another recipe ({checkpoint['recipe']['iterations']:,} "
                         f"iterations of batch {checkpoint['recipe']['batch_size']}); give the job the options "
                         "it was started with, or another --out")
    return checkpoint["run"]["iteration"] >= recipe.iterations


def run_job(args) -> dict[str, str]:
    """Start every unfinished run, wait for them within the budget, stop the rest with
    SIGTERM (they checkpoint), then write each run's weights and provenance. Returns each
    run's status."""
    started = time.monotonic()
    deadline = started + 60 * args.budget_minutes
    cifar = load_cifar10(args.data)  # decodes once and fills the cache that the runs read
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // len(args.runs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    processes, done_before = {}, set()
    finished = {name: is_finished(args.out / name, recipe_for(name, args)) for name in args.runs}
    for name in args.runs:
        folder = args.out / name
        folder.mkdir(exist_ok=True)
        if finished[name] and (folder / PROVENANCE_NAME).exists():
            print(f"{name}: already finished", flush=True)
            done_before.add(name)
            continue
        resume = (folder / CHECKPOINT_NAME).exists()
        print(f"{name}: {'resuming' if resume else 'starting'}", flush=True)
        with open(folder / OUTPUT_NAME, "a") as output:
            processes[name] = subprocess.Popen(train_command(name, folder, args, resume), stdout=output,
                                               stderr=subprocess.STDOUT, env=env)
    stop = []  # SIGTERM or Ctrl-C to the job ends the wait early; the runs then stop as at the deadline
    previous = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(p.poll() is None for p in processes.values()) and time.monotonic() < deadline and not stop:
            time.sleep(1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # each run saves a checkpoint and exits
        for process in processes.values():
            process.wait()
    return {name: "finished" if name in done_before else
            write_results(args.out / name, name, args, cifar.source, time.monotonic() - started)
            for name in args.runs}


def write_results(folder: Path, name: str, args, source: str, wall_seconds: float) -> str:
    """The run's status; for a finished run, also ``weights-fp16.pt`` and ``provenance.json``
    from its checkpoint (an unfinished run keeps only its checkpoint, to be resumed)."""
    if not (folder / CHECKPOINT_NAME).exists():
        return f"no checkpoint (see {folder / OUTPUT_NAME})"
    checkpoint = load_checkpoint(folder / CHECKPOINT_NAME)
    recipe = Recipe(**checkpoint["recipe"])
    iteration = checkpoint["run"]["iteration"]
    if iteration < recipe.iterations:
        return f"stopped at iteration {iteration:,} of {recipe.iterations:,}; rerun the same command to continue"
    status = "finished"
    weights = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model_state"].items()}
    atomic_save(weights, folder / WEIGHTS_NAME)
    history = checkpoint["run"]["history"]
    provenance = {
        "run": name, "status": status, "iterations_done": iteration,
        "final_test_error": history[-1]["test_error"] if history else None,
        "device": device_name(args.device), "precision": precision(args.device), "torch": torch.__version__,
        "data": {**checkpoint["data"], "source": source},
        "training_set": training_set(checkpoint["data"]),
        "command": shlex.join([sys.executable, "-m", "annotated_resnet.gpu_job", *args.argv]),
        "git_commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {**dataclasses.asdict(recipe), "description": recipe.describe()},
        "model": checkpoint["model"], "seed": checkpoint["seed"],
        "job_wall_seconds": round(wall_seconds, 1),
    }
    tmp = folder / f".{PROVENANCE_NAME}.tmp"
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    os.replace(tmp, folder / PROVENANCE_NAME)
    return status


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


def precision(device: str | None) -> str:
    """What :func:`annotated_resnet.train.train` uses on that device."""
    device = choose_device(device)
    if device.type == "cpu":
        return "fp32"
    dtype = "bf16 autocast" if autocast_dtype(device) == torch.bfloat16 else "fp32 (no bf16 tensor cores)"
    return f"{dtype}, channels_last, CUDA-graphed step"


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # for the provenance
    try:
        statuses = run_job(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, status in statuses.items():
        print(f"{name}: {status}")
    return 0 if all(status == "finished" for status in statuses.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
