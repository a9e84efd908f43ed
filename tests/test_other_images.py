"""tools/other_images.py: the altered copies of CIFAR-10 that `make test-other-images` runs the
notebooks on hold the same images, labels and layout, with every image changed."""

import importlib.util
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotated_resnet.data import CLASSES, load_cifar10

TOOL = Path(__file__).resolve().parent.parent / "tools" / "other_images.py"


@pytest.fixture(scope="module")
def other_images():
    spec = importlib.util.spec_from_file_location("other_images", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def noisy_archive(folder: Path) -> Path:
    """An archive of 20 training and 10 test images of random pixels, as JPEG files."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", 1)):
        for name in CLASSES:
            (folder / "cifar10" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / "cifar10" / split / name / f"{i:04d}.jpg", quality=75)
    archive = folder / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "cifar10", arcname="cifar10")
    return archive


@pytest.mark.parametrize("change", ["jpeg50", "sharpened"])
def test_every_image_changes_and_keeps_its_label(tmp_path, other_images, change):
    source = noisy_archive(tmp_path / "source")
    target = tmp_path / f"cifar10-{change}.tar.gz"
    count, rms = other_images.rewrite(str(source), str(target), other_images.CHANGES[change])
    before, after = load_cifar10(source, data_dir=tmp_path), load_cifar10(target, data_dir=tmp_path)
    assert count == 30 and not Path(f"{target}.partial").exists()
    assert np.array_equal(before.train_labels, after.train_labels)
    assert np.array_equal(before.test_labels, after.test_labels)
    assert after.train_images.shape == (20, 32, 32, 3) and after.test_images.shape == (10, 32, 32, 3)
    moved = np.sqrt(np.mean((after.train_images.astype(float) - before.train_images.astype(float)) ** 2,
                            axis=(1, 2, 3)))
    assert (moved > 1).all() and rms > 1


def test_a_source_that_is_not_an_archive_is_explained(tmp_path, other_images):
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(SystemExit, match="not a tar archive: expected an archive of an image-folder tree"):
        other_images.rewrite(str(tmp_path / "cifar10"), str(tmp_path / "out.tar.gz"), other_images.jpeg50)


def test_an_archive_without_images_is_explained(tmp_path, other_images):
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        tar.add(tmp_path, arcname="cifar10", recursive=False)
    with pytest.raises(SystemExit, match="holds no image files"):
        other_images.rewrite(str(empty), str(tmp_path / "out.tar.gz"), other_images.jpeg50)
    assert not (tmp_path / "out.tar.gz").exists() and not (tmp_path / "out.tar.gz.partial").exists()
