"""The test error of a trained network (Sec. 4.2: the single original view of each test image)."""

from __future__ import annotations

import torch
from torch import nn

from .batches import DeviceBatches
from .step import autocast


@torch.no_grad()
def evaluate(model: nn.Module, images, labels=None, mean: torch.Tensor | None = None,
             batch_size: int = 500, precision: str = "fp32") -> float:
    """Error rate of ``model`` on uint8 ``images`` (N, 32, 32, 3) with ``labels``, after
    subtracting the per-pixel training ``mean`` (Sec. 4.2): the single original view of
    each test image, no augmentation. ``images`` may also be a :class:`DeviceBatches`.
    ``precision``: fp32 by default, the precision the weights are kept in; ``"auto"``, ``"bf16"``
    or ``"fp16"`` evaluate under autocast, as :func:`~annotated_resnet.training.step.choose_precision`."""
    device = next(model.parameters()).device
    if isinstance(images, DeviceBatches):
        batches = images
    else:
        if mean is None or labels is None:
            raise ValueError("evaluate(model, images, labels, mean=...) needs the labels and the per-pixel "
                             "training mean (TrainResult.mean, or data.pixel_mean(train_images))")
        batches = DeviceBatches(images, labels, batch_size, mean, train=False, device=device)
    return count_mistakes(model, batches, precision).item() / len(batches.labels)


@torch.no_grad()
def count_mistakes(model: nn.Module, batches: DeviceBatches, precision: str = "fp32") -> torch.Tensor:
    """How many of ``batches``' images ``model`` (in eval mode) classifies wrongly, as a float
    tensor on the model's device (processes that share out the test images add their counts)."""
    device = next(model.parameters()).device
    _check_labels(batches.labels, model)
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), device=device)
    with autocast(device, precision):
        for x, y in batches:
            wrong += (model(x).argmax(1) != y).sum()
    model.train(was_training)
    return wrong


def _check_labels(labels: torch.Tensor, model: nn.Module) -> None:
    """Labels must index the network's classes (0..9 for CIFAR-10)."""
    classes = getattr(getattr(model, "fc", None), "out_features", None)
    if classes is None or not len(labels):
        return
    lowest, highest = int(labels.min()), int(labels.max())
    if lowest < 0 or highest >= classes:
        raise ValueError(f"labels must lie in 0..{classes - 1}, one per class of the network; got labels from "
                         f"{lowest} to {highest}")
