"""Fixtures shared by the training, command-line and GPU-job tests."""

import numpy as np
import pytest
import torch
from PIL import Image

from annotated_resnet.data import CLASSES


@pytest.fixture(scope="module")
def one_thread():
    """The test networks are tiny: one thread runs them fastest (a second only adds waiting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def make_image_tree(tmp_path_factory):
    """Build a tiny CIFAR-10-shaped image-folder tree of PNGs whose brightness carries the class."""
    def make(train_per_class: int, test_per_class: int = 2):
        root = tmp_path_factory.mktemp("cifar") / "cifar10"
        rng = np.random.default_rng(0)
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for c, name in enumerate(CLASSES):
                (root / split / name).mkdir(parents=True)
                for i in range(count):
                    pixels = rng.integers(0, 100, (32, 32, 3)) + 15 * c
                    Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
        return root
    return make
