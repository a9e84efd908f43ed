"""Training speed, measured side by side in one process on one device.

1. Ours: exactly what ``annotated_resnet.training.train.train`` does per training step. The uint8
   images live on the training device; each batch is shuffled, padded, cropped, flipped and
   mean-subtracted there (DeviceBatches); fastai's Learner runs the loop and our
   StepCallback runs the step (fp32 on the CPU; on a GPU channels_last, fused SGD, a CUDA
   graph and, where the GPU has bf16 tensor cores, bf16 autocast). Timed with a callback
   from a warm-up batch to the end of the epoch's training phase.
2. The usual way: a torchvision-style CIFAR-10 dataset that turns each uint8 image into a
   PIL image and applies RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
   Normalize on the CPU, a DataLoader with worker processes, and a plain eager fp32 loop.
   (torchvision's CIFAR10 class does exactly this per image; it cannot download offline,
   so this dataset serves the same decoded images through the same code path.)
3. What fastai's Learner costs: the same batches and step in a bare Python loop. On a GPU,
   also the same step without the CUDA graph, to show what the graph buys.

    python benchmarks/train_speed.py --model resnet20 --steps 30 --device cpu
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

from annotated_resnet.data import CIFAR10, load_cifar10, pixel_mean
from annotated_resnet.model import create_model
from annotated_resnet.training.batches import DeviceBatches
from annotated_resnet.training.recipe import paper_recipe, sgd
from annotated_resnet.training.step import TrainingStep, choose_device, choose_precision, describe_precision
from annotated_resnet.training.train import train

from fastai.callback.core import Callback  # noqa: E402 - after annotated_resnet.training.train quiets fastai's import


class UsualCIFAR10(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: a PIL image from the uint8 array, then the
    transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def usual_seconds(model, loader, steps, warmup, device):
    """Seconds for ``steps`` steps of the plain eager fp32 loop (after ``warmup`` untimed ones)."""
    optimizer, loss_func = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4), nn.CrossEntropyLoss()
    model.train()
    iterator = iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = next(iterator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_func(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def bare_seconds(name, model, batches, steps, warmup, device, graph):
    """Seconds for ``steps`` of our batches and step in a bare loop, no Learner."""
    recipe = paper_recipe(name)
    step = TrainingStep(model, nn.CrossEntropyLoss(), sgd(model.parameters(), recipe), device, graph=graph)
    iterator = iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        step(*next(iterator), recipe.lr)
    synchronize(device)
    return time.perf_counter() - start


class TrainTimer(Callback):
    """Times fastai's training phase from its ``warmup``-th batch to its end."""

    def __init__(self, warmup, device):
        self.warmup, self.device = warmup, device

    def before_batch(self):
        if self.training and self.iter == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def after_train(self):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def ours_seconds(name, cifar, steps, warmup, batch_size, device, compile=False):
    """Seconds for ``steps`` training steps inside :func:`train` (one epoch, validation and
    test evaluation after it not timed)."""
    timer = TrainTimer(warmup, device)
    recipe = paper_recipe(name).scaled(iterations=warmup + steps, batch_size=batch_size)
    train(name, cifar, recipe, test_per_class=10, progress=False, device=device, compile=compile, cbs=[timer])
    return timer.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56", "resnet110"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", default=None, help="CIFAR-10 source (see annotated_resnet.data)")
    parser.add_argument("--workers", type=int, nargs="+", default=[min(4, os.cpu_count() or 1)],
                        help="DataLoader worker counts to time the usual way with (the fastest one counts)")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = choose_device(args.device)
    cuda = device.type == "cuda"
    cifar = load_cifar10(args.data)
    n_images = args.batch_size * (args.steps + args.warmup)
    if n_images > len(cifar.train_labels):
        parser.error(f"--steps plus --warmup must fit one epoch: at most {len(cifar.train_labels) // args.batch_size}")
    cifar = CIFAR10(cifar.train_images[:n_images], cifar.train_labels[:n_images], cifar.test_images,
                    cifar.test_labels, cifar.classes, cifar.source)
    images, labels = cifar.train_images, cifar.train_labels
    mean = pixel_mean(images)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device: {name}; torch {torch.__version__}; model {args.model}; batch {args.batch_size}; "
          f"{args.steps} timed steps after {args.warmup} warm-up steps\ndata: {cifar.source}\n", flush=True)

    def model():
        torch.manual_seed(0)
        net = create_model(args.model).to(device)
        return net.to(memory_format=torch.channels_last) if cuda else net

    def batches():
        loader = DeviceBatches(images, labels, args.batch_size, mean, train=True, device=device)
        loader.channels_last = cuda
        return loader

    seconds, label = {}, {}
    ours = f"fastai Learner + our step ({describe_precision(device, choose_precision(device))})"
    label["ours"] = f"ours: train(), batches built on the {device.type}, {ours}"
    seconds["ours"] = ours_seconds(args.model, cifar, args.steps, args.warmup, args.batch_size, device)
    if args.compile:
        label["ours_compiled"] = "ours with torch.compile"
        seconds["ours_compiled"] = ours_seconds(args.model, cifar, args.steps, args.warmup, args.batch_size, device,
                                                compile=True)
    label["bare"] = "our batches and step in a bare loop (no Learner)"
    seconds["bare"] = bare_seconds(args.model, model(), batches(), args.steps, args.warmup, device, graph=cuda)
    if cuda:
        label["bare_eager"] = "the same without the CUDA graph (eager step)"
        seconds["bare_eager"] = bare_seconds(args.model, model(), batches(), args.steps, args.warmup, device, graph=False)
    usual_transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                 T.Normalize(mean.mean((1, 2)).tolist(), [1.0, 1.0, 1.0])])
    for workers in args.workers:
        usual = torch.utils.data.DataLoader(UsualCIFAR10(images, labels, usual_transform), batch_size=args.batch_size,
                                            shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=True)
        label[f"usual{workers}"] = f"usual: Dataset + DataLoader({workers} workers) with CPU transforms, eager fp32"
        seconds[f"usual{workers}"] = usual_seconds(create_model(args.model).to(device), usual, args.steps,
                                                   args.warmup, device)

    rate = {key: args.batch_size * args.steps / s for key, s in seconds.items()}
    for key, value in rate.items():
        print(f"{label[key]:<90} {value:9.0f} images/s  {1000 * seconds[key] / args.steps:7.2f} ms/step")
    usual_best = max((k for k in rate if k.startswith("usual")), key=rate.get)
    print(f"\nratio ours / usual (fastest DataLoader setting): {rate['ours'] / rate[usual_best]:.2f}x")
    per_step = {key: 1000 * s / args.steps for key, s in seconds.items()}
    print(f"fastai Learner overhead: {per_step['ours'] - per_step['bare']:+.2f} ms/step "
          f"({100 * (seconds['ours'] / seconds['bare'] - 1):+.0f}% over the bare loop)")
    if cuda:
        print(f"CUDA graph: the bare step takes {per_step['bare']:.2f} ms instead of {per_step['bare_eager']:.2f} ms "
              f"({seconds['bare_eager'] / seconds['bare']:.1f}x)")


if __name__ == "__main__":
    main()
