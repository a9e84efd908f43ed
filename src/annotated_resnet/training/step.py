"""One training step (forward, loss, backward, SGD update), the device it runs on and the
precision it runs in; on a GPU the step is captured once as a CUDA graph and replayed
(:class:`TrainingStep`, given to fastai's ``Learner`` by :class:`StepCallback`); elsewhere
fastai runs the step, in bf16 or fp16 through :class:`Autocast`.

Precision (``--precision``; ``auto`` chooses by hardware): bf16 autocast on GPUs with bf16
tensor cores (compute capability 8.0 and up: A100, L4, H100, RTX 30xx ...); fp16 autocast with
gradient scaling on other CUDA GPUs, such as the T4 of Colab and Kaggle, whose tensor cores
compute in fp16 but not in bf16; fp32 on the CPU. fp16's narrow range makes small gradients
underflow, so the loss is multiplied by a scale before the backward pass and the gradients
divided by it in the update (``torch.amp.GradScaler``); a step whose gradients overflowed is
skipped and the scale halved, and the scale doubles after 2,000 good steps. With the fused
SGD kernel all of that happens on the device, so it fits inside the CUDA graph and the host
never waits for the GPU to learn whether a step was skipped.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelBatchException, CancelStepException
from torch import nn


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


#: Names the device to train on when none is given (``cpu`` keeps a GPU machine on the CPU).
DEVICE_VARIABLE = "ANNOTATED_RESNET_DEVICE"


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else ``$ANNOTATED_RESNET_DEVICE`` if set, else the GPU when there is
    one, else the CPU."""
    if device is None:
        device = os.environ.get(DEVICE_VARIABLE) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return device


def choose_precision(device: torch.device, precision: str = "auto") -> str:
    """``precision`` if it names one (bf16, fp16, fp32); for ``auto``: bf16 on a GPU with bf16
    tensor cores (compute capability 8.0+), fp16 on other CUDA GPUs, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX, as Linux lists its
    features). Without them, bf16 autocast on the CPU is emulated and slow: ResNet-20 trained at
    32 images/s in bf16 against 431 in fp32 on an AVX2-only AMD EPYC (2 threads, batch 128),
    while a CPU with AVX512-BF16 ran bf16 1.5x faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fastest_cpu_precision() -> str:
    """The precision a long CPU run should train in: bf16 where the CPU has it natively, else fp32."""
    return "bf16" if cpu_has_native_bf16() else "fp32"


def slow_precision_warning(device: torch.device, precision: str) -> str | None:
    """A warning when ``precision`` is one this CPU runs slowly, else ``None``."""
    if device.type != "cpu" or precision == "fp32":
        return None
    if precision == "fp16":
        return ("fp16 autocast on a CPU is very slow (30 small iterations took 461 s on an AVX-512 CPU) and needs "
                "gradient scaling; fp32 (or bf16 on a CPU with native bf16) trains far faster")
    if not cpu_has_native_bf16():
        return ("this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated: ResNet-20 trained 13x slower "
                "in bf16 than in fp32 on an AVX2 CPU; --precision fp32 is faster here")
    return None


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The reduced dtype the step computes in on ``device`` (``None``: fp32)."""
    return AUTOCAST_DTYPES[choose_precision(device, precision)]


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of :func:`autocast_dtype` (a do-nothing context for fp32)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()


def describe_precision(device: torch.device, settings: dict, cuda_graph: bool = True) -> str:
    """How a run computed, for its provenance, from its checkpoint's ``settings``: the precision
    (older checkpoints list several, joined by ", then "), the layout, ``torch.compile``, and on a
    GPU whether the step was CUDA-graphed or eager, and that "fp32" convolutions ran in TF32."""
    words = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with gradient scaling"}
    precisions = settings.get("precision") or "fp32"
    parts = [", then ".join(words[p] for p in precisions.split(", then "))]
    if settings.get("channels_last", device.type == "cuda"):
        parts.append("channels_last")
    if settings.get("compile"):
        parts.append("torch.compile")
    if device.type == "cuda":
        if precisions.endswith("fp32") and torch.backends.cudnn.allow_tf32 and \
                torch.cuda.get_device_capability(device) >= (8, 0):  # cuDNN rounds the inputs to TF32's 10 bits
            parts[0] += " (convolutions in TF32, PyTorch's default on GPUs since Ampere)"
        parts.append(f"{'CUDA-graphed' if cuda_graph else 'eager'} step")
    return "; ".join(parts)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """The gradient scaler that fp16 needs (``None`` for bf16 and fp32, whose range is fp32's)."""
    return torch.amp.GradScaler(device.type) if choose_precision(device, precision) == "fp16" else None


class TrainingStep:
    """Forward pass, cross-entropy loss, backward pass and SGD update for one batch.

    It runs under :func:`autocast` in the chosen precision; for fp16, ``scaler`` (a
    ``torch.amp.GradScaler``, a new one by default) scales the loss. On a CUDA device, after
    ``eager_steps`` ordinary steps, it runs as a CUDA graph: a ResNet-20 step at batch 128 is a
    few hundred small kernels, and launching them one by one from Python takes longer than the
    GPU needs to run them, while a captured graph launches them all at once. The graph reads
    each batch from fixed input tensors and the learning rate from a device tensor, so the
    schedule still holds; the optimizer must be SGD with ``fused=True`` (one kernel that takes
    its rate from that tensor, and the scale and the overflow flag from the scaler's tensors).
    The eager steps before the capture let CUDA libraries set themselves up, on a side stream
    as PyTorch's CUDA-graph notes ask. A fused optimizer takes its rate from the device tensor
    in the eager steps too, so that the CPU runs the very code the graph captures.
    """

    def __init__(self, model: nn.Module, loss_func, optimizer: torch.optim.Optimizer, device: torch.device,
                 graph: bool | None = None, eager_steps: int = 3, precision: str = "auto",
                 scaler: torch.amp.GradScaler | None = None):
        self.model, self.loss_func, self.optimizer, self.device = model, loss_func, optimizer, device
        self.precision = choose_precision(device, precision)
        self.scaler = scaler if scaler is not None else grad_scaler(device, self.precision)
        self.cuda = device.type == "cuda"
        self.graph = self.cuda if graph is None else graph
        fused = all(g.get("fused") for g in optimizer.param_groups)
        if self.graph and not self.cuda:
            raise ValueError("CUDA graphs need a CUDA device; use graph=False on the CPU")
        if self.graph and not fused:
            raise ValueError("a graphed step needs torch.optim.SGD(..., fused=True), whose update reads the "
                             "learning rate from a device tensor")
        if self.scaler is not None and not fused:
            raise ValueError("gradient scaling without a host sync needs torch.optim.SGD(..., fused=True), whose "
                             "update takes the scale and the overflow flag from device tensors")
        if self.scaler is not None:
            zero_momentum_buffers(optimizer)
        self.rate = torch.zeros((), device=device) if fused else None  # the rate a fused update reads
        self.rate_value = None
        self.eager_steps, self.steps = eager_steps, 0
        self.captured = None  # the CUDA graph, once captured
        self.side_stream = torch.cuda.Stream(device) if self.cuda else None  # a capture may not use the default stream

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at learning rate ``lr``; returns the predictions and the (detached, unscaled)
        loss. In graph mode both are the graph's output tensors, overwritten by the next step."""
        self.steps += 1
        if self.graph and self.captured is None and self.steps > self.eager_steps:
            self._capture(images, labels)
        self._set_rate(lr)
        if not self.graph:
            return self._eager(images, labels)
        if self.steps <= self.eager_steps:
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side_stream):
                outputs = self._eager(images, labels)
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
            return outputs
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.captured.replay()
        return self.pred, self.loss

    def _set_rate(self, lr: float) -> None:
        """The coming update's learning rate: written into the device tensor (only when it
        changes, at a milestone or the warm-up's end) for a fused optimizer, else into its groups."""
        if self.rate is None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        elif lr != self.rate_value:
            self.rate.fill_(lr)
            self.rate_value = lr

    @contextlib.contextmanager
    def _rate_from_tensor(self):
        """Inside: a fused optimizer's groups read the rate from :attr:`rate`; after: they hold
        a number again, for whoever reads the optimizer's hyperparameters (fastai, checkpoints)."""
        groups = self.optimizer.param_groups
        numbers = [g["lr"] for g in groups]
        if self.rate is not None:
            for group in groups:
                group["lr"] = self.rate
        try:
            yield
        finally:
            for group, number in zip(groups, numbers):
                group["lr"] = number

    def _forward_backward(self, images, labels):
        with autocast(self.device, self.precision):
            pred = self.model(images)
            loss = self.loss_func(pred.float(), labels)
        with self._rate_from_tensor():
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:  # the fused update unscales, and skips the step if a gradient overflowed
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
        return pred.detach(), loss.detach()

    def _eager(self, images, labels):
        outputs = self._forward_backward(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        return outputs

    def _capture(self, images, labels):
        self.images, self.labels = torch.empty_like(images), torch.empty_like(labels)
        self.optimizer.zero_grad(set_to_none=True)  # the graph owns the gradients it computes
        self.captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.captured, stream=self.side_stream):
            self.pred, self.loss = self._forward_backward(self.images, self.labels)


def zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter a zero momentum buffer before the first update. The fused kernel
    otherwise creates the buffers at the first step and, if gradient scaling skips that step,
    leaves them uninitialised; from zero, the first update's buffer is the gradient, as
    SGD's first step makes it."""
    for group in optimizer.param_groups:
        if group["momentum"]:
            for param in group["params"]:
                optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


# --- The step inside fastai's Learner ---


#: The batch events the CUDA-graphed step runs inside its graph, where no callback can run.
GRAPHED_EVENTS = ("after_pred", "after_loss", "before_backward", "after_backward", "before_step", "after_step")


class StepCallback(Callback):
    """On a GPU, runs each training batch as one CUDA-graphed :class:`TrainingStep` in place of
    fastai's own forward/backward/step, then lets fastai's loop go on (its ``after_batch``
    callbacks, validation, metrics) as if fastai had done the step: the standard way to give a
    fastai ``Learner`` a custom training step (raise ``CancelBatchException`` from ``before_batch``).
    Callbacks of the events inside the graph would never run, so they are refused."""

    order = 8  # after PaperSchedule (5) has set the learning rate

    def __init__(self, precision: str = "auto", scaler=None, eager_steps: int = 3):
        self.precision, self.scaler, self.eager_steps = precision, scaler, eager_steps

    def before_fit(self):
        check_graph_callbacks(self.learn.cbs, self.order)
        device = next(self.model.parameters()).device
        self.training_step = TrainingStep(self.model, self.loss_func, self.opt.opt, device, graph=True,
                                          eager_steps=self.eager_steps, precision=self.precision, scaler=self.scaler)

    def before_batch(self):
        if not self.training:
            return
        self.learn.pred, self.learn.loss = self.training_step(self.xb[0], self.yb[0], self.opt.hypers[-1]["lr"])
        raise CancelBatchException()

    def after_fit(self):
        self.training_step = None  # the graph and its memory pool go with it


def check_graph_callbacks(callbacks, step_order: int) -> None:
    """Refuse callbacks whose events the graphed step would skip: any of :data:`GRAPHED_EVENTS`,
    or ``before_batch`` ordered after the step."""
    skipped = []
    for cb in callbacks:
        if isinstance(cb, StepCallback):
            continue
        events = [e for e in GRAPHED_EVENTS if _defines(cb, e)]
        if _defines(cb, "before_batch") and cb.order > step_order:
            events.insert(0, "before_batch")
        if events:
            skipped.append(f"{type(cb).__name__} ({', '.join(events)})")
    if skipped:
        raise ValueError(
            f"the CUDA-graphed training step runs forward, loss, backward and update in one graph, so these callbacks "
            f"would never see these events: {'; '.join(skipped)}. Train with cuda_graph=False (--no-cuda-graph) to "
            "let fastai run every event of the batch, or leave them out (for bf16 or fp16 use precision=..., "
            "not learn.to_fp16()).")


def _defines(cb, event: str) -> bool:
    """Whether ``cb``'s class (not fastai's ``Callback`` itself) defines the method ``event``."""
    return any(event in vars(klass) for klass in type(cb).__mro__ if klass not in (Callback, object))


class Autocast(Callback):
    """The training batches' forward pass and loss in bf16 or fp16 autocast (on a CPU too), and
    fp16's gradient scaling (the loss scaled before the backward pass, the update unscaled and
    skipped where a gradient overflowed); validation stays in fp32. fastai's ``MixedPrecision``
    does the same on CUDA devices only."""

    order = 10  # as fastai's MixedPrecision: after PaperSchedule, before other callbacks' batch events

    def __init__(self, device: torch.device, precision: str, scaler=None):
        self.device, self.precision, self.scaler = device, precision, scaler
        self.context = None

    def before_fit(self):
        if self.scaler is not None:
            zero_momentum_buffers(self.opt.opt)

    def before_batch(self):
        if self.training:
            self.context = autocast(self.device, self.precision)
            self.context.__enter__()

    def after_pred(self):
        if self.context is not None:
            self.learn.pred = self.pred.float()

    def after_loss(self):
        if self.context is not None:
            self.context.__exit__(None, None, None)
            self.context = None

    def before_backward(self):
        if self.scaler is not None:
            self.learn.loss_grad = self.scaler.scale(self.loss_grad)

    def before_step(self):
        if self.scaler is not None:  # the scaler's step unscales (and skips an overflowed update) in place of fastai's
            self.scaler.step(self.opt.opt)
            self.scaler.update()
            raise CancelStepException()
