"""``annotated-resnet``: train a CIFAR-10 network of Sec. 4.2, evaluate checkpoints, and
reproduce the paper's sets of runs (Fig. 1, Fig. 6, Table 6), one process per run."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path

import torch

from .data import load_cifar10
from .model import create_model
from .training.batches import check_batch_size
from .training.distributed import ProcessGroup, launched_by_torchrun
from .training.checkpoints import checkpoint_to_resume, load_checkpoint, model_from_checkpoint
from .training.evaluation import evaluate
from .training.recipe import CIFAR_MODEL_NAMES, Recipe, paper_recipe
from .training.launcher import Run, default_jobs, launch
from .training.results import write_results
from .training.step import PRECISIONS, choose_device, fastest_cpu_precision, slow_precision_warning
from .training.train import NonFiniteLossError, OneProcess, run_settings, train

from fastai.callback.core import Callback  # noqa: E402 - after .train, which quiets fastai's import

EXAMPLES = """\
examples:
  annotated-resnet train resnet56                       # the paper's full recipe (64k iterations)
  annotated-resnet train resnet110 --out runs/r110      # with Sec. 4.2's warm-up at lr 0.01
  annotated-resnet train plain20 --scale-to 2000 --batch-size 64 --split
                                                        # the whole schedule shrunk to 2,000 iterations
  annotated-resnet train resnet20 --iterations 500      # the paper's schedule, stopped after 500
  annotated-resnet train resnet56 --out runs/resnet56 --resume
                                                        # continue a stopped run where it stopped
  torchrun --nproc-per-node 2 -m annotated_resnet.cli train resnet110
                                                        # as the paper: batch 128 on two GPUs (64 each)
  annotated-resnet evaluate runs/resnet56/checkpoint.pt # test error of a checkpoint
  annotated-resnet reproduce fig1 --runs resnet20,resnet56 --device cpu --out runs/cpu
                                                        # Fig. 1's plain-20/56 and two ResNets on a CPU, one
                                                        # process per core; the same command resumes them
  annotated-resnet reproduce fig6 --out runs/paper --budget-minutes 60
                                                        # Fig. 6's nine runs on a GPU, one after another, within
                                                        # an hour; the same command resumes what the budget left
  annotated-resnet reproduce --runs resnet110@1,resnet110@2 --out runs/paper
                                                        # more seeds of one net (folders resnet110-seed1, ...)

data: --data PATH, else $ANNOTATED_RESNET_CIFAR10, else torchvision's download into ./data.
PATH is an image-folder tree (train/<class>/*.jpg, test/<class>/*.jpg), a .tar.gz of one,
or a folder holding torchvision's cifar-10-batches-py.
"""


class EpochPrinter(Callback):
    """One line per epoch from the run's log, in place of the progress bar."""

    order = 80  # after the run's recorder has written the epoch's record

    def after_epoch(self):
        record = self.learn.run_recorder.run.history[-1]
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
              flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="annotated-resnet", description="Train and evaluate the CIFAR-10 networks of He et al. (2015), Sec. 4.2.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,reproduce}")

    train = commands.add_parser("train", help="train a network with the paper's recipe", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("model", choices=CIFAR_MODEL_NAMES, metavar="MODEL",
                       help=f"one of: {', '.join(CIFAR_MODEL_NAMES)}")
    train.add_argument("--data", metavar="PATH", help="CIFAR-10 source (see below)")
    train.add_argument("--out", metavar="DIR", help="run folder for log.jsonl and checkpoint.pt (default runs/MODEL)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--iterations", type=positive_int, metavar="N",
                        help="stop the paper's schedule after N iterations (milestones stay at 32k and 48k)")
    length.add_argument("--scale-to", type=positive_int, metavar="N",
                        help="shrink the whole schedule to N iterations (milestones at N/2 and 3N/4)")
    train.add_argument("--batch-size", type=positive_int, metavar="B", help="mini-batch size (paper: 128)")
    train.add_argument("--lr", type=positive_float, metavar="LR", help="initial learning rate (paper: 0.1)")
    train.add_argument("--split", action="store_true",
                       help="hold out 5k of the 50k training images for validation (the paper's 45k/5k split, "
                            "on which it fixed at least the schedule's 64k end); default: train on all 50k, our reading of the "
                            "paper's \"trained on the training set\"")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--seed", type=int, default=0, help="initialisation, order and augmentation seed (default 0)")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the model (pays off on a GPU; default: no, or as the resumed run did)")
    train.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto (default): bf16 on GPUs with bf16 tensor cores (A100, L4, H100, RTX 30xx+), "
                            "fp16 with gradient scaling on other CUDA GPUs (T4); on a CPU bf16 where it has native "
                            "bf16 (AVX512-BF16, AMX), else fp32; a resumed run keeps its own")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="the channels_last memory layout (default: yes, or as the resumed run did; 1.2-1.3x "
                            "faster on an AVX2 CPU at batch 128)")
    train.add_argument("--no-cuda-graph", action="store_true",
                       help="on a GPU, run each training step eagerly instead of as a CUDA graph")
    train.add_argument("--base-width", type=positive_int, metavar="W", help="filters of the first stage (paper: 16)")
    train.add_argument("--train-per-class", type=positive_int, metavar="K", help="train on K images per class")
    train.add_argument("--test-per-class", type=positive_int, metavar="K", help="test on K images per class")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar, one line per epoch (the default when the output is not a terminal)")
    parallel = train.add_argument_group("batch norm as on two GPUs; data-parallel training (under torchrun: "
                                        "torchrun --nproc-per-node N -m annotated_resnet.cli train ..., the global "
                                        "mini-batch stays --batch-size)")
    parallel.add_argument("--bn-groups", type=positive_int, default=1, metavar="G",
                          help="in one process: normalise each training batch as G equal groups with their own "
                               "statistics, as G GPUs do (the paper's setting without a second GPU: --bn-groups 2, two "
                               "groups of 64); default 1")
    parallel.add_argument("--sync-batchnorm", action="store_true",
                          help="under torchrun, normalise with the whole global batch's statistics (GPUs only; "
                               "default: each process its own slice's, as two GPUs without synchronisation do)")

    evaluate = commands.add_parser("evaluate", help="test error of a checkpoint", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint.pt (or its run folder)")
    evaluate.add_argument("--data", metavar="PATH", help="CIFAR-10 source (see below)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    add_reproduce_parser(commands)
    return parser


#: The paper's sets of CIFAR-10 runs. Fig. 1 plots plain-20 and plain-56; Fig. 6 plots
#: plain-20/32/44/56 (left), ResNet-20/32/44/56/110 (middle) and ResNet-110/1202 (right); Table 6
#: lists ResNet-20 ... 110 and 1202. ResNet-1202 alone costs about eleven ResNet-110s, so it runs
#: only when named: --runs resnet1202.
PAPER_SETS = {
    "fig1": ["plain20", "plain56"],
    "fig6": ["plain20", "plain32", "plain44", "plain56", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"],
    "table6": ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"],
}

#: The options of ``reproduce`` that it hands on to every run's ``annotated-resnet train``,
#: under that command's name for them.
PASSED_ON = {"data": "--data", "iterations": "--scale-to", "batch_size": "--batch-size", "split": "--split",
             "device": "--device", "precision": "--precision", "compile": "--compile", "base_width": "--base-width",
             "train_per_class": "--train-per-class", "test_per_class": "--test-per-class"}


def add_reproduce_parser(commands) -> None:
    reproduce = commands.add_parser(
        "reproduce", help="train the paper's sets of runs, one process per run", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train several CIFAR-10 runs, each its own `annotated-resnet train` process in a folder of its "
                    "own, several at once on a CPU's cores; rerun the same command to resume what a budget, "
                    "SIGTERM or Ctrl-C stopped. Prints how long the set still needs once every run has "
                    "logged an epoch.")
    reproduce.add_argument("sets", nargs="*", type=paper_set, metavar="SET",
                           help=f"paper sets: {', '.join(f'{k} ({len(v)} runs)' for k, v in PAPER_SETS.items())}")
    reproduce.add_argument("--runs", type=run_names, default=[], metavar="NAMES",
                           help="more runs, comma-separated: a model name (resnet20) or name@seed (resnet110@1)")
    reproduce.add_argument("--out", default="runs/paper", metavar="DIR", help="one folder per run (default runs/paper)")
    reproduce.add_argument("--jobs", type=positive_int, metavar="N",
                           help="runs at once (default: on a CPU one per core, the cores shared out; on a GPU one)")
    reproduce.add_argument("--budget-minutes", type=positive_float, metavar="M",
                           help="wall-clock budget; runs still going then save a checkpoint (default: none)")
    reproduce.add_argument("--data", metavar="PATH", help="CIFAR-10 source (see below)")
    reproduce.add_argument("--iterations", type=positive_int, metavar="N",
                           help="shrink each schedule to N iterations (default: the paper's 64k)")
    reproduce.add_argument("--batch-size", type=positive_int, metavar="B", help="mini-batch size (paper: 128)")
    reproduce.add_argument("--split", action="store_true",
                           help="hold out 5k training images for validation (the paper's 45k/5k split); default: "
                                "train on all 50k")
    reproduce.add_argument("--seed", type=int, default=0, help="seed of the runs named without @seed (default 0)")
    reproduce.add_argument("--device", help="cuda (default when there is one) or cpu")
    reproduce.add_argument("--precision", choices=PRECISIONS, help="as for train (default: auto)")
    reproduce.add_argument("--compile", action="store_true", help="torch.compile each model")
    reproduce.add_argument("--base-width", type=positive_int, metavar="W", help="filters of the first stage (paper: 16)")
    reproduce.add_argument("--train-per-class", type=positive_int, metavar="K", help="train on K images per class")
    reproduce.add_argument("--test-per-class", type=positive_int, metavar="K", help="test on K images per class")


def paper_set(text: str) -> str:
    """argparse type: the name of one of :data:`PAPER_SETS`."""
    if text not in PAPER_SETS:
        raise argparse.ArgumentTypeError(f"no set {text!r}; the sets are {', '.join(PAPER_SETS)} (name single runs "
                                         "with --runs)")
    return text


def run_names(text: str) -> list[tuple[str, int | None]]:
    """``--runs``: comma-separated model names, each optionally with ``@seed``."""
    runs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, seed = item.partition("@")
        if name not in CIFAR_MODEL_NAMES:
            raise argparse.ArgumentTypeError(f"unknown run {name!r}; valid names: {', '.join(CIFAR_MODEL_NAMES)}")
        if seed and not seed.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: the seed after @ must be a whole number, as in resnet110@1")
        runs.append((name, int(seed) if seed else None))
    if not runs:
        raise argparse.ArgumentTypeError("expected at least one model name, e.g. resnet20,plain20")
    return runs


def runs_from_args(args) -> list[Run]:
    """The runs of ``annotated-resnet reproduce``: the sets' and ``--runs``', each once, in the
    order named (the launcher starts them in that order)."""
    named = [(name, None) for key in args.sets for name in PAPER_SETS[key]] + args.runs
    runs = {}
    for name, seed in named:
        folder = name if seed is None else f"{name}-seed{seed}"
        runs[folder] = Run(folder, name, args.seed if seed is None else seed)
    if not runs:
        raise ValueError(f"name the runs: one or more sets ({', '.join(PAPER_SETS)}) and/or --runs resnet20,...")
    return list(runs.values())


def train_options(args) -> list[str]:
    """The options of ``reproduce`` that every run's ``annotated-resnet train`` gets."""
    options = []
    for key, flag in PASSED_ON.items():
        value = getattr(args, key)
        if value is True:
            options.append(flag)
        elif value not in (None, False):
            options += [flag, str(value)]
    return options


def run_reproduce(args) -> int:
    """``annotated-resnet reproduce``: the runs, each its own process; 0 when all have finished,
    3 when some are left to resume, 1 when one failed."""
    runs = runs_from_args(args)
    jobs, threads = default_jobs(len(runs), args.device)
    jobs = args.jobs or jobs
    if args.jobs and threads:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(runs)} runs in {args.out}, {jobs} at a time{f', {threads} thread(s) each' if threads else ''}; "
          f"budget: {f'{args.budget_minutes:g} minutes' if args.budget_minutes else 'none'}", flush=True)
    statuses = launch(runs, args.out, train_options(args), jobs=jobs, threads=threads,
                      iterations=args.iterations or 64_000,
                      budget_seconds=60 * args.budget_minutes if args.budget_minutes else None,
                      report=lambda line: print(line, flush=True))
    for name, status in statuses.items():
        print(f"{name}: {status}")
    if any(status.startswith("failed") for status in statuses.values()):
        return 1
    return 0 if all(status == "finished" for status in statuses.values()) else 3


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def recipe_from_args(args) -> Recipe:
    """The paper's recipe for ``args.model``, changed only where a flag asks for it."""
    recipe = paper_recipe(args.model, split=args.split)
    if args.scale_to:
        recipe = recipe.scaled(iterations=args.scale_to)
    elif args.iterations:
        recipe = dataclasses.replace(recipe, iterations=args.iterations)
    return recipe.scaled(batch_size=args.batch_size, lr=args.lr)


def start_processes(args):
    """This process's place among the processes of a torchrun launch (after joining them), or a
    run of one process."""
    if not launched_by_torchrun():
        if args.sync_batchnorm:
            raise ValueError("--sync-batchnorm is for several processes: start them with "
                             "torchrun --nproc-per-node N -m annotated_resnet.cli train ...")
        return OneProcess(), choose_device(args.device)
    check_batch_size(recipe_from_args(args).batch_size, int(os.environ["WORLD_SIZE"]))
    processes = ProcessGroup.start(args.device, args.sync_batchnorm)
    return processes, processes.device


def run_train(args, argv: list[str]) -> int:
    """``annotated-resnet train``: one run of the recipe; the exit status says how it ended.
    Of several processes, the first prints the run's progress; each prints its own errors."""
    recipe = recipe_from_args(args)
    out = args.out or f"runs/{args.model}"
    processes, device = start_processes(args)
    say = print if processes.first else lambda *a, **k: None
    cifar = processes.first_on_each_machine(lambda: load_cifar10(args.data)) if processes.parallel \
        else load_cifar10(args.data)
    torch.manual_seed(args.seed)  # the initialisation is part of the run's seed
    model = create_model(args.model, **({"base_width": args.base_width} if args.base_width else {}))
    checkpoint = checkpoint_to_resume(out, args.resume)
    layout = args.channels_last if args.channels_last is not None or checkpoint else True  # new runs: channels_last
    precision = fastest_cpu_precision() if device.type == "cpu" and args.precision == "auto" and not checkpoint \
        else args.precision
    settings = run_settings(checkpoint, out, device, precision, args.compile, layout)
    warning = slow_precision_warning(device, settings["precision"])
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    say(f"recipe: {recipe.describe()}\ndata: {cifar.source}\nprecision: {settings['precision']}, "
        f"{'channels_last' if settings['channels_last'] else 'contiguous'} layout"
        f"{', torch.compile' if settings['compile'] else ''}\nrun folder: {out}", flush=True)
    if processes.parallel:
        say(f"processes: {processes.count} ({os.environ.get('LOCAL_WORLD_SIZE', processes.count)} on this machine), "
            f"{recipe.batch_size // processes.count} images each of every batch of {recipe.batch_size}; batch norm "
            f"{processes.batch_norm()}; training step eager", flush=True)
    progress = not args.no_progress and sys.stdout.isatty()
    try:
        result = train(model, cifar, recipe, train_per_class=args.train_per_class,
                       test_per_class=args.test_per_class, seed=args.seed, progress=progress,
                       out=out, resume=args.resume, device=device, cuda_graph=not args.no_cuda_graph,
                       processes=processes, batchnorm_groups=args.bn_groups, **settings,
                       cbs=[EpochPrinter()] if not progress and processes.first else None)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    if processes.parallel:
        processes.finish()
    if result.stopped:
        again = shlex.join(["annotated-resnet", *argv, *([] if args.resume else ["--resume"])])
        if processes.parallel:
            again = f"the same command with --resume ({processes.count} processes)"
        say(f"stopped by {result.stopped}; checkpoint saved in {out}. Continue with: {again}", flush=True)
        return 128 + signal.Signals[result.stopped.split()[0]]
    last = result.history[-1] if result.history else None
    if processes.first:
        command = [word for word in argv if word != "--resume"]
        write_results(Path(out), cifar.source, shlex.join(["annotated-resnet", *command]), str(device),
                      cuda_graph=not args.no_cuda_graph)
    if last:
        say(f"done: {last['iteration']:,} iterations, test error {last['test_error']:.2%}; log, checkpoint, weights "
            f"and provenance in {out}")
    return 0


def run_evaluate(args) -> int:
    """``annotated-resnet evaluate``: a checkpoint's error on the full test set."""
    checkpoint = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint).to(choose_device(args.device))
    cifar = load_cifar10(args.data)
    error = evaluate(model, cifar.test_images, cifar.test_labels, mean=checkpoint["pixel_mean"])
    print(f"{checkpoint['recipe']['model']} after {checkpoint['run']['iteration']:,} iterations: "
          f"test error {error:.2%} on {len(cifar.test_labels):,} test images ({cifar.source})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "reproduce":
            return run_reproduce(args)
        return run_train(args, argv) if args.command == "train" else run_evaluate(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
