"""Data-parallel training over several processes, as the paper trained: "with a mini-batch
size of 128 on two GPUs" (Sec. 4.2).

PyTorch has every piece: ``torchrun`` starts one process per GPU and tells each its rank,
``torch.distributed`` connects them (NCCL between GPUs, gloo between CPU processes), and
``DistributedDataParallel`` (DDP) averages the gradients of every step across the processes
while the backward pass runs. This module only chooses and checks the set-up, and adds what a
run of the paper's recipe needs besides the gradients:

* **The batch.** The global mini-batch stays the recipe's (128): each of ``N`` processes
  computes ``128 / N`` images of it (:class:`~annotated_resnet.training.batches.DeviceBatches` draws the
  same seeded order in every process and gives each its own slice and augmentation stream).
  DDP's averaged gradient of the ``N`` slice losses is the gradient of the global batch's mean
  loss, so the learning rate, weight decay and the iteration-based schedule stay the paper's.
* **Batch norm.** Each process normalises its slice with its own slice's statistics (what two
  GPUs compute without synchronisation), or, with ``SyncBatchNorm`` (GPUs only), with the
  statistics of the whole global batch. The running statistics used for evaluation are the
  first process's, copied to the others before every evaluation and checkpoint
  (:func:`sync_buffers`).
* **Agreement.** The processes stop together: a stop request (SIGTERM, Ctrl-C) and a
  non-finite loss seen by any process are shared at the loss checks (:func:`agree`), so all stop
  at the same batch and the first process writes one checkpoint, with every process's
  generator states (:func:`gather`).
* **Failures.** A collective operation fails when another process has died (gloo and NCCL see
  the closed connection) or has not answered within the process group's timeout (torch's
  default: 10 minutes for NCCL, 30 for gloo); :func:`peer_lost` turns that failure into a
  message that says so, and ``torchrun`` stops the others when one process fails.
* **Eager steps.** Each process runs fastai's own training step (no CUDA graph), as
  torchvision's reference scripts do: DDP's gradient exchange then keeps NCCL's own error
  handling and timeouts.

fastai's own ``DistributedTrainer`` does not fit here: it feeds each process through a
``DistributedDL``, which indexes a data set on the host and pads the processes' shares with
repeated images to make them equal; our batches are built on the device, and the evaluation
here needs no padding. So the run keeps fastai's ``Learner`` and wraps its model in DDP directly.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.learner import Metric
from torch import nn
from torch.nn.parallel import DistributedDataParallel

#: The stop reasons :func:`agree` can share, by code (0: no stop).
STOP_REASONS = ("SIGTERM", "SIGINT", "the time budget")


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run: its ``rank`` among ``count`` processes."""

    rank: int = 0
    count: int = 1

    @property
    def parallel(self) -> bool:
        return self.count > 1

    @property
    def first(self) -> bool:
        """The process that writes checkpoints and logs and prints the run's progress."""
        return self.rank == 0


def current() -> Processes:
    """This process's place: from the process group if one is running, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size())
    return Processes()


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process as one of several (it sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_device(device: str | None, local_rank: int, local_processes: int) -> torch.device:
    """The device of the process with ``local_rank`` among ``local_processes`` on its machine:
    GPU number ``local_rank`` (one GPU per process), or the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    gpus = torch.cuda.device_count()
    if device.index is not None:
        raise ValueError(f"--device {device} names one GPU, but each of the {local_processes} processes needs its "
                         "own: give --device cuda, and each process takes the GPU of its local rank")
    if local_processes > gpus:
        raise ValueError(f"{local_processes} processes on this machine but torch sees {gpus} GPU(s); start at most "
                         f"{gpus} (torchrun --nproc-per-node {gpus}), one per GPU, or train on the CPU with "
                         "--device cpu")
    return torch.device("cuda", local_rank)


def choose_backend(device: torch.device, backend: str | None = None) -> str:
    """NCCL between GPUs, gloo between CPU processes (``backend`` overrides where it can)."""
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("NCCL connects GPUs only; training on the CPU (--device cpu) uses --backend gloo, "
                         "the default there")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"unknown backend {backend!r}; expected nccl (GPUs) or gloo (CPUs, or GPUs slowly)")
    return backend


def start(device: str | None = None, backend: str | None = None) -> torch.device:
    """Join the process group of a ``torchrun`` launch and return this process's device.

    ``torchrun`` sets each process's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the address
    of the rendezvous."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    device = process_device(device, local_rank, local_processes)
    backend = choose_backend(device, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return device


def finish() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def first_on_each_machine(load):
    """``load()`` in the first process of each machine, then in the others: the first
    downloads and caches the data set, the others read what it left."""
    if not current().parallel:
        return load()
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    try:
        if first:
            return load()
    finally:
        dist.barrier()  # also after a failure, so the others go on to meet the same error
    return load()


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel, which starts every process from the first's
    weights and averages the gradients of every backward pass; ``sync_batchnorm`` normalises
    with the statistics of the whole global batch (``nn.SyncBatchNorm``, GPUs only). DDP does
    not copy buffers at every forward pass (:func:`sync_buffers` does before evaluations)."""
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError("SyncBatchNorm works on GPUs only; on the CPU each process keeps its own batch-norm "
                             "statistics (drop --sync-batchnorm)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   **NO_BUFFER_SYNC_IN_FORWARD)


#: DDP's keyword that keeps it from copying buffers at every forward pass: torch 2.13 added
#: ``forward_sync_buffers``; older releases take ``broadcast_buffers=False``.
NO_BUFFER_SYNC_IN_FORWARD = ({"forward_sync_buffers": False}
                             if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                             else {"broadcast_buffers": False})


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that, in training, normalises each of ``groups`` equal parts of the batch with
    that part's own statistics, as ``groups`` GPUs each normalise their share of a data-parallel
    batch (the paper's two GPUs: two groups of 64 of each batch of 128, Sec. 4.2), on one device.
    The running statistics follow the first group only, as a data-parallel run keeps the first
    process's. Same parameters and buffers as ``nn.BatchNorm2d``, so weights load either way; in
    eval mode it is ``nn.BatchNorm2d``."""

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


def sync_buffers(model: nn.Module) -> None:
    """Copy the first process's buffers (batch norm's running statistics) to the others. The
    running statistics never enter a training step, so copying them only before evaluations
    and checkpoints gives the same numbers as copying them before every step."""
    if current().parallel:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the processes (in place; unchanged for a single process)."""
    if current().parallel:
        dist.all_reduce(values)
    return values


def agree(stop, finite: bool, device: torch.device) -> bool:
    """Share, in every process, whether any process was asked to stop (``stop``, a
    :class:`~annotated_resnet.training.stopping.StopRequest`, learns the reason) and whether the loss
    stayed finite in all; returns the latter."""
    code = STOP_REASONS.index(stop.reason) + 1 if stop.requested else 0
    flags = torch.tensor([code, 0 if finite else 1], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0] and not stop.requested:
        stop.request(STOP_REASONS[int(flags[0]) - 1])
    return not flags[1]


def gather(state: dict) -> list[dict]:
    """Every process's ``state`` (CPU tensors and numbers), in rank order."""
    states = [None] * current().count
    dist.all_gather_object(states, state)
    return states


class FirstProcessStatistics(Callback):
    """Before fastai's validation pass, every process takes the first process's batch-norm
    running statistics (:func:`sync_buffers`), so all shares are evaluated by one network."""

    def before_validate(self):
        sync_buffers(self.learn.model)


class ShardedErrorRate(Metric):
    """fastai's ``error_rate`` over evaluation images shared out among the processes: each
    counts the mistakes on its share, the value adds up the counts of all."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self):
        self.wrong, self.count = torch.zeros((), device=self.device), 0

    def accumulate(self, learn):
        self.wrong += (learn.pred.argmax(1) != learn.yb[0]).sum()
        self.count += len(learn.yb[0])

    @property
    def value(self):
        totals = sum_over_processes(torch.stack([self.wrong.float(), torch.tensor(float(self.count), device=self.device)]))
        return (totals[0] / totals[1]).item()

    @property
    def name(self):
        return "error_rate"


class PeerLostError(RuntimeError):
    """A collective operation failed: another process died or stopped answering."""


def peer_lost(error: RuntimeError, processes: Processes, iteration: int, kept: str) -> PeerLostError | None:
    """The message for a collective operation that failed in a data-parallel run (``None`` if
    ``error`` is not such a failure); ``kept`` says which checkpoint remains."""
    text = str(error)
    if not (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text or "Connection" in text):
        return None
    # the backend's own line (fastai puts a line naming the callback before it)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Exception occured in")]
    first_line = lines[0] if lines else type(error).__name__
    return PeerLostError(
        f"process {processes.rank} of {processes.count} stopped at iteration {iteration}: another process has died or "
        f"stopped answering (a collective operation failed: {first_line[:300]}). Its own output, or torchrun's "
        f"summary, says why; {kept}")


def torchrun_command(argv: list[str], gpus: int) -> list[str]:
    """``torchrun`` starting ``gpus`` processes of the same command on this machine (``--gpus``
    taken out of ``argv``), with a free port of its own (``--standalone``)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
            "-m", "annotated_resnet.cli", *rest]


def check_gpus(gpus: int) -> None:
    """``--gpus N`` needs at least ``N`` CUDA GPUs."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > available:
        raise ValueError(f"--gpus {gpus} asks for {gpus} GPUs but torch sees {available}; give at most {available}, "
                         "or start CPU processes with torchrun --nproc-per-node N -m annotated_resnet.cli train ... "
                         "--device cpu")
