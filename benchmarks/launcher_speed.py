"""Runs side by side against the same runs one after another, on one machine, in one invocation.

Two measurements, both on the CPU's cores shared out as the launcher shares them:

1. ``--way whole`` (the default): ``annotated-resnet reproduce`` twice over the same runs, once
   with its default number of runs at once (on a CPU one per core, one thread each) and once
   with ``--jobs 1`` (one run at a time with every core). Each run's time includes starting
   Python, reading CIFAR-10 and one evaluation on the test set, so short runs favour running
   side by side, where those costs overlap. With ``--repeats N`` the two ways take turns and
   each way's fastest turn counts.
2. ``--way steady``: only the training step, as in the middle of a long run (Sec. 4.2's SGD,
   batch 128, channels_last, fp32, eight different random batches in turn). Every net in its
   own process: all at once with one thread each, then one after another with every thread.
   From the speeds it prints how long the paper's 64,000 iterations of every net take each way.

    python benchmarks/launcher_speed.py --runs plain20,resnet20 --iterations 60 --device cpu
    python benchmarks/launcher_speed.py --way steady --runs plain56,resnet56 --steps 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

PAPER_IMAGES = 64_000 * 128     # one run of the paper's schedule (Sec. 4.2)


def whole_seconds(runs: str, iterations: int, batch_size: int, device: str, jobs: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "annotated_resnet.cli", "reproduce", "--runs", runs, "--out", out,
                   "--iterations", str(iterations), "--batch-size", str(batch_size), "--device", device, *jobs]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def whole(args) -> None:
    ways = {"side by side (the launcher's default)": [], "one after another (--jobs 1)": ["--jobs", "1"]}
    best = {way: float("inf") for way in ways}
    for _ in range(args.repeats):
        for way, jobs in ways.items():
            best[way] = min(best[way], whole_seconds(args.runs, args.iterations, args.batch_size, args.device, jobs))
    images = len(args.runs.split(",")) * args.iterations * args.batch_size
    for way, wall in best.items():
        print(f"{way}: {wall:.1f} s, {images / wall:.0f} training images/s in all")
    side, after = best.values()
    print(f"side by side / one after another: {after / side:.2f}x")


def step_speed(net: str, threads: int, steps: int, batch_size: int) -> float:
    """Images per second of one process training ``net`` with ``threads`` threads (runs in a child)."""
    import torch
    from torch import nn

    from annotated_resnet.model import create_model
    from annotated_resnet.training.recipe import paper_recipe, sgd

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(net).to(memory_format=torch.channels_last)
    optimizer, loss_fn = sgd(model.parameters(), paper_recipe(net)), nn.CrossEntropyLoss()
    batches = [(torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (batch_size,))) for _ in range(8)]

    def step(i: int) -> None:
        images, labels = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    for i in range(3):      # warm-up: first-call allocations and kernel choices
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch_size / (time.perf_counter() - start)


def lanes(nets: list[str], threads: int, args) -> dict[str, float]:
    """Start one process per net at once, each with ``threads`` threads; their speeds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    children = {net: subprocess.Popen([sys.executable, __file__, "--child", net, str(threads), str(args.steps),
                                       str(args.batch_size)], stdout=subprocess.PIPE, text=True, env=env)
                for net in nets}
    speeds = {net: float(child.communicate()[0]) for net, child in children.items()}
    if any(child.returncode for child in children.values()):
        raise SystemExit("a benchmark process failed; its error is printed above")
    return speeds


def steady(args) -> None:
    nets, cores = args.runs.split(","), os.cpu_count() or 1
    shared = max(1, cores // len(nets))
    side = lanes(nets, shared, args)
    after = {net: lanes([net], cores, args)[net] for net in nets}
    for way, speeds, threads in (("side by side", side, shared), ("one after another", after, cores)):
        each = ", ".join(f"{net} {speed:.0f}" for net, speed in speeds.items())
        print(f"{way}, {threads} thread(s) each: {each} images/s")
    hours_side = max(PAPER_IMAGES / speed for speed in side.values()) / 3600
    hours_after = sum(PAPER_IMAGES / speed for speed in after.values()) / 3600
    print(f"64,000 iterations of each: side by side at most {hours_side:.1f} h (the slowest run), one after another "
          f"{hours_after:.1f} h; side by side / one after another: {hours_after / hours_side:.2f}x")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        net, threads, steps, batch_size = sys.argv[2], *map(int, sys.argv[3:6])
        print(step_speed(net, threads, steps, batch_size))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--way", choices=["whole", "steady"], default="whole")
    parser.add_argument("--runs", default="plain20,resnet20")
    parser.add_argument("--iterations", type=int, default=60, help="whole: each run's length")
    parser.add_argument("--steps", type=int, default=20, help="steady: timed steps per process")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="whole: the device (steady runs on the CPU)")
    parser.add_argument("--repeats", type=int, default=1, help="whole: turns of each way")
    args = parser.parse_args()
    whole(args) if args.way == "whole" else steady(args)


if __name__ == "__main__":
    main()
