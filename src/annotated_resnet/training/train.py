"""Training on CIFAR-10 with the paper's recipe (Sec. 4.2), driven by fastai's ``Learner``.

The recipe's numbers are in :mod:`annotated_resnet.training.recipe`, the batches built on the device in
:mod:`annotated_resnet.training.batches`, the training step (and its CUDA graph and precision) in
:mod:`annotated_resnet.training.step`, checkpoint and log files in :mod:`annotated_resnet.training.checkpoints`
and the test error in :mod:`annotated_resnet.training.evaluation`. This module puts them together.

What is ours and what is fastai's: fastai's ``Learner`` runs the loop (epochs, validation,
metrics, the progress bar, callbacks); its ``ChannelsLast`` callback speeds up a GPU. The
validation pass and the test error run in fp32, the precision the weights are kept in, whatever
precision the training steps use (bf16 or fp16 only speed up training). Three callbacks
add what the paper's recipe, a long run and a fast GPU need: :class:`PaperSchedule` (the
iteration-based learning rate and the warm-up), :class:`StepCallback` (each training step as
one :class:`~annotated_resnet.training.step.TrainingStep`, replayed as a CUDA graph on a GPU) and
:class:`~annotated_resnet.training.recorder.RunRecorder` (per-epoch JSON-lines log, atomic checkpoints
with every random state, exact resume, clean stop on SIGTERM/Ctrl-C or a budget
(:mod:`annotated_resnet.training.stopping`), stop on a non-finite loss). Under ``torchrun`` the same
run is data-parallel over several processes (:mod:`annotated_resnet.training.distributed`).

Nothing in a training step waits for the GPU: the loss statistics stay on the device and the
host reads them only at an epoch's end, every
:data:`~annotated_resnet.training.recorder.CHECK_EVERY` steps, when the progress bar redraws and
(during the 110-layer warm-up only) after every step, so the host can queue the next steps
while the GPU runs this one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

# fastai's import scripts a function with torch.jit, which recent torch versions flag as deprecated
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback, CancelBatchException
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.optimizer import OptimWrapper
from torch import nn

from .batches import RunData
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    LOG_NAME,
    RunState,
    atomic_save,
    check_same_device_type,
    check_same_processes,
    check_same_run,
    settings_to_resume,
    checkpoint_to_resume,
    describe_model,
    write_log,
)
from . import distributed
from ..data import CIFAR10
from .distributed import ShardedErrorRate, sum_over_processes
from .evaluation import count_mistakes, evaluate  # noqa: F401 - evaluate re-exported: the notebooks import it from here
from ..model import create_model
from .progress import DeviceSmoothLoss, LazyProgress
from .recorder import NonFiniteLossError, RunRecorder
from .recipe import Recipe, sgd
from .recipe import CIFAR_MODEL_NAMES, paper_recipe  # noqa: F401 - re-exported: the notebooks import them from here
from .stopping import StopRequest, stop_on_signals
from .device_work import DEVICE_WORK
from .step import TrainingStep, choose_device, choose_precision, grad_scaler


def _fastai_sgd(params, lr, recipe: Recipe, fused: bool) -> OptimWrapper:
    """:func:`~annotated_resnet.training.recipe.sgd` wrapped for fastai's ``Learner`` (its ``opt_func``)."""
    return OptimWrapper(opt=sgd(params, recipe, lr, fused=fused))


# --- The callbacks ---


class StepCallback(Callback):
    """Runs each training batch as one :class:`TrainingStep` in place of fastai's own
    forward/backward/step, then lets fastai's loop go on (its ``after_batch`` callbacks,
    validation, metrics) as if fastai had done the step: the standard way to give a fastai
    ``Learner`` a custom training step (raise ``CancelBatchException`` from ``before_batch``)."""

    order = 8  # after PaperSchedule (5) has set the learning rate

    def __init__(self, graph: bool | None = None, precision: str = "auto", scaler=None, eager_steps: int = 3):
        self.graph, self.precision, self.scaler, self.eager_steps = graph, precision, scaler, eager_steps

    def before_fit(self):
        device = next(self.model.parameters()).device
        self.training_step = TrainingStep(self.model, self.loss_func, self.opt.opt, device, self.graph,
                                          eager_steps=self.eager_steps, precision=self.precision, scaler=self.scaler)

    def before_batch(self):
        if not self.training:
            return
        self.learn.pred, self.learn.loss = self.training_step(self.xb[0], self.yb[0], self.opt.hypers[-1]["lr"])
        raise CancelBatchException()


class ValidationDeviceWork(Callback):
    """Each validation batch as one piece of device work
    (:data:`~annotated_resnet.training.device_work.DEVICE_WORK`), which no other run's CUDA-graph
    capture may overlap."""

    order = 0

    def before_batch(self):
        self.held = None if self.training else DEVICE_WORK.shared()
        if self.held:
            self.held.__enter__()

    def after_batch(self):  # fastai calls it whatever happened in the batch
        if getattr(self, "held", None):
            self.held.__exit__(None, None, None)
            self.held = None


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
        batch_error = (self.pred.argmax(1) != self.yb[0]).float().mean()
        batch_error = sum_over_processes(batch_error).item() / distributed.current().count  # the global batch's
        self.run.smoothed_error = 0.9 * self.run.smoothed_error + 0.1 * batch_error
        if self.run.smoothed_error < self.recipe.warmup_until_error:
            self.run.warmed_up = True


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
    """Holds one run's data, model, precision, learner and run folder for the callbacks."""

    def __init__(self, model, data: RunData, recipe: Recipe, seed, device, settings: dict, out,
                 sync_batchnorm: bool = False):
        self.recipe, self.seed, self.device, self.settings = recipe, seed, device, settings
        self.processes, self.sync_batchnorm = distributed.current(), sync_batchnorm
        self.out = Path(out) if out is not None else None
        self.checkpoint_path = self.out / CHECKPOINT_NAME if self.out else None
        self.saved_iteration = 0
        self.mean, self.data = data.mean, data.description
        self.train_batches, self.valid_batches, self.test_batches = data.train, data.valid, data.test
        self.has_validation = recipe.validation > 0
        self.model = model.to(device)
        self.scaler = grad_scaler(device, settings["precision"])

    def identity(self) -> dict:
        """What makes this run this run, as its checkpoint records it."""
        return {"model": describe_model(self.model), "recipe": dataclasses.asdict(self.recipe),
                "seed": self.seed, "data": self.data}

    def test_error(self) -> float:
        """Error on the test images (the full test set, or its class-balanced subset); several
        processes each count the mistakes on their share of the images, with the first's
        batch-norm statistics, and add up their counts."""
        distributed.sync_buffers(self.model)
        counts = torch.stack([count_mistakes(self.model, self.test_batches),
                              torch.tensor(float(len(self.test_batches.labels)), device=self.device)])
        wrong, images = sum_over_processes(counts).tolist()
        return wrong / images

    def kept(self) -> str:
        """Which checkpoint a run that fails now leaves, and how to go on from it."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return "no checkpoint was written (the first is written after the first epoch)"
        return (f"the last checkpoint, {self.checkpoint_path} (iteration {self.saved_iteration}), is kept: "
                "continue with the same command and --resume")

    def batch_norm(self) -> str:
        """Whose statistics batch norm normalises with, for the checkpoint."""
        return "synchronised over the processes" if self.sync_batchnorm else "per process"

    def save(self, run: RunState) -> None:
        """Write the checkpoint atomically: a temporary file in the run folder, then
        ``os.replace``, so the folder always holds a complete checkpoint. Of several processes,
        the first writes it, with every process's loader and generator states."""
        if self.out is None:
            return
        with DEVICE_WORK.shared():
            self._write_checkpoint(run)

    def _write_checkpoint(self, run: RunState) -> None:
        process_state = {"loader": self.train_batches.state(run.batches_in_epoch), "torch_rng": torch.get_rng_state()}
        if self.processes.parallel:
            distributed.sync_buffers(self.model)
            states = distributed.gather(process_state)
            if not self.processes.first:
                self.saved_iteration = run.iteration
                return
        checkpoint = {
            "format": CHECKPOINT_FORMAT, **self.identity(), "pixel_mean": self.mean.cpu(),
            "model_state": self.model.state_dict(), "optimizer_state": self.learn.opt.state_dict(),
            "run": dataclasses.asdict(run),
            **process_state, **self.settings,
            "scaler_state": self.scaler.state_dict() if self.scaler else None,
            "processes": self.processes.count, "batch_norm": self.batch_norm(), "device": self.device.type,
        }
        if self.processes.parallel:
            checkpoint["process_states"] = states
        atomic_save(checkpoint, self.checkpoint_path)
        write_log(self.out / LOG_NAME, run.history)
        self.saved_iteration = run.iteration


def run_settings(checkpoint: dict | None, out, device: torch.device, precision: str = "auto",
                 compile: bool | None = None, channels_last: bool | None = None) -> dict:
    """How a run computes: the checkpoint's settings for a resumed run, else those asked for, with
    the defaults filled in (precision by hardware, no compilation, channels_last on CUDA)."""
    settings = settings_to_resume(checkpoint, out, precision=precision, compile=compile, channels_last=channels_last)
    return {"precision": choose_precision(device, settings["precision"]), "compile": bool(settings["compile"]),
            "channels_last": device.type == "cuda" if settings["channels_last"] is None else settings["channels_last"]}


def train(model: str | nn.Module, cifar: CIFAR10, recipe: Recipe, *, train_per_class: int | None = None,
          test_per_class: int | None = None, seed: int = 0, progress: bool = True,
          out: str | os.PathLike | None = None, resume: bool = False, device: str | None = None,
          compile: bool | None = None, cuda_graph: bool = True, precision: str = "auto",
          channels_last: bool | None = None, stop: StopRequest | None = None, cbs: list | None = None,
          sync_batchnorm: bool = False) -> TrainResult:
    """Train ``model`` (a CIFAR-10 net or its name) on ``cifar`` with ``recipe``.

    ``seed`` seeds the order of the batches and the augmentation, and the initialisation when
    ``model`` is a name (a net built beforehand keeps its weights: seed before building it).
    ``train_per_class`` / ``test_per_class`` take class-balanced subsets (small scales);
    ``out`` is the run folder for ``log.jsonl`` and ``checkpoint.pt`` (none if ``None``);
    ``resume`` continues from that folder's checkpoint (which must exist, and be of the same
    model, recipe, seed and data) and reaches the same weights as an uninterrupted run. On a
    CUDA device training uses a CUDA-graphed step (``cuda_graph=False`` runs it eagerly);
    ``channels_last`` (default: on CUDA devices only) hands the convolutions their images and
    weights in the layout fast kernels prefer (1.2-1.3x on an AVX2 CPU at batch 128), and
    ``compile=True`` adds ``torch.compile``. ``precision`` is ``auto`` (bf16 on
    GPUs with bf16 tensor cores, fp16 with gradient scaling on other CUDA GPUs, fp32 on the CPU:
    :func:`~annotated_resnet.training.step.choose_precision`) or one of ``bf16``, ``fp16``, ``fp32``.
    A resumed run takes precision, compilation and layout from its checkpoint, and refuses a
    different one asked for (:func:`~annotated_resnet.training.checkpoints.settings_to_resume`).
    SIGTERM and Ctrl-C, or ``stop`` (shared by runs trained side by side), end the run with a
    checkpoint at the current batch.

    In a process group (``torchrun``, :func:`annotated_resnet.training.distributed.start`) the run is
    data-parallel: ``device`` is this process's, each process computes its slice of every
    global batch of ``recipe.batch_size`` and DDP averages the gradients; ``sync_batchnorm``
    (GPUs) normalises with the whole global batch's statistics instead of each slice's.
    """
    device = choose_device(device)
    checkpoint = checkpoint_to_resume(out, resume)
    settings = run_settings(checkpoint, out, device, precision, compile, channels_last)
    processes = distributed.current()
    torch.manual_seed(seed)
    model = create_model(model) if isinstance(model, str) else model
    data = RunData(cifar, recipe, train_per_class, test_per_class, seed, device, processes.rank, processes.count)
    trainer = _Trainer(model, data, recipe, seed, device, settings, out, sync_batchnorm and processes.parallel)
    trainer.stop = stop or StopRequest()
    if checkpoint is not None:
        check_same_run(checkpoint, trainer.identity(), out)
        check_same_processes(checkpoint, processes.count, trainer.batch_norm(), out)
        check_same_device_type(checkpoint, device, out)
    run = RunState(warmed_up=recipe.warmup_lr is None)
    if checkpoint is not None:
        run = RunState(**checkpoint["run"])
        model.load_state_dict(checkpoint["model_state"])
        mine = checkpoint["process_states"][processes.rank] if processes.parallel else checkpoint
        trainer.train_batches.load_state(mine["loader"])
        torch.set_rng_state(mine["torch_rng"])
        trainer.saved_iteration = run.iteration
        if trainer.scaler and checkpoint.get("scaler_state"):
            trainer.scaler.load_state_dict(checkpoint["scaler_state"])
    trainer.train_batches.remaining = recipe.iterations - run.iteration

    recorder = RunRecorder(run, trainer)
    graph = cuda_graph and device.type == "cuda" and distributed.graph_allowed()
    step = StepCallback(graph=graph, precision=settings["precision"], scaler=trainer.scaler,
                        eager_steps=distributed.DDP_EAGER_STEPS if processes.parallel else 3)
    callbacks = [PaperSchedule(recipe, run), step, recorder, ValidationDeviceWork()]
    if processes.parallel:
        callbacks.append(distributed.FirstProcessStatistics())
    if settings["channels_last"]:
        model.to(memory_format=torch.channels_last)  # before DDP, which keeps the parameters it is given
    net = distributed.wrap(model, device, sync_batchnorm) if processes.parallel else model
    net = torch.compile(net) if settings["compile"] else net
    dls = DataLoaders(trainer.train_batches, trainer.valid_batches, device=device)
    fused = device.type == "cuda" or trainer.scaler is not None  # fp16's scaler needs the fused update
    metric = ShardedErrorRate(device) if processes.parallel else error_rate
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), opt_func=partial(_fastai_sgd, recipe=recipe, fused=fused),
                    lr=recipe.lr, metrics=metric, cbs=callbacks + list(cbs or []))
    learn.recorder.smooth_loss = DeviceSmoothLoss()
    learn.remove_cb(learn.progress)
    if progress and processes.first:
        learn.add_cb(LazyProgress())
    else:
        learn.logger = lambda *args: None
    if settings["channels_last"]:
        data.use_channels_last()
        learn.add_cb(ChannelsLast())
    trainer.learn = learn
    learn.create_opt()
    if checkpoint is not None:
        learn.opt.load_state_dict(checkpoint["optimizer_state"])

    batches_left = recipe.iterations - run.iteration + trainer.train_batches.skip
    epochs = math.ceil(batches_left / trainer.train_batches.batches_per_epoch)
    try:
        with stop_on_signals(trainer.stop):
            if epochs > 0:
                learn.fit(epochs)
    except NonFiniteLossError:
        raise NonFiniteLossError(recorder.failure) from None  # without fastai's wrapping of the message
    except RuntimeError as error:
        lost = processes.parallel and distributed.peer_lost(error, processes, run.iteration, trainer.kept())
        if lost:
            raise lost from None
        raise
    model.eval()
    return TrainResult(model, run.history, recipe, trainer.mean, trainer.out, recorder.stopped)
