"""Sec. 4.2's analysis: Fig. 7 (the standard deviation of layer responses) and the reference
runs that Fig. 6, Table 6 and Fig. 7 are read from.

Sec. 4.2 ("Analysis of Layer Responses") measures, for each 3x3 convolutional layer, the
standard deviation of its output after BN and before the nonlinearity (the ReLU, or the
addition of the shortcut in a residual block). The paper finds ResNets' responses generally
smaller than plain nets', and reads that as support for residual functions that "might be
generally closer to zero" and for identity mappings as a reasonable preconditioning
(Sec. 3.1). Here the responses are read by forward hooks on the BN layers that follow 3x3
convolutions, on test images (the paper does not say which images), in eval mode.

The networks measured at full scale are the reference runs the package ships
(:mod:`annotated_resnet.reference_runs`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import BasicBlock, Bottleneck, ResNet


def three_by_three_responses(model: ResNet) -> list[tuple[str, nn.BatchNorm2d]]:
    """``(name, bn)`` for every BN layer that follows a 3x3 convolution, in forward order:
    the CIFAR stem's ``bn1`` and, in each block, the BN after each 3x3 conv."""
    if not isinstance(model, ResNet):
        raise TypeError(f"expected an annotated_resnet.ResNet, got {type(model).__name__}")
    pairs = [("bn1", model.conv1, model.bn1)]
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            if isinstance(block, BasicBlock):
                convs = [("conv1", "bn1"), ("conv2", "bn2")]
            elif isinstance(block, Bottleneck):
                convs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
            else:
                raise TypeError(f"unexpected block {type(block).__name__} in stage {s + 1}")
            pairs += [(f"layer{s + 1}.{b}.{bn}", getattr(block, conv), getattr(block, bn)) for conv, bn in convs]
    return [(name, bn) for name, conv, bn in pairs if conv.kernel_size == (3, 3)]


def layer_response_std(model: ResNet, images: torch.Tensor, batch_size: int = 500) -> list[float]:
    """Fig. 7: the standard deviation of each 3x3 layer's response (after BN, before ReLU or
    addition), over all images, channels and positions, in forward order.

    ``images`` is a float batch (N, 3, 32, 32) already normalized as for the network
    (per-pixel mean subtracted, :func:`annotated_resnet.data.normalize`).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("expected a normalized float batch (N, 3, H, W); build it with "
                         "annotated_resnet.data.normalize(to_tensor(uint8_images), mean)")
    layers = three_by_three_responses(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    squares = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def record(index):
        def hook(module, inputs, output):
            out = output.detach().double()
            sums[index] += out.sum().cpu()
            squares[index] += out.square().sum().cpu()
            counts[index] += out.numel()
        return hook

    hooks = [bn.register_forward_hook(record(i)) for i, (_, bn) in enumerate(layers)]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    mean = sums / counts
    variance = squares / counts - mean.square()
    return variance.clamp_min(0).sqrt().tolist()
