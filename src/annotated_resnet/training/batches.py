"""Training and evaluation batches built on the training device from uint8 images.

Keeping the 50k uint8 training images on the GPU (150 MB) and building every batch there
(random order, Sec. 4.2's pad-crop-flip, per-pixel mean subtraction) leaves the host nothing to
do per batch but launch a few kernels: no worker processes, no copies from host memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data import CIFAR10, augment, balanced_subset, normalize, pixel_mean, to_tensor, train_val_split

#: The split and the data subsets are chosen with this seed whatever the run's seed, so that
#: runs with different seeds see the same images and differ only in initialisation and order.
DATA_SEED = 0
#: Process ``rank`` of a data-parallel run seeds its augmentation with ``seed + 1 + stride * rank``:
#: runs with seeds below the stride never share an augmentation stream.
AUGMENT_SEED_STRIDE = 1_000


def check_batch_size(batch_size: int, processes: int) -> None:
    """A data-parallel run's global mini-batch must divide evenly among its processes."""
    if batch_size % processes:
        raise ValueError(f"a global batch of {batch_size} does not divide among {processes} processes; choose a batch "
                         f"size that is a multiple of {processes} (the paper: 128, 64 per GPU on two GPUs)")


class DeviceBatches:
    """(images, labels) batches from uint8 images kept on the training device.

    For training (``train=True``): a fresh random order every epoch, full batches only, and
    Sec. 4.2's augmentation per batch; for evaluation: the images in order, unaugmented.
    Both subtract the per-pixel ``mean``. The random order and the augmentation use their
    own generators, whose states a checkpoint stores, so a resumed run draws the same numbers.

    Data-parallel training (:mod:`annotated_resnet.training.distributed`): every one of ``processes``
    processes draws the same order (seeded by ``seed``) and takes its own contiguous slice,
    ``batch_size / processes`` images, of each global batch of ``batch_size``, so the processes
    together see every image of an epoch once; process ``rank`` augments its slice with its
    own generator (seeded ``seed + 1 + AUGMENT_SEED_STRIDE * rank``).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, mean: torch.Tensor,
                 train: bool, seed: int = 0, device: str | torch.device = "cpu", rank: int = 0, processes: int = 1):
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels; give one label per image")
        if train and len(labels) < batch_size:
            raise ValueError(f"only {len(labels)} training images for batches of {batch_size}: "
                             "use a smaller batch size or more images")
        self.images, self.labels = to_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
        if train:
            check_batch_size(batch_size, processes)
        self.batch_size, self.mean, self.train, self.seed = batch_size, mean, train, seed
        self.rank, self.processes = rank, processes
        self.slice_size = batch_size // processes  # this process's images of each global batch
        self.remaining = None  # training: iterations left in the run (the last epoch may be short)
        self.skip = 0  # training: batches of the coming epoch already done before a resume
        self.channels_last = False
        self.device = None
        self.to(device)

    def to(self, device) -> DeviceBatches:
        """Move the images to ``device`` (fastai's ``DataLoaders`` calls this); a new device
        gets freshly seeded generators, the same device keeps their states."""
        if self.device == torch.device(device):
            return self
        self.device = torch.device(device)
        self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        self.mean = self.mean.to(self.device)
        self.order_generator = torch.Generator().manual_seed(self.seed)  # CPU: the same order on every GPU model
        self.augment_generator = torch.Generator(self.device).manual_seed(self.seed + 1 + AUGMENT_SEED_STRIDE * self.rank)
        self.epoch_order_state = self.order_generator.get_state()
        return self

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch when training (the last partial batch is dropped); all the
        images, the last batch possibly short, when evaluating."""
        n = len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        n = self.batches_per_epoch - (self.skip if self.train else 0)
        return n if self.remaining is None else min(n, self.remaining)

    def __iter__(self):
        count = len(self)
        if self.train:
            self.epoch_order_state = self.order_generator.get_state()
            order = torch.randperm(len(self.labels), generator=self.order_generator).to(self.device)
        else:
            order = torch.arange(len(self.labels), device=self.device)
        first, self.skip = (self.skip if self.train else 0), 0
        for b in range(first, first + count):
            yield self._batch(order[b * self.batch_size:(b + 1) * self.batch_size])

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images at ``index`` (this process's slice of them), augmented when training,
        less the mean, with their labels."""
        if self.train and self.processes > 1:
            index = index[self.rank * self.slice_size:(self.rank + 1) * self.slice_size]
        images = self.images[index]
        if self.train:
            images = augment(images, generator=self.augment_generator)
            if self.remaining is not None:
                self.remaining -= 1
        images = normalize(images, self.mean)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, self.labels[index]

    def state(self, batches_done: int) -> dict:
        """What a checkpoint needs to continue this loader after ``batches_done`` batches of
        the current epoch (0 at an epoch's end)."""
        order_state = self.epoch_order_state if batches_done else self.order_generator.get_state()
        return {"order_state": order_state.cpu(), "augment_state": self.augment_generator.get_state().cpu(),
                "skip": batches_done}

    def load_state(self, state: dict) -> None:
        """Continue from what :meth:`state` returned."""
        restore_generator(self.order_generator, state["order_state"], "the batch order's")
        restore_generator(self.augment_generator, state["augment_state"], "the augmentation's")
        self.skip = state["skip"]


def restore_generator(generator: torch.Generator, state: torch.Tensor, whose: str) -> None:
    """``generator.set_state(state)``, refusing with a message a state that a generator of
    another kind wrote (a checkpoint of an earlier version, which kept it on another device)."""
    if state.numel() != generator.get_state().numel():
        raise ValueError(f"the checkpoint holds {whose} random state for another kind of generator ({state.numel()} "
                         f"bytes, not {generator.get_state().numel()} for a {generator.device.type} generator): an "
                         "earlier version of annotated_resnet wrote it, and this one cannot continue that run "
                         "exactly. Start the run again in a new folder, or finish it with the version that wrote it.")
    generator.set_state(state)


class RunData:
    """The batches of one run: training (seeded order and augmentation), validation (the 5k
    held out by a split, else the test images) and test, with the training images' per-pixel
    mean; :attr:`description` is what a checkpoint records about them. In a data-parallel run,
    process ``rank`` of ``processes`` takes its slice of every training batch."""

    def __init__(self, cifar: CIFAR10, recipe, train_per_class: int | None, test_per_class: int | None,
                 seed: int, device: torch.device, rank: int = 0, processes: int = 1):
        images, labels = cifar.train_images, cifar.train_labels
        if recipe.validation:
            images, labels, val_images, val_labels = train_val_split(images, labels, recipe.validation, DATA_SEED)
        if train_per_class is not None:
            images, labels = balanced_subset(images, labels, train_per_class, DATA_SEED)
        test_images, test_labels = cifar.test_images, cifar.test_labels
        if test_per_class is not None:
            test_images, test_labels = balanced_subset(test_images, test_labels, test_per_class, DATA_SEED)
        self.mean = pixel_mean(images)
        self.train = DeviceBatches(images, labels, recipe.batch_size, self.mean, True, seed, device, rank, processes)
        eval_batch = max(recipe.batch_size, 5_000 if device.type == "cuda" else 1_000)
        self.test = DeviceBatches(test_images, test_labels, eval_batch, self.mean, False, device=device)
        self.valid = (DeviceBatches(val_images, val_labels, eval_batch, self.mean, False, device=device)
                      if recipe.validation else self.test)
        self.description = {"source": cifar.source, "train_images": len(labels), "test_images": len(test_labels),
                            "validation_images": recipe.validation, "train_per_class": train_per_class,
                            "test_per_class": test_per_class, "data_seed": DATA_SEED}

    def use_channels_last(self) -> None:
        """Hand the network its batches in channels_last layout (faster convolutions on a GPU)."""
        for batches in (self.train, self.valid, self.test):
            batches.channels_last = True

