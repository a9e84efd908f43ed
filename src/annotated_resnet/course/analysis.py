"""Sec. 4.2's analysis: Fig. 7 (the standard deviation of layer responses) and the reference
runs that Fig. 6, Table 6 and Fig. 7 are read from.

Sec. 4.2 ("Analysis of Layer Responses") measures, for each 3x3 convolutional layer, the
standard deviation of its output after BN and before the nonlinearity (the ReLU, or the
addition of the shortcut in a residual block). The paper finds ResNets' responses generally
smaller than plain nets', and reads that as support for residual functions that "might be
generally closer to zero" and for identity mappings as a reasonable preconditioning
(Sec. 3.1). Here the responses are read by forward hooks on the BN layers that follow 3x3
convolutions, on test images (the paper does not say which images), in eval mode.

The networks measured at full scale are the reference runs the package ships
(:mod:`annotated_resnet.reference_runs`). :class:`ReferenceRun` says what each one was trained on —
its schedule, its training set (the 45k/5k split that chose the paper's schedule, or all 50k
images: the paper says its models are "trained on the training set", which we read as all 50k)
and its data — so that every number read from it can say where it came from;
:func:`runs_at_one_schedule` picks runs that can be compared.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import balanced_subset, pixel_mean, train_val_split
from ..reference_runs import PROVENANCE_NAME, REFERENCE_RUNS, load_reference_run
from ..model import BasicBlock, Bottleneck, ResNet, cifar_resnet
from .probes import reestimate_batchnorm_


def three_by_three_responses(model: ResNet) -> list[tuple[str, nn.BatchNorm2d]]:
    """``(name, bn)`` for every BN layer that follows a 3x3 convolution, in forward order:
    the CIFAR stem's ``bn1`` and, in each block, the BN after each 3x3 conv."""
    if not isinstance(model, ResNet):
        raise TypeError(f"expected an annotated_resnet.ResNet, got {type(model).__name__}")
    pairs = [("bn1", model.conv1, model.bn1)]
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            if isinstance(block, BasicBlock):
                convs = [("conv1", "bn1"), ("conv2", "bn2")]
            elif isinstance(block, Bottleneck):
                convs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
            else:
                raise TypeError(f"unexpected block {type(block).__name__} in stage {s + 1}")
            pairs += [(f"layer{s + 1}.{b}.{bn}", getattr(block, conv), getattr(block, bn)) for conv, bn in convs]
    return [(name, bn) for name, conv, bn in pairs if conv.kernel_size == (3, 3)]


def layer_response_std(model: ResNet, images: torch.Tensor, batch_size: int = 500) -> list[float]:
    """Fig. 7: the standard deviation of each 3x3 layer's response (after BN, before ReLU or
    addition), over all images, channels and positions, in forward order.

    ``images`` is a float batch (N, 3, 32, 32) already normalized as for the network
    (per-pixel mean subtracted, :func:`annotated_resnet.data.normalize`).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("expected a normalized float batch (N, 3, H, W); build it with "
                         "annotated_resnet.data.normalize(to_tensor(uint8_images), mean)")
    layers = three_by_three_responses(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    squares = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def record(index):
        def hook(module, inputs, output):
            out = output.detach().double()
            sums[index] += out.sum().cpu()
            squares[index] += out.square().sum().cpu()
            counts[index] += out.numel()
        return hook

    hooks = [bn.register_forward_hook(record(i)) for i, (_, bn) in enumerate(layers)]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size].to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    mean = sums / counts
    variance = squares / counts - mean.square()
    return variance.clamp_min(0).sqrt().tolist()


# --- The reference runs: what each was trained on (Sec. 4.2, Fig. 6, Table 6) ---


@dataclass
class ReferenceRun:
    """A finished run of the paper's CIFAR-10 recipe shipped with the package (see
    :mod:`annotated_resnet.reference_runs`): its per-epoch history, its provenance and its weights."""

    folder: Path
    history: list[dict]
    provenance: dict
    state_dict: dict
    #: How many training images :meth:`model` re-estimated BN's running statistics from (0: none).
    batchnorm_reestimated: int = 0

    @property
    def name(self) -> str:
        return self.provenance["run"]

    @property
    def iterations(self) -> int:
        return self.provenance["recipe"]["iterations"]

    @property
    def full_schedule(self) -> bool:
        return self.iterations == self.provenance["recipe"]["paper_iterations"]

    @property
    def held_out(self) -> int:
        """Training images held out for validation: 5,000 for the 45k/5k split, 0 for all 50k."""
        return self.provenance["data"]["validation_images"]

    @property
    def final(self) -> dict:
        """The last epoch's record: ``train_error``, ``test_error``, ``iteration`` ..."""
        return self.history[-1]

    def schedule(self) -> str:
        recipe = self.provenance["recipe"]
        length = "the paper's full schedule" if self.full_schedule else \
            f"{self.iterations / recipe['paper_iterations']:.3g}x the paper's {recipe['paper_iterations']:,}"
        return f"{self.iterations:,} iterations of batch {recipe['batch_size']} ({length})"

    def training_set(self) -> str:
        train = self.provenance["data"]["train_images"]
        if self.held_out:
            return f"{train:,} training images ({self.held_out:,} held out: the 45k/5k split)"
        return f"{train:,} training images (no split: all 50k, as we read the paper's reported models)"

    def data(self) -> str:
        source = self.provenance["data"]["source"]
        return "the JPEG copy of CIFAR-10 (lossy)" if "JPEG" in source else source.split(":")[0]

    def describe(self) -> str:
        """Schedule, training set, data, hardware and seed in one line."""
        return (f"{self.name}: {self.schedule()}; {self.training_set()}; {self.data()}; "
                f"{self.provenance['device']}; seed {self.provenance['seed']}")

    def command_today(self) -> str:
        """The command that repeats this run with today's package: the ``annotated-resnet
        reproduce`` or ``annotated-resnet train`` it recorded, with its options, less what belongs to one machine
        or one sitting: the output folder (``--out``), a time budget (``--budget-minutes``),
        ``--resume``, ``--no-progress`` and the default ``--seed 0``; and with the training set
        said explicitly: ``--split`` where the run held out 5,000 images, no ``--no-split`` (all
        50k images is the default). A ``--data`` option stays; a copy of CIFAR-10 the run found
        through ``$ANNOTATED_RESNET_CIFAR10`` is named only in :meth:`data` (without either, the
        command uses torchvision's CIFAR-10)."""
        words = shlex.split(self.provenance["command"])
        if Path(words[0]).name == "annotated-resnet" and len(words) > 1 and words[1] in ("reproduce", "train"):
            command, start = words[1], 2
        else:
            raise ValueError(f"{self.name}: its provenance records a command this package did not write: "
                             f"{self.provenance['command']!r}")
        options, rest = [], iter(words[start:])
        for word in rest:
            if word in ("--out", "--budget-minutes"):
                next(rest, None)
            elif word == "--seed":
                seed = next(rest, "0")
                options += [] if seed == "0" else [word, seed]
            elif not word.startswith(("--out=", "--budget-minutes=")) and word not in (
                    "--split", "--no-split", "--resume", "--no-progress"):
                options.append(word)
        if self.held_out:
            options.append("--split")
        return shlex.join(["annotated-resnet", command, *options])

    def model(self, cifar=None, reestimate_images: int = 1000) -> ResNet:
        """The trained network (its stored weights loaded as float32), in eval mode.

        fp16 holds numbers up to 65,504; a file that stores BN's running variances in fp16 (as
        the shipped plain-56 does) holds any larger one as infinity, which silences its channel
        in eval mode. Where that happened, BN's running statistics are
        re-estimated from ``reestimate_images`` of the run's own training images, taken from
        ``cifar`` (:func:`annotated_resnet.course.probes.reestimate_batchnorm_`); the learned weights
        stay as trained."""
        net = cifar_resnet(**self.provenance["model"])
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()})
        if not all(torch.isfinite(buffer).all() for buffer in net.buffers()):
            if cifar is None:
                raise ValueError(f"{self.name}: its fp16 weights hold infinite BN running statistics; pass the "
                                 "CIFAR-10 it trained on (model(cifar)) to re-estimate them from its training images")
            images, labels = self.training_images(cifar)
            sample, _ = balanced_subset(images, labels, reestimate_images // 10, self.provenance["data"]["data_seed"])
            reestimate_batchnorm_(net, sample, pixel_mean(images))
            self.batchnorm_reestimated = len(sample)
        return net.eval()

    def training_images(self, cifar):
        """The images and labels this run trained on, taken from ``cifar`` (the data loaded here;
        the run's own images if it is the same copy of CIFAR-10): its split and subset."""
        data = self.provenance["data"]
        images, labels = cifar.train_images, cifar.train_labels
        if self.held_out:
            images, labels = train_val_split(images, labels, self.held_out, data["data_seed"])[:2]
        if data.get("train_per_class"):
            images, labels = balanced_subset(images, labels, data["train_per_class"], data["data_seed"])
        return images, labels

    def training_mean(self, cifar) -> torch.Tensor:
        """The per-pixel mean of the images this run trained on (:meth:`training_images`)."""
        return pixel_mean(self.training_images(cifar)[0])


def shipped_runs(folder: str | os.PathLike | None = None) -> list[ReferenceRun]:
    """Every finished run anywhere under ``folder`` (the package's reference runs by default),
    sorted by model name and schedule length."""
    root = Path(folder) if folder is not None else REFERENCE_RUNS
    runs = []
    for provenance_path in sorted(root.rglob(PROVENANCE_NAME)):
        provenance = json.loads(provenance_path.read_text())
        if provenance.get("status") == "finished":
            runs.append(ReferenceRun(provenance_path.parent, *load_reference_run(provenance_path.parent)))
    return sorted(runs, key=lambda run: (run.name, run.iterations))


def longest_runs(runs: list[ReferenceRun]) -> dict[str, ReferenceRun]:
    """For each model, its run with the longest schedule."""
    longest: dict[str, ReferenceRun] = {}
    for run in runs:
        if run.name not in longest or run.iterations > longest[run.name].iterations:
            longest[run.name] = run
    return longest


def runs_at_one_schedule(runs: list[ReferenceRun], names) -> dict[str, ReferenceRun]:
    """The runs of ``names`` at the longest schedule that all of them were trained for, so
    that they can be compared; an empty dict when no schedule has them all."""
    by_length: dict[int, dict[str, ReferenceRun]] = {}
    for run in runs:
        by_length.setdefault(run.iterations, {})[run.name] = run
    for length in sorted(by_length, reverse=True):
        if all(name in by_length[length] for name in names):
            return {name: by_length[length][name] for name in names}
    return {}
