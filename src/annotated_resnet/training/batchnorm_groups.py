"""Batch norm as the paper's two GPUs computed it, on one device: each batch of 128 normalised as
two groups of 64, each with its own statistics (Sec. 4.2: "a mini-batch size of 128 on two GPUs";
each GPU normalised the 64 images it held)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that, in training, normalises each of ``groups`` equal parts of the batch with
    that part's own statistics, as ``groups`` GPUs each normalise their share of a data-parallel
    batch. The running statistics follow the first group only, as a data-parallel run keeps the
    first process's. Same parameters and buffers as ``nn.BatchNorm2d``, so weights load either
    way; in eval mode it is ``nn.BatchNorm2d``."""

    def __init__(self, num_features: int, groups: int = 2, **kwargs):
        super().__init__(num_features, **kwargs)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.groups == 1:
            return super().forward(x)
        if len(x) % self.groups:
            raise ValueError(f"a batch of {len(x)} does not split into {self.groups} equal groups for batch norm; "
                             f"use a batch size divisible by {self.groups}")
        self.num_batches_tracked.add_(1)
        first, *rest = x.chunk(self.groups)
        normalise = partial(nn.functional.batch_norm, weight=self.weight, bias=self.bias, training=True, eps=self.eps)
        return torch.cat([normalise(first, self.running_mean, self.running_var, momentum=self.momentum),
                          *(normalise(part, None, None) for part in rest)])


def group_batchnorm(model: nn.Module, groups: int) -> nn.Module:
    """``model`` with every ``nn.BatchNorm2d`` replaced by a :class:`GroupedBatchNorm2d` of
    ``groups`` groups holding the same parameters and buffers (in place; returns ``model``)."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            grouped = GroupedBatchNorm2d(child.num_features, groups, eps=child.eps, momentum=child.momentum)
            grouped.load_state_dict(child.state_dict())
            setattr(model, name, grouped.to(child.weight.device))
        else:
            group_batchnorm(child, groups)
    return model
