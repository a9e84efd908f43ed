"""``annotated-resnet``: train a CIFAR-10 network of Sec. 4.2 and evaluate checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

import torch

from .checkpoints import load_checkpoint, model_from_checkpoint
from .data import load_cifar10
from .evaluation import evaluate
from .model import create_model
from .recipe import CIFAR_MODEL_NAMES, Recipe, paper_recipe
from .step import choose_device
from .train import NonFiniteLossError, train

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
  annotated-resnet evaluate runs/resnet56/checkpoint.pt # test error of a checkpoint

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
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate}")

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
                            "on which it chose the schedule); default: train on all 50k, as the paper's "
                            "reported models were")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--seed", type=int, default=0, help="initialisation, order and augmentation seed (default 0)")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on a GPU)")
    train.add_argument("--no-cuda-graph", action="store_true",
                       help="on a GPU, run each training step eagerly instead of as a CUDA graph")
    train.add_argument("--base-width", type=positive_int, metavar="W", help="filters of the first stage (paper: 16)")
    train.add_argument("--train-per-class", type=positive_int, metavar="K", help="train on K images per class")
    train.add_argument("--test-per-class", type=positive_int, metavar="K", help="test on K images per class")
    train.add_argument("--no-progress", action="store_true", help="no progress bar, one line per epoch")

    evaluate = commands.add_parser("evaluate", help="test error of a checkpoint", epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint.pt (or its run folder)")
    evaluate.add_argument("--data", metavar="PATH", help="CIFAR-10 source (see below)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    return parser


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


def run_train(args) -> int:
    """``annotated-resnet train``: one run of the recipe; the exit status says how it ended."""
    recipe = recipe_from_args(args)
    out = args.out or f"runs/{args.model}"
    cifar = load_cifar10(args.data)
    torch.manual_seed(args.seed)  # the initialisation is part of the run's seed
    model = create_model(args.model, **({"base_width": args.base_width} if args.base_width else {}))
    print(f"recipe: {recipe.describe()}\ndata: {cifar.source}\nrun folder: {out}", flush=True)
    try:
        result = train(model, cifar, recipe, train_per_class=args.train_per_class,
                       test_per_class=args.test_per_class, seed=args.seed, progress=not args.no_progress,
                       out=out, resume=args.resume, device=args.device, compile=args.compile,
                       cuda_graph=not args.no_cuda_graph,
                       cbs=[EpochPrinter()] if args.no_progress else None)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.stopped:
        signum = signal.Signals[result.stopped.split()[0]]
        print(f"stopped by {result.stopped}; checkpoint saved in {out}. Continue with: "
              f"annotated-resnet train {args.model} --out {out} --resume", flush=True)
        return 128 + signum
    last = result.history[-1] if result.history else None
    if last:
        print(f"done: {last['iteration']:,} iterations, test error {last['test_error']:.2%}; log and checkpoint in {out}")
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
    args = build_parser().parse_args(argv)
    try:
        return run_train(args) if args.command == "train" else run_evaluate(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
