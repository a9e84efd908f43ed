"""The test error of a trained network (Sec. 4.2: the single original view of each test image)."""

from __future__ import annotations

import torch
from torch import nn

from .batches import DeviceBatches
from .step import autocast


@torch.no_grad()
def evaluate(model: nn.Module, images, labels=None, mean: torch.Tensor | None = None,
             batch_size: int = 500) -> float:
    """Error rate of ``model`` on uint8 ``images`` (N, 32, 32, 3) with ``labels``, after
    subtracting the per-pixel training ``mean`` (Sec. 4.2): the single original view of
    each test image, no augmentation. ``images`` may also be a :class:`DeviceBatches`."""
    device = next(model.parameters()).device
    if isinstance(images, DeviceBatches):
        batches = images
    else:
        if mean is None or labels is None:
            raise ValueError("evaluate(model, images, labels, mean=...) needs the labels and the per-pixel "
                             "training mean (TrainResult.mean, or data.pixel_mean(train_images))")
        batches = DeviceBatches(images, labels, batch_size, mean, train=False, device=device)
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), device=device)
    with autocast(device):
        for x, y in batches:
            wrong += (model(x).argmax(1) != y).sum()
    model.train(was_training)
    return wrong.item() / len(batches.labels)
