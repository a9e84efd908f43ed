"""Training on CIFAR-10 with the paper's recipe (Sec. 4.2), driven by fastai's ``Learner``.

The recipe, in the paper's words turned into numbers: SGD with momentum 0.9 and weight decay
1e-4, mini-batches of 128, learning rate 0.1 divided by 10 at 32k and 48k iterations, stop at
64k iterations, on a 45k/5k train/validation split; the 110-layer net warms up at 0.01 until
its training error is below 80% (Sec. 4.2). The schedule counts iterations, not epochs.

What is ours and what is fastai's: fastai's ``Learner`` runs the loop (epochs, validation,
metrics, the progress bar, callbacks); its ``ChannelsLast`` and ``MixedPrecision`` (bf16)
callbacks speed up a GPU (bf16 only where the GPU computes in it: :func:`autocast_dtype`).
The data loader is a small iterable that keeps the uint8 images on the training device and
builds each batch there (shuffle, pad-crop-flip, mean subtraction: :mod:`annotated_resnet.data`).
Three callbacks add what the paper's recipe, a long run and a fast GPU need:
:class:`PaperSchedule` (the iteration-based learning rate and the warm-up), :class:`StepCallback`
(each training step as one :class:`TrainingStep`, replayed as a CUDA graph on a GPU) and
:class:`RunRecorder` (per-epoch JSON-lines log, atomic checkpoints with every random state,
exact resume, clean stop on SIGTERM/Ctrl-C, stop on a non-finite loss).

Nothing in a training step waits for the GPU: the loss statistics stay on the device and the
host reads them only at an epoch's end, every :data:`CHECK_EVERY` steps, when the progress
bar redraws and (during the 110-layer warm-up only) after every step, so the host can queue
the next steps while the GPU runs this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

# fastai's import scripts a function with torch.jit, which recent torch versions flag as deprecated
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback, CancelBatchException, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import AvgSmoothLoss, Learner
from fastai.metrics import error_rate
from fastai.optimizer import OptimWrapper
from torch import nn

from .data import CIFAR10, augment, balanced_subset, normalize, pixel_mean, to_tensor, train_val_split
from .model import CIFAR_DEPTHS, CIFAR_PLAIN_DEPTHS, ResNet, cifar_resnet, create_model

CIFAR_MODEL_NAMES = [f"resnet{d}" for d in CIFAR_DEPTHS] + [f"plain{d}" for d in CIFAR_PLAIN_DEPTHS]
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1  # the layout of the dict that checkpoint.pt holds
LOG_NAME = "log.jsonl"
#: The split and the data subsets are chosen with this seed whatever the run's seed, so that
#: runs with different seeds see the same images and differ only in initialisation and order.
DATA_SEED = 0
#: On a GPU, the host checks the loss for NaN/inf every this many steps (and before every
#: checkpoint); reading it every step would make the host wait for the GPU at every step.
CHECK_EVERY = 100


# --- The recipe (Sec. 4.2) ---


@dataclass(frozen=True)
class Recipe:
    """Every number of Sec. 4.2's CIFAR-10 training, for one model."""

    model: str
    iterations: int = 64_000
    batch_size: int = 128
    lr: float = 0.1
    milestones: tuple[int, ...] = (32_000, 48_000)
    lr_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    validation: int = 5_000
    warmup_lr: float | None = None
    warmup_until_error: float = 0.8
    paper_iterations: int = 64_000

    def __post_init__(self):
        if self.iterations < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"iterations, batch_size and lr must be positive; got {self.iterations}, "
                             f"{self.batch_size}, {self.lr}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def lr_at(self, iteration: int, warmed_up: bool = True) -> float:
        """The learning rate of one iteration: the warm-up rate until the training error
        first drops below ``warmup_until_error``, then ``lr`` times ``lr_factor`` for every
        milestone passed."""
        if self.warmup_lr is not None and not warmed_up:
            return self.warmup_lr
        return self.lr * self.lr_factor ** sum(iteration >= m for m in self.milestones)

    def scaled(self, iterations: int | None = None, batch_size: int | None = None,
               validation: int | None = None, lr: float | None = None) -> Recipe:
        """The same schedule shortened (or lengthened) to ``iterations``: the milestones keep
        their place as a fraction of the run (32k and 48k of 64k are 1/2 and 3/4)."""
        changes = {"batch_size": batch_size, "validation": validation, "lr": lr}
        changes = {k: v for k, v in changes.items() if v is not None}
        if iterations is not None:
            changes["iterations"] = iterations
            changes["milestones"] = tuple(round(m * iterations / self.iterations) for m in self.milestones)
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line that says how far this recipe is from the paper's."""
        scale = "the paper's full schedule" if self.iterations == self.paper_iterations else (
            f"{self.iterations / self.paper_iterations:.3g}x the paper's {self.paper_iterations:,} iterations")
        warmup = f", warm-up at lr {self.warmup_lr} until training error < {self.warmup_until_error:.0%}" \
            if self.warmup_lr is not None else ""
        split = f"{self.validation:,} held out for validation" if self.validation else "no validation split"
        return (f"{self.model}: {self.iterations:,} iterations of batch {self.batch_size} ({scale}), lr {self.lr} "
                f"x{self.lr_factor} at {list(self.milestones)}{warmup}, momentum {self.momentum}, "
                f"weight decay {self.weight_decay}, {split}")


def paper_recipe(name: str) -> Recipe:
    """Sec. 4.2's recipe for a CIFAR-10 net by name (resnet20 ... resnet1202, plain20 ...
    plain110); the 110- and 1202-layer nets get the warm-up at lr 0.01."""
    if name not in CIFAR_MODEL_NAMES:
        raise ValueError(f"no CIFAR-10 recipe for {name!r}; valid names: {', '.join(CIFAR_MODEL_NAMES)}")
    depth = int(name.removeprefix("resnet").removeprefix("plain"))
    return Recipe(model=name, warmup_lr=0.01 if depth >= 110 else None)


# --- Batches built on the device ---


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


# --- One training step ---


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


def sgd(params, recipe: Recipe, lr: float | None = None) -> torch.optim.SGD:
    """Sec. 4.2's optimizer: SGD with the recipe's momentum and weight decay, at ``lr`` (the
    recipe's by default); on a GPU one fused kernel updates every parameter."""
    params = list(params)
    return torch.optim.SGD(params, lr=recipe.lr if lr is None else lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, fused=params[0].is_cuda)


def _fastai_sgd(params, lr, recipe: Recipe) -> OptimWrapper:
    """:func:`sgd` wrapped for fastai's ``Learner`` (its ``opt_func``)."""
    return OptimWrapper(opt=sgd(params, recipe, lr))


# --- The callbacks ---


class StepCallback(Callback):
    """Runs each training batch as one :class:`TrainingStep` in place of fastai's own
    forward/backward/step, then lets fastai's loop go on (its ``after_batch`` callbacks,
    validation, metrics) as if fastai had done the step: the standard way to give a fastai
    ``Learner`` a custom training step (raise ``CancelBatchException`` from ``before_batch``)."""

    order = 8  # after PaperSchedule (5) has set the learning rate; before MixedPrecision (10)

    def __init__(self, graph: bool | None = None):
        self.graph = graph

    def before_fit(self):
        device = next(self.model.parameters()).device
        self.training_step = TrainingStep(self.model, self.loss_func, self.opt.opt, device, self.graph)

    def before_batch(self):
        if not self.training:
            return
        self.learn.pred, self.learn.loss = self.training_step(self.xb[0], self.yb[0], self.opt.hypers[-1]["lr"])
        raise CancelBatchException()


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss, kept on the training device (fastai's own copies
    the loss to the CPU after every batch, which makes the host wait for the GPU)."""

    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss.detach().float().mean()
        self.val = torch.lerp(loss, self.val.to(loss.device), self.beta)


class LazyProgress(ProgressCallback):
    """fastai's progress bar, with the smoothed loss read from the device at most once a
    second instead of after every batch."""

    def before_train(self):
        super().before_train()
        self.loss_read_at = 0.0

    def after_batch(self):
        self.pbar.update(self.iter + 1)
        now = time.monotonic()
        if self.training and hasattr(self.learn, "smooth_loss") and now - self.loss_read_at > 1:
            self.pbar.comment = f"{self.smooth_loss.item():.4f}"
            self.loss_read_at = now


class PaperSchedule(Callback):
    """Sets the learning rate before every training iteration from the recipe's
    iteration-based schedule; ends the warm-up (Sec. 4.2, 110 layers) once the training
    error, smoothed over recent batches, is below the recipe's threshold."""

    order = 5

    def __init__(self, recipe: Recipe, run: RunState):
        self.recipe, self.run = recipe, run

    def before_batch(self):
        if self.training:
            self.opt.set_hypers(lr=self.recipe.lr_at(self.run.iteration, self.run.warmed_up))

    def after_batch(self):
        if not self.training or self.run.warmed_up:
            return
        batch_error = (self.pred.argmax(1) != self.yb[0]).float().mean().item()
        self.run.smoothed_error = 0.9 * self.run.smoothed_error + 0.1 * batch_error
        if self.run.smoothed_error < self.recipe.warmup_until_error:
            self.run.warmed_up = True


@dataclass
class RunState:
    """Where a run stands: everything besides the model, optimizer and loader states that a
    checkpoint stores."""

    iteration: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    warmed_up: bool = True
    smoothed_error: float = 1.0
    seconds: float = 0.0
    loss_sum: float = 0.0
    error_sum: float = 0.0
    history: list = field(default_factory=list)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class RunRecorder(Callback):
    """Per-epoch statistics, the JSON-lines log, checkpoints, and the run's clean ends.

    After every training batch it adds loss and error to running sums on the device and
    honours a stop request by saving a checkpoint at that very batch. It stops the run on a
    non-finite loss, keeping the last good checkpoint: on the CPU it looks after every batch,
    on a GPU every :data:`CHECK_EVERY` batches and before every checkpoint. After every epoch
    it evaluates the test set (and takes the validation error from fastai's validation pass),
    appends a record to ``log.jsonl`` and writes the checkpoint.
    """

    order = 55  # after fastai's Recorder (50), which has the validation error by then

    def __init__(self, run: RunState, trainer: _Trainer):
        self.run, self.trainer = run, trainer
        self.check_every = 1 if trainer.device.type == "cpu" else CHECK_EVERY
        self.stop_signal: int | None = None  # set by the SIGTERM / Ctrl-C handler
        self.stopped: str | None = None
        self.failure: str | None = None

    def before_fit(self):
        self.started = time.perf_counter() - self.run.seconds

    def before_epoch(self):
        self.loss_sum = torch.tensor(self.run.loss_sum, device=self.trainer.device)
        self.error_sum = torch.tensor(self.run.error_sum, device=self.trainer.device)
        self.checked_iteration = self.run.iteration

    def after_batch(self):
        if not self.training:
            return
        self.loss_sum += self.loss.detach().float() * len(self.yb[0])
        self.error_sum += (self.pred.argmax(1) != self.yb[0]).sum()
        self.run.iteration += 1
        self.run.batches_in_epoch += 1
        if self.run.iteration - self.checked_iteration >= self.check_every:
            self.check_finite()
        if self.stop_signal is not None and self.run.iteration < self.trainer.recipe.iterations:
            # (on the run's last batch the epoch's end comes next and saves the finished run)
            self.check_finite()
            self.trainer.save(self.run_state_now())
            self.stopped = f"{signal.Signals(self.stop_signal).name} at iteration {self.run.iteration}"
            raise CancelFitException()

    def check_finite(self):
        """Stop the run if the loss of any step since the last check was NaN or infinite (the
        running sum of the epoch's losses is then no longer finite)."""
        if not torch.isfinite(self.loss_sum):
            path = self.trainer.checkpoint_path
            where = ("nothing is saved" if path is None else
                     f"no checkpoint was written yet (the first is written after the first epoch)"
                     if not path.exists() else
                     f"the last good checkpoint, {path} (iteration {self.trainer.saved_iteration}), is kept")
            first, last = self.checked_iteration + 1, self.run.iteration
            when = f"iteration {last}" if first == last else f"one of iterations {first}-{last}"
            self.failure = (
                f"the training loss became {self.loss_sum.item()} at {when} (lr {self.opt.hypers[-1]['lr']:g}); "
                f"the run stops and {where}. A smaller learning rate (--lr) or the warm-up of Sec. 4.2 "
                "usually helps.")
            raise NonFiniteLossError(self.failure)
        self.checked_iteration = self.run.iteration

    def run_state_now(self) -> RunState:
        self.run.seconds = time.perf_counter() - self.started
        self.run.loss_sum, self.run.error_sum = self.loss_sum.item(), self.error_sum.item()
        return self.run

    def after_epoch(self):
        self.check_finite()
        run = self.run_state_now()
        images = max(1, run.batches_in_epoch * self.trainer.recipe.batch_size)
        fastai_error = float(self.learn.final_record[-1])  # error_rate on dls.valid
        has_split = self.trainer.has_validation
        record = {
            "epoch": run.epoch + 1,
            "iteration": run.iteration,
            "train_loss": round(run.loss_sum / images, 6),
            "train_error": round(run.error_sum / images, 6),
            "val_error": round(fastai_error, 6) if has_split else None,
            "test_error": round(self.trainer.test_error() if has_split else fastai_error, 6),
            "lr": float(f"{self.opt.hypers[-1]['lr']:.6g}"),
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        run.history.append(record)
        run.seconds = record["seconds"]
        run.epoch += 1
        run.batches_in_epoch, run.loss_sum, run.error_sum = 0, 0.0, 0.0
        self.trainer.save(run)


# --- Training ---


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (in eval mode), the per-epoch history,
    the recipe, the per-pixel mean to evaluate with, the run folder, and why it stopped
    early (``None`` when it ran to the end)."""

    model: nn.Module
    history: list[dict]
    recipe: Recipe
    mean: torch.Tensor
    out: Path | None = None
    stopped: str | None = None


def describe_model(model: ResNet) -> dict:
    """The arguments of :func:`cifar_resnet` that rebuild ``model`` (for checkpoints)."""
    if not isinstance(model, ResNet) or model.stem != "cifar":
        raise ValueError("training here is for the CIFAR-10 networks of Sec. 4.2 (cifar_resnet / resnet20 ...); "
                         f"got {type(model).__name__}")
    return {"depth": 6 * len(model.layer1) + 2, "shortcut": model.shortcut, "base_width": model.conv1.out_channels}


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


class _Trainer:
    """Holds one run's data, model, learner and run folder for the callbacks."""

    def __init__(self, model, cifar: CIFAR10, recipe: Recipe, train_per_class, test_per_class, seed, device, out):
        self.recipe, self.seed, self.device = recipe, seed, device
        self.out = Path(out) if out is not None else None
        self.checkpoint_path = self.out / CHECKPOINT_NAME if self.out else None
        self.saved_iteration = 0
        images, labels = cifar.train_images, cifar.train_labels
        self.has_validation = recipe.validation > 0
        if self.has_validation:
            images, labels, val_images, val_labels = train_val_split(images, labels, recipe.validation, DATA_SEED)
        if train_per_class is not None:
            images, labels = balanced_subset(images, labels, train_per_class, DATA_SEED)
        test_images, test_labels = cifar.test_images, cifar.test_labels
        if test_per_class is not None:
            test_images, test_labels = balanced_subset(test_images, test_labels, test_per_class, DATA_SEED)
        self.mean = pixel_mean(images)
        self.train_batches = DeviceBatches(images, labels, recipe.batch_size, self.mean, True, seed, device)
        eval_batch = max(recipe.batch_size, 5_000 if device.type == "cuda" else 1_000)
        self.test_batches = DeviceBatches(test_images, test_labels, eval_batch, self.mean, False, device=device)
        self.valid_batches = (DeviceBatches(val_images, val_labels, eval_batch, self.mean, False, device=device)
                              if self.has_validation else self.test_batches)
        self.model = model.to(device)
        self.data = {"source": cifar.source, "train_images": len(labels), "test_images": len(test_labels),
                     "validation_images": recipe.validation, "train_per_class": train_per_class,
                     "test_per_class": test_per_class, "data_seed": DATA_SEED}

    def test_error(self) -> float:
        """Error on the test images (the full test set, or its class-balanced subset)."""
        return evaluate(self.model, self.test_batches)

    def save(self, run: RunState) -> None:
        """Write the checkpoint atomically: a temporary file in the run folder, then
        ``os.replace``, so the folder always holds a complete checkpoint."""
        if self.out is None:
            return
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "model": describe_model(self.model), "seed": self.seed,
            "recipe": dataclasses.asdict(self.recipe), "data": self.data, "pixel_mean": self.mean.cpu(),
            "model_state": self.model.state_dict(), "optimizer_state": self.learn.opt.state_dict(),
            "run": dataclasses.asdict(run),
            "loader": self.train_batches.state(run.batches_in_epoch),
            "torch_rng": torch.get_rng_state(),
        }
        atomic_save(checkpoint, self.checkpoint_path)
        write_log(self.out / LOG_NAME, run.history)
        self.saved_iteration = run.iteration


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        torch.save(obj, tmp)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def write_log(path: Path, history: list[dict]) -> None:
    """The history as JSON lines, one epoch a line, rewritten whole and atomically right after
    each checkpoint (a reader never sees a half-written log)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.writelines(json.dumps(record) + "\n" for record in history)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`train`, loaded with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}; `annotated-resnet train` writes "
                                f"<out>/{CHECKPOINT_NAME}")
    expected = f"expected a {CHECKPOINT_NAME} written by `annotated-resnet train` (or train(..., out=...))"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, another format, or a pickle with arbitrary objects
        raise ValueError(f"{str(path)!r} cannot be read as a checkpoint ({type(error).__name__}); {expected}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this package (format {CHECKPOINT_FORMAT}); "
                         f"{expected}. A bare state_dict loads with model.load_state_dict(torch.load(path, weights_only=True)).")
    return checkpoint


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """The CIFAR-10 net a checkpoint describes, with the checkpoint's weights."""
    model = cifar_resnet(**checkpoint["model"])
    model.load_state_dict(checkpoint["model_state"])
    return model


def _check_same_run(checkpoint: dict, trainer: _Trainer, out) -> None:
    """A resumed run must continue the run it resumes: the same model, recipe, seed and data
    (the data's path may change; what was taken from it may not)."""
    now = {"model": describe_model(trainer.model), "recipe": dataclasses.asdict(trainer.recipe),
           "seed": trainer.seed, "data": {k: v for k, v in trainer.data.items() if k != "source"}}
    saved = {**{k: checkpoint[k] for k in ("model", "recipe", "seed")},
             "data": {k: v for k, v in checkpoint["data"].items() if k != "source"}}
    changed = [f"{key}: {saved[key]} then, {now[key]} now" for key in now if saved[key] != now[key]]
    if changed:
        raise ValueError(f"the checkpoint in {str(out)!r} is another run ({'; '.join(changed)}); resume with "
                         "the settings it was started with, or choose another output folder")


def _signal_handlers(recorder: RunRecorder):
    """Route SIGTERM and Ctrl-C (SIGINT) to a stop request at the end of the current batch.
    A second Ctrl-C interrupts at once (the last checkpoint stays). Returns a function that
    restores the previous handlers (only the main thread can have any)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def request_stop(signum, frame):
        if recorder.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a new checkpoint
        recorder.stop_signal = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, handler) for s, handler in previous.items()]


def train(model: str | nn.Module, cifar: CIFAR10, recipe: Recipe, *, train_per_class: int | None = None,
          test_per_class: int | None = None, seed: int = 0, progress: bool = True,
          out: str | os.PathLike | None = None, resume: bool = False, device: str | None = None,
          compile: bool = False, cuda_graph: bool = True, cbs: list | None = None) -> TrainResult:
    """Train ``model`` (a CIFAR-10 net or its name) on ``cifar`` with ``recipe``.

    ``seed`` seeds the order of the batches and the augmentation, and the initialisation when
    ``model`` is a name (a net built beforehand keeps its weights: seed before building it).
    ``train_per_class`` / ``test_per_class`` take class-balanced subsets (small scales);
    ``out`` is the run folder for ``log.jsonl`` and ``checkpoint.pt`` (none if ``None``);
    ``resume`` continues from that folder's checkpoint (which must exist, and be of the same
    model, recipe, seed and data) and reaches the same weights as an uninterrupted run. On a CUDA device training uses channels_last, a CUDA-graphed step
    (``cuda_graph=False`` runs it eagerly) and bf16 autocast where the GPU has bf16 tensor
    cores (:func:`autocast_dtype`; fp32 on older GPUs), and ``compile=True`` adds
    ``torch.compile``; on the CPU it runs in fp32.
    """
    device = choose_device(device)
    torch.manual_seed(seed)
    model = create_model(model) if isinstance(model, str) else model
    checkpoint = None
    if out is not None and (Path(out) / CHECKPOINT_NAME).exists():
        if not resume:
            raise FileExistsError(f"{str(out)!r} already holds a run; resume it (--resume / resume=True) "
                                  "or choose another output folder")
        checkpoint = load_checkpoint(out)
    elif resume:
        raise FileNotFoundError(f"nothing to resume: no {CHECKPOINT_NAME} in {str(out)!r}; "
                                "drop --resume (resume=False) to start a new run there")
    trainer = _Trainer(model, cifar, recipe, train_per_class, test_per_class, seed, device, out)
    if checkpoint is not None:
        _check_same_run(checkpoint, trainer, out)
    run = RunState(warmed_up=recipe.warmup_lr is None)
    if checkpoint is not None:
        run = RunState(**checkpoint["run"])
        model.load_state_dict(checkpoint["model_state"])
        trainer.train_batches.load_state(checkpoint["loader"])
        torch.set_rng_state(checkpoint["torch_rng"])
        trainer.saved_iteration = run.iteration
    trainer.train_batches.remaining = recipe.iterations - run.iteration

    recorder = RunRecorder(run, trainer)
    callbacks = [PaperSchedule(recipe, run), StepCallback(graph=cuda_graph and device.type == "cuda"), recorder]
    net = torch.compile(model) if compile else model
    dls = DataLoaders(trainer.train_batches, trainer.valid_batches, device=device)
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), opt_func=partial(_fastai_sgd, recipe=recipe),
                    lr=recipe.lr, metrics=error_rate, cbs=callbacks + list(cbs or []))
    learn.recorder.smooth_loss = DeviceSmoothLoss()
    learn.remove_cb(learn.progress)
    if progress:
        learn.add_cb(LazyProgress())
    else:
        learn.logger = lambda *args: None
    if device.type == "cuda":
        trainer.train_batches.channels_last = trainer.valid_batches.channels_last = True
        learn.add_cb(ChannelsLast())
        if autocast_dtype(device) == torch.bfloat16:
            learn.add_cb(MixedPrecision("bf16"))  # for the validation pass; the step has its own autocast
    trainer.learn = learn
    learn.create_opt()
    if checkpoint is not None:
        learn.opt.load_state_dict(checkpoint["optimizer_state"])

    batches_left = recipe.iterations - run.iteration + trainer.train_batches.skip
    epochs = math.ceil(batches_left / trainer.train_batches.batches_per_epoch)
    restore = _signal_handlers(recorder)
    try:
        if epochs > 0:
            learn.fit(epochs)
    except NonFiniteLossError:
        raise NonFiniteLossError(recorder.failure) from None  # without fastai's wrapping of the message
    finally:
        restore()
    model.eval()
    return TrainResult(model, run.history, recipe, trainer.mean, trainer.out, recorder.stopped)


# --- Evaluation ---


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
