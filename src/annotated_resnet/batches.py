"""Training and evaluation batches built on the training device from uint8 images.

Keeping the 50k uint8 training images on the GPU (150 MB) and building every batch there
(random order, Sec. 4.2's pad-crop-flip, per-pixel mean subtraction) leaves the host nothing to
do per batch but launch a few kernels: no worker processes, no copies from host memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import augment, normalize, to_tensor


class DeviceBatches:
    """(images, labels) batches from uint8 images kept on the training device.

    For training (``train=True``): a fresh random order every epoch, full batches only, and
    Sec. 4.2's augmentation per batch; for evaluation: the images in order, unaugmented.
    Both subtract the per-pixel ``mean``. The random order and the augmentation use their
    own generators, whose states a checkpoint stores, so a resumed run draws the same numbers.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, mean: torch.Tensor,
                 train: bool, seed: int = 0, device: str | torch.device = "cpu"):
        if train and len(labels) < batch_size:
            raise ValueError(f"only {len(labels)} training images for batches of {batch_size}: "
                             "use a smaller batch size or more images")
        self.images, self.labels = to_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
        self.batch_size, self.mean, self.train, self.seed = batch_size, mean, train, seed
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
        self.order_generator = torch.Generator(self.device).manual_seed(self.seed)
        self.augment_generator = torch.Generator(self.device).manual_seed(self.seed + 1)
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
            order = torch.randperm(len(self.labels), device=self.device, generator=self.order_generator)
        else:
            order = torch.arange(len(self.labels), device=self.device)
        first, self.skip = (self.skip if self.train else 0), 0
        for b in range(first, first + count):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.images[index]
            if self.train:
                images = augment(images, generator=self.augment_generator)
                if self.remaining is not None:
                    self.remaining -= 1
            images = normalize(images, self.mean)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[index]

    def state(self, batches_done: int) -> dict:
        """What a checkpoint needs to continue this loader after ``batches_done`` batches of
        the current epoch (0 at an epoch's end)."""
        order_state = self.epoch_order_state if batches_done else self.order_generator.get_state()
        return {"order_state": order_state.cpu(), "augment_state": self.augment_generator.get_state().cpu(),
                "skip": batches_done}

    def load_state(self, state: dict) -> None:
        """Continue from what :meth:`state` returned."""
        self.order_generator.set_state(state["order_state"])
        self.augment_generator.set_state(state["augment_state"])
        self.skip = state["skip"]
