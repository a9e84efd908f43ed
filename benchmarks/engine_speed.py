"""Several runs on one device, three ways, measured side by side in one invocation:

1. one after another in one process (:func:`annotated_resnet.training.train.train` per run);
2. as separate processes started together (``annotated-resnet train`` per run), as the GPU
   job did before the engine: without NVIDIA's MPS a GPU runs one process at a time;
3. side by side in one process (:func:`annotated_resnet.training.engine.train_runs`: a thread and a
   CUDA stream per run).

Every run trains the same recipe (the paper's, shrunk to ``--iterations``) on one epoch's worth
of CIFAR-10 images and evaluates once at its end; each time counts everything from the start
(process start-up, data to the device, graph capture, evaluation), as a user waits for it.
Prints images per second per run (its images over the seconds until it ended) and in total,
and the ratios of the totals. With ``--repeats N`` the three ways take turns N times, in a
rotated order, and each way's fastest turn counts (other work on a shared machine slows
whichever way runs at that moment).

    python benchmarks/engine_speed.py --runs plain20,resnet20,resnet32 --iterations 30
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from annotated_resnet.training.checkpoints import CHECKPOINT_NAME
from annotated_resnet.data import load_cifar10
from annotated_resnet.training.engine import Run, train_runs
from annotated_resnet.training.recipe import paper_recipe
from annotated_resnet.training.step import choose_device, choose_precision
from annotated_resnet.training.train import train


def one_after_another(runs, cifar, common) -> dict[str, float]:
    """Seconds each run took, run after run in this process."""
    seconds = {}
    for run in runs:
        started = time.perf_counter()
        train(run.build(), cifar, run.recipe, seed=run.seed, progress=False, **common)
        synchronize(common["device"])
        seconds[run.name] = time.perf_counter() - started
    return seconds


def separate_processes(runs, data, common, folder: Path) -> dict[str, float]:
    """Seconds from the start until each process ended, all started together."""
    threads = max(1, (os.cpu_count() or 1) // len(runs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    processes = {}
    for run in runs:
        command = [sys.executable, "-m", "annotated_resnet.cli", "train", run.recipe.model, "--no-progress",
                   "--out", str(folder / run.name), "--seed", str(run.seed), "--data", data,
                   "--scale-to", str(run.recipe.iterations), "--batch-size", str(run.recipe.batch_size),
                   "--device", str(common["device"]), "--precision", common["precision"],
                   "--train-per-class", str(common["train_per_class"]),
                   "--test-per-class", str(common["test_per_class"])]
        processes[run.name] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seconds = {}
    while len(seconds) < len(processes):
        for name, process in processes.items():
            if name not in seconds and process.poll() is not None:
                if process.returncode:
                    sys.exit(f"{name} failed: {process.stderr.read().decode()}")
                seconds[name] = time.perf_counter() - started
        time.sleep(0.05)
    return seconds


def in_the_engine(runs, cifar, common, folder: Path) -> dict[str, float]:
    """Seconds from the start until each run of the engine wrote its last checkpoint."""
    started, wall_started = time.perf_counter(), time.time()
    statuses = train_runs(runs, cifar, folder, timing_seconds=math.inf, report=lambda line: None, **common)
    if set(statuses.values()) != {"finished"}:
        sys.exit(f"the engine did not finish: {statuses}")
    ended = {run.name: (folder / run.name / CHECKPOINT_NAME).stat().st_mtime - wall_started for run in runs}
    return {name: min(seconds, time.perf_counter() - started) for name, seconds in ended.items()}


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="plain20,resnet20,resnet32",
                        help="comma-separated model names (a name given twice trains with seeds 0, 1, ...)")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="turns of the three ways; the fastest counts")
    parser.add_argument("--data", default=os.environ.get("ANNOTATED_RESNET_CIFAR10"),
                        help="CIFAR-10 source (default: $ANNOTATED_RESNET_CIFAR10)")
    args = parser.parse_args()
    if not args.data:
        parser.error("give --data PATH or set ANNOTATED_RESNET_CIFAR10 (the processes load it themselves)")

    device = choose_device(args.device)
    names = [name.strip() for name in args.runs.split(",")]
    runs = [Run(f"{name}-{names[:i].count(name)}", paper_recipe(name).scaled(iterations=args.iterations,
                                                                            batch_size=args.batch_size),
                seed=names[:i].count(name)) for i, name in enumerate(names)]
    per_class = math.ceil(args.iterations * args.batch_size / 10)  # one epoch holds every iteration
    common = {"device": str(device), "precision": choose_precision(device, args.precision),
              "train_per_class": per_class, "test_per_class": 100}
    cifar = load_cifar10(args.data)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"device: {where}; torch {torch.__version__}; precision {common['precision']}\n"
          f"{len(runs)} runs ({', '.join(names)}), each {args.iterations} iterations of batch {args.batch_size} "
          f"on {per_class * 10:,} images, one test evaluation on 1,000\ndata: {cifar.source}\n", flush=True)

    measure = {"sequential": lambda tmp: one_after_another(runs, cifar, common),
               "processes": lambda tmp: separate_processes(runs, args.data, common, tmp),
               "engine": lambda tmp: in_the_engine(runs, cifar, common, tmp)}
    ways = {"sequential": "one after another in one process", "processes": f"{len(runs)} separate processes",
            "engine": f"{len(runs)} runs in the engine (one process)"}
    images = args.iterations * args.batch_size
    best, total = {}, {}
    for turn in range(args.repeats):
        order = list(measure)[turn % 3:] + list(measure)[:turn % 3]
        for way in order:
            with tempfile.TemporaryDirectory() as tmp:
                ended = measure[way](Path(tmp))
            wall = sum(ended.values()) if way == "sequential" else max(ended.values())
            print(f"turn {turn + 1}, {ways[way]}: {wall:.1f} s", flush=True)
            if way not in best or wall < best[way][0]:
                best[way] = (wall, ended)
    print()
    for way, (wall, ended) in best.items():
        total[way] = images * len(runs) / wall
        each = ", ".join(f"{name} {images / s:,.0f}" for name, s in ended.items())
        print(f"{ways[way]}: {wall:.1f} s; images/s per run: {each}; in total: {total[way]:,.0f}")
    print(f"\nthe engine's total images/s: {total['engine'] / total['sequential']:.2f}x one after another, "
          f"{total['engine'] / total['processes']:.2f}x separate processes")


if __name__ == "__main__":
    main()
