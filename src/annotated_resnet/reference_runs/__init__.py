"""The finished CIFAR-10 runs shipped with the package ("reference runs"), which the notebooks
plot beside the paper's Fig. 1, Fig. 6, Fig. 7 and Table 6, and the one reader for them and for
one's own runs (:class:`ReferenceRun`).

Each run is a folder in the format that ``annotated-resnet train`` and ``reproduce``
(:mod:`annotated_resnet.training.results`) write: ``log.jsonl``, ``weights-fp16.pt`` and
``provenance.json``. Its provenance says what it was trained on: its schedule, its training set
(the 45k/5k split on which the paper fixed its schedule, or all 50k images: the paper says its
models are "trained on the training set", which we read as all 50k) and its data, so that every
number read from it can say where it came from.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import balanced_subset, normalize, pixel_mean, to_tensor, train_val_split
from ..model import ResNet, cifar_resnet
from ..training.checkpoints import LOG_NAME, PROVENANCE_NAME, WEIGHTS_NAME
from ..training.results import training_set

REFERENCE_RUNS = Path(__file__).resolve().parent

__all__ = ["REFERENCE_RUNS", "ReferenceRun", "load_reference_run", "longest_reference_run", "longest_runs",
           "reestimate_batchnorm_", "runs_at_one_schedule", "shipped_runs"]


@dataclass
class ReferenceRun:
    """A finished run of the paper's CIFAR-10 recipe: its folder, per-epoch history, provenance
    and weights (:func:`load_reference_run` reads one)."""

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
        return self.provenance["iterations_done"]

    @property
    def full_schedule(self) -> bool:
        return self.iterations == self.provenance["recipe"]["paper_iterations"]

    @property
    def on_gpu(self) -> bool:
        """Whether a GPU trained it: the provenance names the GPU, or the CPU as "CPU <model> ..."."""
        return not self.provenance["device"].startswith("CPU")

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
        return training_set(self.provenance["data"])

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

    def training_images(self, cifar) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels this run trained on, taken from ``cifar`` (the data loaded here;
        the run's own images if it is the same copy of CIFAR-10): its split and subset."""
        data = self.provenance["data"]
        images, labels = cifar.train_images, cifar.train_labels
        if self.held_out:
            images, labels = train_val_split(images, labels, self.held_out, data["data_seed"])[:2]
        if data.get("train_per_class"):
            images, labels = balanced_subset(images, labels, data["train_per_class"], data["data_seed"])
        if len(labels) != data["train_images"]:
            raise ValueError(f"{self.name}: the run trained on {data['train_images']:,} images, but this copy of "
                             f"CIFAR-10 gives {len(labels):,} for its split; load the CIFAR-10 it was trained on")
        return images, labels

    def training_mean(self, cifar) -> torch.Tensor:
        """The per-pixel mean of the images this run trained on (:meth:`training_images`)."""
        return pixel_mean(self.training_images(cifar)[0])

    def model(self, cifar=None, reestimate_images: int = 1000) -> ResNet:
        """The trained network (its stored weights loaded as float32), in eval mode.

        fp16 holds numbers up to 65,504; a file that stores BN's running variances in fp16 (as
        the shipped 3,000-iteration plain-56 does) holds any larger one as infinity, which
        silences its channel in eval mode. Where that happened, BN's running statistics are
        re-estimated (:func:`reestimate_batchnorm_`) from ``reestimate_images`` of the run's own
        training images, taken from ``cifar``; the learned weights stay as trained."""
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


@torch.no_grad()
def reestimate_batchnorm_(model: nn.Module, images: np.ndarray, mean: torch.Tensor, batch_size: int = 500) -> nn.Module:
    """Recompute every BN layer's running mean and variance, in place, as the plain average
    over ``images`` (uint8, unaugmented) of the batch statistics. The learned weights are
    untouched; the running statistics are estimates that eval mode uses, not learned."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in batchnorms]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None                  # None: a cumulative average instead of a moving one
    model.train()
    for start in range(0, len(images), batch_size):
        model(normalize(to_tensor(images[start:start + batch_size]), mean))
    for bn, momentum in zip(batchnorms, momenta):
        bn.momentum = momentum
    return model.eval()


def load_reference_run(path: str | os.PathLike) -> ReferenceRun:
    """A finished run: ``path`` is a run folder, or the name of a run folder shipped in
    ``annotated_resnet/reference_runs/`` (``"resnet56"``, ``"full_schedule/resnet20"``)."""
    folder = Path(path)
    if not folder.is_dir() and not folder.is_absolute() and (REFERENCE_RUNS / folder).is_dir():
        folder = REFERENCE_RUNS / folder
    if not folder.is_dir():
        names = sorted(str(run.folder.relative_to(REFERENCE_RUNS)) for run in shipped_runs())
        raise FileNotFoundError(f"no run folder {str(path)!r}; give a run folder, or one of the shipped runs: "
                                f"{', '.join(names) or 'none (this copy of the package ships none)'}")
    missing = [n for n in (LOG_NAME, WEIGHTS_NAME, PROVENANCE_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a finished run: {', '.join(missing)} missing "
                                f"(expected {LOG_NAME}, {WEIGHTS_NAME}, {PROVENANCE_NAME})")
    history = [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines() if line.strip()]
    provenance = json.loads((folder / PROVENANCE_NAME).read_text())
    if provenance.get("status") != "finished":
        raise ValueError(f"{str(folder)!r} is not a finished run (status: {provenance.get('status')!r}); "
                         "rerun the command in its provenance to finish it")
    state_dict = torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    return ReferenceRun(folder, history, provenance, state_dict)


def shipped_runs(folder: str | os.PathLike | None = None) -> list[ReferenceRun]:
    """Every finished run anywhere under ``folder`` (the package's reference runs by default),
    sorted by model name and schedule length, a run on the 45k/5k split before one of the same
    length on all 50k (so that, of the two, the selections below pick the all-50k run, as the
    paper reports); an empty list where there are none."""
    root = Path(folder) if folder is not None else REFERENCE_RUNS
    runs = []
    for provenance_path in sorted(root.rglob(PROVENANCE_NAME)):
        run = provenance_path.parent
        if all((run / n).is_file() for n in (LOG_NAME, WEIGHTS_NAME)):
            if json.loads(provenance_path.read_text()).get("status") == "finished":
                runs.append(load_reference_run(run))
    return sorted(runs, key=lambda run: (run.name, run.iterations, -run.held_out))


def longest_runs(runs: list[ReferenceRun]) -> dict[str, ReferenceRun]:
    """For each model, its run with the longest schedule (of two as long, the later in
    :func:`shipped_runs`' order)."""
    return {run.name: run for run in sorted(runs, key=lambda run: run.iterations)}  # the longest comes last


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


def longest_reference_run(name: str, folder: str | os.PathLike | None = None) -> ReferenceRun:
    """The run of model ``name`` (e.g. ``"plain56"``) trained for the most iterations, anywhere
    under ``folder`` (the package's reference runs by default), so a longer run shipped later
    is picked up without changing the caller."""
    runs = shipped_runs(folder)
    longest = longest_runs(runs)
    if name not in longest:
        raise FileNotFoundError(f"no finished reference run of {name!r} under {str(folder or REFERENCE_RUNS)!r}; "
                                f"runs there: {', '.join(sorted(longest)) or 'none'}")
    return longest[name]
