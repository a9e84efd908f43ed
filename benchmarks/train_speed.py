"""Training speed, measured side by side in one process on one device.

1. Ours: the uint8 images live on the training device; each batch is shuffled, padded,
   cropped, flipped and mean-subtracted there with tensor ops (annotated_resnet.train's
   DeviceBatches), then one SGD step (bf16 autocast + channels_last on CUDA, fp32 on CPU).
2. The usual way: a torchvision-style CIFAR-10 dataset that turns each uint8 image into a
   PIL image and applies RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
   Normalize on the CPU, a DataLoader with worker processes, and a plain eager fp32 loop.
   (torchvision's CIFAR10 class does exactly this per image; it cannot download offline,
   so this dataset serves the same decoded images through the same code path.)
3. fastai's Learner around the same model and our batches, against a bare loop: the cost
   of the Learner per step.

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

from annotated_resnet.data import load_cifar10, pixel_mean
from annotated_resnet.model import create_model
from annotated_resnet.train import DeviceBatches, choose_device

from fastai.callback.core import Callback  # noqa: E402 - after annotated_resnet.train quiets fastai's import
from fastai.callback.fp16 import MixedPrecision  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.optimizer import OptimWrapper  # noqa: E402


class UsualCIFAR10(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: a PIL image from the uint8 array, then the
    transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(model, batches, steps, warmup, device, bf16):
    """Images per second of ``steps`` full training steps (after ``warmup`` untimed ones)."""
    optimizer, loss_func = sgd(model), nn.CrossEntropyLoss()
    model.train()
    iterator = iter(batches)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = next(iterator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_func(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


class TrainTimer(Callback):
    """Times fastai's training phase from its ``warmup``-th batch on."""

    def __init__(self, warmup, device):
        self.warmup, self.device = warmup, device

    def before_batch(self):
        if self.training and self.iter == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def after_train(self):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def fastai_seconds(model, batches, valid, steps, warmup, device, bf16):
    opt_func = lambda params, lr: OptimWrapper(params, torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=1e-4)
    timer = TrainTimer(warmup, device)
    learn = Learner(DataLoaders(batches, valid, device=device), model, loss_func=nn.CrossEntropyLoss(),
                    opt_func=opt_func, lr=0.1, cbs=[timer])
    learn.remove_cb(learn.progress)
    learn.logger = lambda *args: None
    if bf16:
        learn.add_cb(MixedPrecision("bf16"))
    batches.remaining = warmup + steps
    learn.fit(1)
    return timer.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data", default=None, help="CIFAR-10 source (see annotated_resnet.data)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers for the usual way")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = choose_device(args.device)
    cuda = device.type == "cuda"
    cifar = load_cifar10(args.data)
    images, labels = cifar.train_images, cifar.train_labels
    mean = pixel_mean(images)
    n_images = args.batch_size * (args.steps + args.warmup)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device: {name}; torch {torch.__version__}; model {args.model}; batch {args.batch_size}; "
          f"{args.steps} timed steps after {args.warmup} warm-up steps\ndata: {cifar.source}\n")

    def model():
        torch.manual_seed(0)
        net = create_model(args.model).to(device)
        return net.to(memory_format=torch.channels_last) if cuda else net

    def ours():
        batches = DeviceBatches(images, labels, args.batch_size, mean, train=True, device=device)
        batches.channels_last = cuda
        return batches

    results = {}
    results["ours"] = timed_loop(model(), ours(), args.steps, args.warmup, device, bf16=cuda)
    if args.compile:
        results["ours + torch.compile"] = timed_loop(torch.compile(model()), ours(), args.steps, args.warmup + 3,
                                                     device, bf16=cuda)
    usual_transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                 T.Normalize(mean.mean((1, 2)).tolist(), [1.0, 1.0, 1.0])])
    usual = torch.utils.data.DataLoader(UsualCIFAR10(images[:n_images], labels[:n_images], usual_transform),
                                        batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                        pin_memory=cuda, drop_last=True, persistent_workers=False)
    usual_model = create_model(args.model).to(device)
    results["usual"] = timed_loop(usual_model, usual, args.steps, args.warmup, device, bf16=False)

    rate = {k: args.batch_size * args.steps / s for k, s in results.items()}
    label = {"ours": f"ours: batches built on the {device.type} ({'bf16 autocast, channels_last' if cuda else 'fp32'})",
             "ours + torch.compile": "ours with torch.compile",
             "usual": f"usual: Dataset + DataLoader({args.workers} workers) with CPU transforms, eager fp32"}
    for key, value in rate.items():
        print(f"{label[key]:<78} {value:9.0f} images/s  {1000 * results[key] / args.steps:8.2f} ms/step")
    print(f"ratio ours / usual: {rate['ours'] / rate['usual']:.2f}x\n")

    valid = DeviceBatches(images[:args.batch_size], labels[:args.batch_size], args.batch_size, mean, train=False,
                          device=device)
    bare = timed_loop(model(), ours(), args.steps, args.warmup, device, bf16=cuda)
    with_fastai = fastai_seconds(model(), ours(), valid, args.steps, args.warmup, device, bf16=cuda)
    per_step = lambda seconds: 1000 * seconds / args.steps
    print(f"bare loop over our batches:      {per_step(bare):8.2f} ms/step")
    print(f"fastai Learner, same model/data: {per_step(with_fastai):8.2f} ms/step "
          f"(overhead {per_step(with_fastai) - per_step(bare):+.2f} ms/step, "
          f"{100 * (with_fastai / bare - 1):+.0f}%)")


if __name__ == "__main__":
    main()
