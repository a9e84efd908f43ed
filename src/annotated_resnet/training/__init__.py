"""Training by the paper's CIFAR-10 recipe (Sec. 4.2): the recipe's numbers (:mod:`.recipe`),
the data on the device (:mod:`.batches`), one SGD step (:mod:`.step`), checkpoints that resume
exactly (:mod:`.checkpoints`), test error (:mod:`.evaluation`), the training loop
(:mod:`.train`), a finished run written as a reference run (:mod:`.results`), data-parallel
training through torchrun (:mod:`.distributed`) and the launcher that trains the paper's sets
of runs as processes side by side (:mod:`.launcher`)."""

from .recipe import CIFAR_MODEL_NAMES, Recipe, paper_recipe
from .train import NonFiniteLossError, train
from .evaluation import evaluate

__all__ = ["CIFAR_MODEL_NAMES", "NonFiniteLossError", "Recipe", "evaluate", "paper_recipe", "train"]
