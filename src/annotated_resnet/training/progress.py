"""The progress a run shows while it trains, without making the host wait for the GPU:
fastai's progress bar and smoothed training loss, read from the device at most once a second."""

from __future__ import annotations

import time

import torch
from fastai.callback.progress import ProgressCallback
from fastai.learner import AvgSmoothLoss


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
