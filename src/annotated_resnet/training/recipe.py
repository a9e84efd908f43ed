"""The paper's CIFAR-10 training recipe (Sec. 4.2) as numbers, and its optimizer.

SGD with momentum 0.9 and weight decay 1e-4, mini-batches of 128, learning rate 0.1 divided
by 10 at 32k and 48k iterations, stop at 64k iterations. The schedule counts iterations, not
epochs.

The warm-up: Sec. 4.2 starts ResNet-110 at 0.01 until its training error is below 80% (about
400 iterations), then goes back to 0.1. Giving the same warm-up to ResNet-1202 and plain-110 is
our reading, not the paper's text: for the 1202-layer net it says only that it is trained
like the nets before it, and it gives no recipe for a plain-110 (the caption of Fig. 6 only
says that plain-110's error is above 60%).

The training set: the paper fixed this schedule (at least its 64k end; on our reading, the
drops too) on a 45k/5k train/val split, and reports models "trained on the training set" and
evaluated on the 10k test images; we read that training set as all 50k training images.
:func:`paper_recipe` trains on all 50k (``validation=0``); ``split=True`` holds out the 5k for
the schedule-choosing experiment.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from ..model import CIFAR_DEPTHS, CIFAR_PLAIN_DEPTHS

CIFAR_MODEL_NAMES = [f"resnet{d}" for d in CIFAR_DEPTHS] + [f"plain{d}" for d in CIFAR_PLAIN_DEPTHS]
#: Training images held out by Sec. 4.2's 45k/5k split.
PAPER_VALIDATION = 5_000


@dataclass(frozen=True)
class Recipe:
    """Every number of Sec. 4.2's CIFAR-10 training, for one model. ``validation`` is the
    number of training images held out for validation (0: train on all of them)."""

    model: str
    iterations: int = 64_000
    batch_size: int = 128
    lr: float = 0.1
    milestones: tuple[int, ...] = (32_000, 48_000)
    lr_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    validation: int = 0
    warmup_lr: float | None = None
    warmup_until_error: float = 0.8
    paper_iterations: int = 64_000

    def __post_init__(self):
        whole = {"iterations": (1, 64_000), "batch_size": (1, 128), "validation": (0, 5_000)}
        for name, (least, paper) in whole.items():
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"Recipe {name} must be a whole number of at least {least} (the paper: {paper:,}); "
                                 f"got {value!r}")
        positive = {"lr": 0.1, "lr_factor": 0.1, "warmup_lr": 0.01}
        at_least_zero = {"momentum": 0.9, "weight_decay": 1e-4, "warmup_until_error": 0.8}
        for name, paper in {**positive, **at_least_zero}.items():
            value = getattr(self, name)
            if value is None and name == "warmup_lr":
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0 or (
                    name in positive and value == 0):
                bound = "above 0" if name in positive else "at least 0"
                raise ValueError(f"Recipe {name} must be a finite number {bound} (the paper: {paper}); got {value!r}")
        if self.momentum >= 1:
            raise ValueError(f"Recipe momentum must be below 1 (the paper: 0.9); got {self.momentum!r}: at 1 or "
                             "above, SGD's velocity never forgets a step and grows without bound")
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

    def describe_split(self) -> str:
        """Which training images the recipe trains on."""
        if self.validation:
            return f"{self.validation:,} training images held out for validation"
        return "all training images (no validation split)"

    def describe(self) -> str:
        """One line that says how far this recipe is from the paper's."""
        scale = "the paper's full schedule" if self.iterations == self.paper_iterations else (
            f"{self.iterations / self.paper_iterations:.3g}x the paper's {self.paper_iterations:,} iterations")
        warmup = f", warm-up at lr {self.warmup_lr} until training error < {self.warmup_until_error:.0%}" \
            if self.warmup_lr is not None else ""
        return (f"{self.model}: {self.iterations:,} iterations of batch {self.batch_size} ({scale}), lr {self.lr} "
                f"x{self.lr_factor} at {list(self.milestones)}{warmup}, momentum {self.momentum}, "
                f"weight decay {self.weight_decay}, {self.describe_split()}")


def paper_recipe(name: str, split: bool = False) -> Recipe:
    """Sec. 4.2's recipe for a CIFAR-10 net by name (resnet20 ... resnet1202, plain20 ...
    plain110); the 110-layer nets and ResNet-1202 get the warm-up at lr 0.01 (Sec. 4.2's for
    ResNet-110; our reading for the others, see the module's docstring). It trains on all 50k
    training images (our reading of the paper's reported models); ``split=True`` holds out 5k
    of them for validation, as the paper did to fix (at least) the schedule's 64k end."""
    if name not in CIFAR_MODEL_NAMES:
        raise ValueError(f"no CIFAR-10 recipe for {name!r}; valid names: {', '.join(CIFAR_MODEL_NAMES)}")
    depth = int(name.removeprefix("resnet").removeprefix("plain"))
    return Recipe(model=name, warmup_lr=0.01 if depth >= 110 else None,
                  validation=PAPER_VALIDATION if split else 0)


def sgd(params, recipe: Recipe, lr: float | None = None, fused: bool | None = None) -> torch.optim.SGD:
    """Sec. 4.2's optimizer: SGD with the recipe's momentum and weight decay, at ``lr`` (the
    recipe's by default). ``fused`` (default: on a GPU) updates every parameter in one kernel."""
    params = list(params)
    fused = params[0].is_cuda if fused is None else fused
    return torch.optim.SGD(params, lr=recipe.lr if lr is None else lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, fused=fused)
