"""The run's record: per-epoch statistics, the JSON-lines log, checkpoints, and the run's
clean ends (a stop request, a non-finite loss), as one fastai callback of
:func:`annotated_resnet.training.train.train`."""

from __future__ import annotations

import math
import time

import torch
from fastai.callback.core import Callback, CancelFitException

from .checkpoints import RunState

#: On a GPU, the host checks the loss for NaN/inf every this many steps (and before every
#: checkpoint); reading it every step would make the host wait for the GPU at every step.
CHECK_EVERY = 100
#: The same for data-parallel runs, where the check also shares stop requests
#: (:meth:`~annotated_resnet.training.distributed.ProcessGroup.agree`): soon enough for torchrun, which waits 30 s
#: after passing on a SIGTERM or Ctrl-C before it kills the processes.
PARALLEL_CHECK_EVERY = 20
#: A single-process run also saves a checkpoint within an epoch once this many seconds have
#: passed since the last one: an epoch of a 56-layer net on one CPU core takes over 10 minutes,
#: and an interruption that gives no chance to save (a machine that shuts down, SIGKILL)
#: should cost minutes of training, not a whole epoch.
CHECKPOINT_SECONDS = 300



class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class RunRecorder(Callback):
    """Per-epoch statistics, the JSON-lines log, checkpoints, and the run's clean ends.

    After every training batch it adds loss and error to running sums on the device and
    honours a stop request by saving a checkpoint at that very batch. It stops the run on a
    non-finite loss, keeping the last good checkpoint: on the CPU it looks after every batch,
    on a GPU every :data:`CHECK_EVERY` batches and before every checkpoint. After every epoch
    it evaluates the test set (and takes the validation error from fastai's validation pass),
    appends a record to ``log.jsonl`` and writes the checkpoint; a single-process run also
    writes one every :data:`CHECKPOINT_SECONDS` within an epoch.
    """

    order = 55  # after fastai's Recorder (50), which has the validation error by then

    def __init__(self, run: RunState, trainer):
        self.run, self.trainer = run, trainer
        self.check_every = (1 if trainer.device.type == "cpu" else
                            PARALLEL_CHECK_EVERY if trainer.processes.parallel else CHECK_EVERY)
        self.stop = trainer.stop
        self.stopped: str | None = None
        self.failure: str | None = None
        self.agreed_stop = False  # several processes: a stop they all know of, at a loss check

    def before_fit(self):
        self.started = time.perf_counter() - self.run.seconds
        self.saved_at = time.monotonic()

    def before_epoch(self):
        # the sums of a resumed epoch (all processes' together) go on in the first process's sums
        first = self.trainer.processes.first
        self.loss_sum = torch.tensor(self.run.loss_sum if first else 0.0, device=self.trainer.device)
        self.error_sum = torch.tensor(self.run.error_sum if first else 0.0, device=self.trainer.device)
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
        stopping = self.agreed_stop if self.trainer.processes.parallel else self.stop.requested
        if stopping and self.run.iteration < self.trainer.recipe.iterations:
            # (on the run's last batch the epoch's end comes next and saves the finished run)
            self.check_finite()
            self.trainer.save(self.run_state_now())
            self.stopped = f"{self.stop.reason} at iteration {self.run.iteration}"
            raise CancelFitException()
        if (not self.trainer.processes.parallel and time.monotonic() - self.saved_at > CHECKPOINT_SECONDS
                and self.run.iteration < self.trainer.recipe.iterations):
            self.check_finite()
            self.trainer.save(self.run_state_now())
            self.saved_at = time.monotonic()

    def check_finite(self):
        """Stop the run if the loss of any step since the last check was NaN or infinite (the
        running sum of the epoch's losses is then no longer finite). Several processes check
        together, and share a stop request (:meth:`~annotated_resnet.training.distributed.ProcessGroup.agree`)."""
        finite = self.trainer.processes.agree(self.stop, bool(torch.isfinite(self.loss_sum)))
        self.agreed_stop = self.stop.requested
        if not finite:
            path = self.trainer.checkpoint_path
            where = ("nothing is saved" if path is None else
                     f"no checkpoint was written yet (the first is written after the first epoch)"
                     if not path.exists() else
                     f"the last good checkpoint, {path} (iteration {self.trainer.saved_iteration}), is kept")
            first, last = self.checked_iteration + 1, self.run.iteration
            when = f"iteration {last}" if first == last else f"one of iterations {first}-{last}"
            value = self.loss_sum.item()
            became = f"became {value}" if not math.isfinite(value) else "became non-finite in another process"
            self.failure = (
                f"the training loss {became} at {when} (lr {self.opt.hypers[-1]['lr']:g}); "
                f"the run stops and {where}. A smaller learning rate (--lr) or the warm-up of Sec. 4.2 "
                "usually helps.")
            raise NonFiniteLossError(self.failure)
        self.checked_iteration = self.run.iteration

    def run_state_now(self) -> RunState:
        self.run.seconds = time.perf_counter() - self.started
        sums = self.trainer.processes.sum(torch.stack([self.loss_sum.float(), self.error_sum.float()]))
        self.run.loss_sum, self.run.error_sum = sums[0].item(), sums[1].item()
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
        if self.trainer.processes.parallel:
            record["processes"] = self.trainer.processes.count
        run.history.append(record)
        run.seconds = record["seconds"]
        run.epoch += 1
        run.batches_in_epoch, run.loss_sum, run.error_sum = 0, 0.0, 0.0
        self.trainer.save(run)
        self.saved_at = time.monotonic()
