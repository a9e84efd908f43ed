"""Training on CIFAR-10 with the paper's recipe (Sec. 4.2), driven by fastai's ``Learner``.

The recipe's numbers are in :mod:`annotated_resnet.recipe`, the batches built on the device in
:mod:`annotated_resnet.batches`, the training step (and its CUDA graph and precision) in
:mod:`annotated_resnet.step`, checkpoint and log files in :mod:`annotated_resnet.checkpoints`
and the test error in :mod:`annotated_resnet.evaluation`. This module puts them together.

What is ours and what is fastai's: fastai's ``Learner`` runs the loop (epochs, validation,
metrics, the progress bar, callbacks); its ``ChannelsLast`` and ``MixedPrecision`` callbacks
speed up a GPU. Three callbacks add what the paper's recipe, a long run and a fast GPU need:
:class:`PaperSchedule` (the iteration-based learning rate and the warm-up), :class:`StepCallback`
(each training step as one :class:`~annotated_resnet.step.TrainingStep`, replayed as a CUDA
graph on a GPU) and :class:`RunRecorder` (per-epoch JSON-lines log, atomic checkpoints with
every random state, exact resume, clean stop on SIGTERM/Ctrl-C, stop on a non-finite loss).

Nothing in a training step waits for the GPU: the loss statistics stay on the device and the
host reads them only at an epoch's end, every :data:`CHECK_EVERY` steps, when the progress
bar redraws and (during the 110-layer warm-up only) after every step, so the host can queue
the next steps while the GPU runs this one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

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

from .batches import DeviceBatches
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    LOG_NAME,
    atomic_save,
    check_same_run,
    describe_model,
    load_checkpoint,
    write_log,
)
from .data import CIFAR10, balanced_subset, pixel_mean, train_val_split
from .evaluation import evaluate
from .model import create_model
from .recipe import Recipe, sgd
from .recipe import CIFAR_MODEL_NAMES, paper_recipe  # noqa: F401 - re-exported: the notebooks import them from here
from .step import TrainingStep, autocast_dtype, choose_device

#: The split and the data subsets are chosen with this seed whatever the run's seed, so that
#: runs with different seeds see the same images and differ only in initialisation and order.
DATA_SEED = 0
#: On a GPU, the host checks the loss for NaN/inf every this many steps (and before every
#: checkpoint); reading it every step would make the host wait for the GPU at every step.
CHECK_EVERY = 100


def _fastai_sgd(params, lr, recipe: Recipe) -> OptimWrapper:
    """:func:`~annotated_resnet.recipe.sgd` wrapped for fastai's ``Learner`` (its ``opt_func``)."""
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

    def identity(self) -> dict:
        """What makes this run this run, as its checkpoint records it."""
        return {"model": describe_model(self.model), "recipe": dataclasses.asdict(self.recipe),
                "seed": self.seed, "data": self.data}

    def test_error(self) -> float:
        """Error on the test images (the full test set, or its class-balanced subset)."""
        return evaluate(self.model, self.test_batches)

    def save(self, run: RunState) -> None:
        """Write the checkpoint atomically: a temporary file in the run folder, then
        ``os.replace``, so the folder always holds a complete checkpoint."""
        if self.out is None:
            return
        checkpoint = {
            "format": CHECKPOINT_FORMAT, **self.identity(), "pixel_mean": self.mean.cpu(),
            "model_state": self.model.state_dict(), "optimizer_state": self.learn.opt.state_dict(),
            "run": dataclasses.asdict(run),
            "loader": self.train_batches.state(run.batches_in_epoch),
            "torch_rng": torch.get_rng_state(),
        }
        atomic_save(checkpoint, self.checkpoint_path)
        write_log(self.out / LOG_NAME, run.history)
        self.saved_iteration = run.iteration



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
        check_same_run(checkpoint, trainer.identity(), out)
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
