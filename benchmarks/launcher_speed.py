"""The launcher's runs side by side against the same runs one after another, in one invocation
on one machine: ``annotated-resnet reproduce`` twice over the same runs, once with its default
number of runs at once (on a CPU one per core, one thread each) and once with ``--jobs 1`` (one
run at a time with every core). Each run's time includes starting Python, reading CIFAR-10 and
one evaluation on the test set. With ``--repeats N`` the two ways take turns and each way's
fastest turn counts.

    python benchmarks/launcher_speed.py --runs plain20,resnet20 --iterations 60 --device cpu
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time


def seconds(runs: str, iterations: int, batch_size: int, device: str, jobs: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "annotated_resnet.cli", "reproduce", "--runs", runs, "--out", out,
                   "--iterations", str(iterations), "--batch-size", str(batch_size), "--device", device, *jobs]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="plain20,resnet20")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    ways = {"side by side (the launcher's default)": [], "one after another (--jobs 1)": ["--jobs", "1"]}
    best = {way: float("inf") for way in ways}
    for _ in range(args.repeats):
        for way, jobs in ways.items():
            best[way] = min(best[way], seconds(args.runs, args.iterations, args.batch_size, args.device, jobs))
    images = len(args.runs.split(",")) * args.iterations * args.batch_size
    for way, wall in best.items():
        print(f"{way}: {wall:.1f} s, {images / wall:.0f} training images/s in all")
    side, after = best.values()
    print(f"side by side / one after another: {after / side:.2f}x")


if __name__ == "__main__":
    main()
