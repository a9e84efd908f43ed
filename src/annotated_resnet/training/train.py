"""Training on CIFAR-10 with the paper's recipe (Sec. 4.2), driven by fastai's ``Learner``.

The recipe's numbers are in :mod:`annotated_resnet.training.recipe`, the batches built on the device in
:mod:`annotated_resnet.training.batches`, the training step (and its CUDA graph and precision) in
:mod:`annotated_resnet.training.step`, checkpoint and log files in :mod:`annotated_resnet.training.checkpoints`
and the test error in :mod:`annotated_resnet.training.evaluation`. This module puts them together.

What is ours and what is fastai's: fastai's ``Learner`` runs the loop (epochs, the training
step, validation, metrics, the progress bar, callbacks); its ``ChannelsLast`` callback sets the
memory layout. The validation pass and the test error run in fp32, the precision the weights are
kept in, whatever precision the training steps use (bf16 or fp16 only speed up training).
Our callbacks add what the paper's recipe and a long run need: :class:`PaperSchedule` (the
iteration-based learning rate and the warm-up), :class:`Autocast` (the training step in bf16 or
fp16, on the CPU too, where fastai's ``MixedPrecision`` does not reach) and
:class:`~annotated_resnet.training.recorder.RunRecorder` (per-epoch JSON-lines log, atomic checkpoints
with every random state, exact resume, clean stop on SIGTERM/Ctrl-C or a budget
(:mod:`annotated_resnet.training.stopping`), stop on a non-finite loss). So any fastai callback
works as it does in fastai (``GradientClip``, ``GradientAccumulation``, ...). One exception: on a
GPU a single run's step is captured once as a CUDA graph and replayed (:class:`StepCallback`,
:class:`~annotated_resnet.training.step.TrainingStep`), which runs forward, loss, backward and update in one
go; callbacks of those events are refused there with a message (``cuda_graph=False`` runs
fastai's own step). Under ``torchrun`` the same run is data-parallel over several processes,
eagerly (:mod:`annotated_resnet.training.distributed`).

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
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.metrics import error_rate
from fastai.optimizer import OptimWrapper
from torch import nn

from .batches import RunData, restore_generator
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
from .batchnorm_groups import group_batchnorm
from ..data import CIFAR10
from .evaluation import count_mistakes, evaluate  # noqa: F401 - evaluate re-exported: the notebooks import it from here
from ..model import create_model
from .progress import DeviceSmoothLoss, LazyProgress
from .recorder import NonFiniteLossError, RunRecorder
from .recipe import Recipe, sgd
from .recipe import CIFAR_MODEL_NAMES, paper_recipe  # noqa: F401 - re-exported: the notebooks import them from here
from .stopping import StopRequest, stop_on_signals
from .step import Autocast, StepCallback, choose_device, choose_precision, grad_scaler


def _fastai_sgd(params, lr, recipe: Recipe, fused: bool) -> OptimWrapper:
    """:func:`~annotated_resnet.training.recipe.sgd` wrapped for fastai's ``Learner`` (its ``opt_func``)."""
    return OptimWrapper(opt=sgd(params, recipe, lr, fused=fused))


# --- The callbacks ---


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
        processes = self.learn.trainer.processes
        batch_error = processes.sum(batch_error).item() / processes.count  # the global batch's
        self.run.smoothed_error = 0.9 * self.run.smoothed_error + 0.1 * batch_error
        if self.run.smoothed_error < self.recipe.warmup_until_error:
            self.run.warmed_up = True


# --- Training ---


class OneProcess:
    """A run in one process. A data-parallel run has a
    :class:`~annotated_resnet.training.distributed.ProcessGroup` in its place, which does the
    same across its processes: sums over them, shares stop requests and gathers their states."""

    rank, count, first, parallel = 0, 1, True, False

    def batch_norm(self) -> str:
        return "per process"

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def agree(self, stop, finite: bool) -> bool:
        return finite

    def gather(self, state: dict) -> list[dict]:
        return [state]


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

    def __init__(self, model, data: RunData, recipe: Recipe, seed, device, settings: dict, out, processes,
                 batchnorm_groups: int = 1):
        self.recipe, self.seed, self.device, self.settings = recipe, seed, device, settings
        self.processes, self.batchnorm_groups = processes, batchnorm_groups
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
        """Error on the test images (the full test set, or its class-balanced subset)."""
        return count_mistakes(self.model, self.test_batches).item() / len(self.test_batches.labels)

    def batch_norm(self) -> str:
        """Whose statistics batch norm normalises with, for the checkpoint."""
        if self.batchnorm_groups > 1:
            return f"per group of {self.recipe.batch_size // self.batchnorm_groups} images"
        return self.processes.batch_norm()

    def resume_from(self, checkpoint: dict | None) -> RunState:
        """The run's state: new, or the checkpoint's, whose model, loader, random and scaler
        states it loads after checking that it is this run's."""
        if checkpoint is None:
            run = RunState(warmed_up=self.recipe.warmup_lr is None)
        else:
            check_same_run(checkpoint, self.identity(), self.out)
            check_same_processes(checkpoint, self.processes.count, self.batch_norm(), self.out)
            check_same_device_type(checkpoint, self.device, self.out)
            run = RunState(**checkpoint["run"])
            self.model.load_state_dict(checkpoint["model_state"])
            mine = checkpoint["process_states"][self.processes.rank] if self.processes.parallel else checkpoint
            self.train_batches.load_state(mine["loader"])
            restore_generator(torch.default_generator, mine["torch_rng"], "torch's default")
            self.saved_iteration = run.iteration
            if self.scaler and checkpoint.get("scaler_state"):
                self.scaler.load_state_dict(checkpoint["scaler_state"])
        self.train_batches.remaining = self.recipe.iterations - run.iteration
        return run

    def save(self, run: RunState) -> None:
        """Write the checkpoint atomically: a temporary file in the run folder, then
        ``os.replace``, so the folder always holds a complete checkpoint. Of several processes,
        the first writes it, with every process's loader and generator states."""
        if self.out is None:
            return
        process_state = {"loader": self.train_batches.state(run.batches_in_epoch), "torch_rng": torch.get_rng_state()}
        states = self.processes.gather(process_state)
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


def train(model: str | nn.Module, cifar: CIFAR10, recipe: Recipe, **options) -> TrainResult:
    """Train ``model`` (a CIFAR-10 net or its name) on ``cifar`` with ``recipe``:
    :func:`build_learner` (whose docstring explains every option), then :func:`fit`."""
    return fit(build_learner(model, cifar, recipe, **options))


def build_learner(model: str | nn.Module, cifar: CIFAR10, recipe: Recipe, *, train_per_class=None,
                  test_per_class=None, seed: int = 0, progress: bool = True, out=None, resume: bool = False,
                  device=None, compile=None, cuda_graph: bool = True, precision: str = "auto", channels_last=None,
                  stop: StopRequest | None = None, cbs: list | None = None, processes=None,
                  batchnorm_groups: int = 1) -> Learner:
    """The fastai ``Learner`` that trains ``model`` (a CIFAR-10 net or its name) on ``cifar`` with
    ``recipe``, with the run's state (``learn.trainer``, ``learn.run_recorder``) loaded from its
    checkpoint when resuming; :func:`fit` trains it.

    ``seed`` seeds the order of the batches and the augmentation, and the initialisation when
    ``model`` is a name (a net built beforehand keeps its weights: seed before building it).
    ``train_per_class`` / ``test_per_class`` take class-balanced subsets (small scales);
    ``out`` is the run folder for ``log.jsonl`` and ``checkpoint.pt`` (none if ``None``);
    ``resume`` continues from that folder's checkpoint (which must exist, and be of the same
    model, recipe, seed and data) and reaches the same weights as an uninterrupted run. On a
    CUDA device training uses a CUDA-graphed step (``cuda_graph=False`` runs fastai's own);
    ``channels_last`` (default: on CUDA devices only) hands the convolutions their images and
    weights in the layout fast kernels prefer (1.2-1.3x on an AVX2 CPU at batch 128), and
    ``compile=True`` adds ``torch.compile``. ``precision`` is ``auto`` (bf16 on
    GPUs with bf16 tensor cores, fp16 with gradient scaling on other CUDA GPUs, fp32 on the CPU:
    :func:`~annotated_resnet.training.step.choose_precision`) or one of ``bf16``, ``fp16``, ``fp32``.
    A resumed run takes precision, compilation and layout from its checkpoint, and refuses a
    different one asked for (:func:`~annotated_resnet.training.checkpoints.settings_to_resume`).
    SIGTERM and Ctrl-C, or ``stop``, end the run with a checkpoint at the current batch. ``cbs``
    are more fastai callbacks.

    Batch norm: ``batchnorm_groups=2`` normalises each training batch as two halves with their
    own statistics, as the paper's two GPUs did (Sec. 4.2), on one device
    (:class:`~annotated_resnet.training.batchnorm_groups.GroupedBatchNorm2d`). Given ``processes``,
    a :class:`~annotated_resnet.training.distributed.ProcessGroup` of a ``torchrun`` launch, the run
    is data-parallel: ``device`` is this process's, each process computes its slice of every
    global batch of ``recipe.batch_size`` and DDP averages the gradients.
    """
    device = choose_device(device)
    checkpoint = checkpoint_to_resume(out, resume)
    settings = run_settings(checkpoint, out, device, precision, compile, channels_last)
    processes = processes or OneProcess()
    if batchnorm_groups > 1 and processes.parallel:
        raise ValueError("batch-norm groups are for one process; with several, each already normalises its own "
                         "slice of the batch")
    if recipe.batch_size % batchnorm_groups:
        raise ValueError(f"a batch of {recipe.batch_size} does not split into {batchnorm_groups} equal batch-norm "
                         f"groups; choose a batch size that is a multiple of {batchnorm_groups} (the paper: 128, "
                         "two groups of 64)")
    torch.manual_seed(seed)
    model = create_model(model) if isinstance(model, str) else model
    if batchnorm_groups > 1:
        group_batchnorm(model, batchnorm_groups)
    data = RunData(cifar, recipe, train_per_class, test_per_class, seed, device, processes.rank, processes.count)
    trainer = _Trainer(model, data, recipe, seed, device, settings, out, processes, batchnorm_groups)
    trainer.stop = stop or StopRequest()
    run = trainer.resume_from(checkpoint)

    callbacks = [PaperSchedule(recipe, run), RunRecorder(run, trainer)]
    if cuda_graph and device.type == "cuda" and not processes.parallel:
        callbacks.append(StepCallback(settings["precision"], trainer.scaler))
    elif settings["precision"] != "fp32":
        callbacks.append(Autocast(device, settings["precision"], trainer.scaler))
    if settings["channels_last"]:
        model.to(memory_format=torch.channels_last)  # before DDP, which keeps the parameters it is given
        data.use_channels_last()
        callbacks.append(ChannelsLast())
    net = processes.wrap(model)
    net = torch.compile(net) if settings["compile"] else net
    dls = DataLoaders(trainer.train_batches, trainer.valid_batches, device=device)
    fused = device.type == "cuda" or trainer.scaler is not None  # fp16's scaler needs the fused update
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), opt_func=partial(_fastai_sgd, recipe=recipe, fused=fused),
                    lr=recipe.lr, metrics=error_rate, cbs=callbacks + list(cbs or []))
    learn.recorder.smooth_loss = DeviceSmoothLoss()
    learn.remove_cb(learn.progress)
    if progress and processes.first:
        learn.add_cb(LazyProgress())
    else:
        learn.logger = lambda *args: None
    learn.trainer, trainer.learn = trainer, learn
    learn.create_opt()
    if checkpoint is not None:
        learn.opt.load_state_dict(checkpoint["optimizer_state"])
    return learn


def fit(learn: Learner) -> TrainResult:
    """Train ``learn`` (from :func:`build_learner`) to the end of its recipe, or until a stop."""
    trainer, recorder = learn.trainer, learn.run_recorder
    run, batches = recorder.run, trainer.train_batches
    epochs = math.ceil((trainer.recipe.iterations - run.iteration + batches.skip) / batches.batches_per_epoch)
    try:
        with stop_on_signals(trainer.stop):
            if epochs > 0:
                learn.fit(epochs)
    except NonFiniteLossError:
        raise NonFiniteLossError(recorder.failure) from None  # without fastai's wrapping of the message
    trainer.model.eval()
    return TrainResult(trainer.model, run.history, trainer.recipe, trainer.mean, trainer.out, recorder.stopped)
