"""One training step (forward, loss, backward, SGD update), the device it runs on and the
precision it runs in; on a GPU the step is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the GPU when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision a training step runs in on ``device``: bf16 on a GPU with bf16
    tensor cores (compute capability 8.0 and up: A100, H100, L4, RTX 30xx ...), none (fp32) on
    the CPU and on older GPUs such as Colab's T4, which have no bf16 hardware (torch emulates
    it there, which adds rounding but no speed)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return None


def autocast(device: torch.device):
    """The autocast context of :func:`autocast_dtype` (a do-nothing context for fp32)."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()


class TrainingStep:
    """Forward pass, cross-entropy loss, backward pass and SGD update for one batch.

    On the CPU it runs eagerly in fp32. On a CUDA device it runs under :func:`autocast` (bf16
    where the GPU has bf16 tensor cores, else fp32) and, after ``eager_steps`` ordinary steps,
    as a CUDA graph: a ResNet-20 step at batch 128 is a few hundred small kernels, and
    launching them one by one from Python takes longer than the GPU needs to run them, while a
    captured graph launches them all at once. The graph
    reads each batch from fixed input tensors and the learning rate from a device tensor, so
    the schedule still holds; the optimizer must be SGD with ``fused=True`` (one kernel that
    takes its rate from that tensor). The eager steps before the capture let CUDA libraries
    set themselves up, on a side stream as PyTorch's CUDA-graph notes ask.
    """

    def __init__(self, model: nn.Module, loss_func, optimizer: torch.optim.Optimizer, device: torch.device,
                 graph: bool | None = None, eager_steps: int = 3):
        self.model, self.loss_func, self.optimizer, self.device = model, loss_func, optimizer, device
        self.cuda = device.type == "cuda"
        self.graph = self.cuda if graph is None else graph
        if self.graph and not self.cuda:
            raise ValueError("CUDA graphs need a CUDA device; use graph=False on the CPU")
        if self.graph and not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("a graphed step needs torch.optim.SGD(..., fused=True), whose update reads the "
                             "learning rate from a device tensor")
        self.eager_steps, self.steps = eager_steps, 0
        self.captured = None  # the CUDA graph, once captured
        self.side_stream = torch.cuda.Stream(device) if self.cuda else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at learning rate ``lr``; returns the predictions and the (detached) loss.
        In graph mode both are the graph's output tensors, overwritten by the next step."""
        self.steps += 1
        if not self.graph:
            return self._eager(images, labels, lr)
        if self.steps <= self.eager_steps:
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side_stream):
                outputs = self._eager(images, labels, lr)
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
            return outputs
        if self.captured is None:
            self._capture(images, labels)
        self.images.copy_(images)
        self.labels.copy_(labels)
        if lr != self.lr_value:
            self.lr.fill_(lr)
            self.lr_value = lr
        self.captured.replay()
        return self.pred, self.loss

    def _forward_backward(self, images, labels):
        with autocast(self.device):
            pred = self.model(images)
            loss = self.loss_func(pred.float(), labels)
        loss.backward()
        self.optimizer.step()
        return pred.detach(), loss.detach()

    def _eager(self, images, labels, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        outputs = self._forward_backward(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        return outputs

    def _capture(self, images, labels):
        self.images, self.labels = torch.empty_like(images), torch.empty_like(labels)
        self.lr, self.lr_value = torch.zeros((), device=self.device), 0.0
        groups = self.optimizer.param_groups
        rates = [g["lr"] for g in groups]
        for group in groups:
            group["lr"] = self.lr  # the captured update reads the rate from this tensor
        self.optimizer.zero_grad(set_to_none=True)  # the graph owns the gradients it computes
        self.captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.captured):
            self.pred, self.loss = self._forward_backward(self.images, self.labels)
        for group, rate in zip(groups, rates):
            group["lr"] = rate
