"""Data-parallel training over several processes, as the paper trained: "with a mini-batch
size of 128 on two GPUs" (Sec. 4.2).

PyTorch has every piece: ``torchrun`` starts one process per GPU and tells each its rank,
``torch.distributed`` connects them (NCCL between GPUs, gloo between CPU processes), and
``DistributedDataParallel`` (DDP) averages the gradients of every step while the backward pass
runs. Each process runs fastai's own training step, eagerly, as torchvision's reference scripts
do, so NCCL keeps its own error handling and timeouts. This module joins the processes and
gives the trainer a :class:`ProcessGroup`, which does across processes what the trainer's
single-process stand-in (:class:`~annotated_resnet.training.train.OneProcess`) does alone:

* **The batch.** The global mini-batch stays the recipe's (128): each of ``N`` processes
  computes ``128 / N`` images of it (:class:`~annotated_resnet.training.batches.DeviceBatches`
  draws the same seeded order in every process and gives each its own slice and augmentation
  stream). DDP's average of the ``N`` slice gradients is the gradient of the global batch's mean
  loss, so the learning rate, weight decay and the iteration-based schedule stay the paper's;
  the training loss and error are summed over the processes (:meth:`ProcessGroup.sum`).
* **Batch norm.** Each process normalises its slice with its own slice's statistics (what two
  GPUs compute without synchronisation), or, with ``SyncBatchNorm`` (GPUs only), with the
  statistics of the whole global batch. The first process's running statistics are the run's:
  DDP copies them to the others before every forward pass (they never enter a training step),
  so every process evaluates all test images with the same network (a few seconds on a GPU;
  fastai's metrics gather the processes' results), and the first saves them.
* **Agreement.** The processes stop together: a stop request (SIGTERM, Ctrl-C) and a
  non-finite loss seen by any process are shared at the loss checks (:meth:`ProcessGroup.agree`),
  so all stop at the same batch, and the first process writes one checkpoint with every
  process's generator states (:meth:`ProcessGroup.gather`). A process that dies makes the
  others' next collective operation fail with the backend's own error, and ``torchrun`` ends them.

fastai's own ``DistributedTrainer`` does not fit here: it feeds each process through a
``DistributedDL``, which indexes a data set on the host; our batches are built on the device.
So the run keeps fastai's ``Learner`` and wraps its model in DDP directly.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

#: The stop reasons :meth:`ProcessGroup.agree` can share, by code (0: no stop).
STOP_REASONS = ("SIGTERM", "SIGINT", "the time budget")


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process as one of several (it sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class ProcessGroup:
    """This process's place among the ``count`` processes of a ``torchrun`` launch, and the
    collective operations the trainer needs. :meth:`start` joins the group."""

    parallel = True

    def __init__(self, device: torch.device, sync_batchnorm: bool = False):
        self.rank, self.count = dist.get_rank(), dist.get_world_size()
        self.first = self.rank == 0
        self.device, self.sync_batchnorm = device, sync_batchnorm

    @classmethod
    def start(cls, device: str | None = None, sync_batchnorm: bool = False) -> ProcessGroup:
        """Join the process group (NCCL between GPUs, gloo between CPU processes). ``torchrun``
        sets each process's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address;
        each process takes the GPU of its local rank."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if sync_batchnorm and device.type != "cuda":
            raise ValueError("SyncBatchNorm works on GPUs only; on the CPU each process keeps its own batch-norm "
                             "statistics (drop --sync-batchnorm)")
        if device.type == "cuda":
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= gpus or device.index is not None:
                raise ValueError(f"each process needs a GPU of its own: give --device cuda (not {device}) and start at "
                                 f"most {gpus} processes on this machine (torchrun --nproc-per-node {gpus}), or "
                                 "train on the CPU with --device cpu")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(device, sync_batchnorm)

    def finish(self) -> None:
        dist.destroy_process_group()

    def first_on_each_machine(self, load):
        """``load()`` in the first process of each machine, then in the others: the first
        downloads and caches the data set, the others read what it left."""
        first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        try:
            if first:
                return load()
        finally:
            dist.barrier()  # also after a failure, so the others go on to meet the same error
        return load()

    def batch_norm(self) -> str:
        """Whose statistics batch norm normalises with, for the checkpoint."""
        return "synchronised over the processes" if self.sync_batchnorm else "per process"

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DDP, which starts every process from the first's weights, copies the
        first's buffers (batch norm's running statistics) to the others before every forward pass,
        and averages the gradients of every backward pass (after ``SyncBatchNorm`` where asked for)."""
        if self.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (in place)."""
        dist.all_reduce(values)
        return values

    def agree(self, stop, finite: bool) -> bool:
        """Share, in every process, whether any process was asked to stop (``stop``, a
        :class:`~annotated_resnet.training.stopping.StopRequest`, learns the reason) and whether
        the loss stayed finite in all; returns the latter."""
        code = STOP_REASONS.index(stop.reason) + 1 if stop.requested else 0
        flags = torch.tensor([code, 0 if finite else 1], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] and not stop.requested:
            stop.request(STOP_REASONS[int(flags[0]) - 1])
        return not flags[1]

    def gather(self, state: dict) -> list[dict]:
        """Every process's ``state`` (CPU tensors and numbers), in rank order."""
        states = [None] * self.count
        dist.all_gather_object(states, state)
        return states
