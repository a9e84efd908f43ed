"""CIFAR-10 loading (sources, cache, error messages), subsets, the split and Sec. 4.2's
preprocessing (per-pixel mean, pad-crop-flip on the device)."""

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from annotated_resnet import data
from annotated_resnet.data import (
    CLASSES,
    augment,
    balanced_subset,
    load_cifar10,
    normalize,
    pixel_mean,
    to_tensor,
    train_val_split,
)

REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def make_tree(root: Path, classes=CLASSES, train_per_class=2, test_per_class=1, suffix=".png") -> Path:
    """A tiny fastai-layout tree under one top folder; pixel values encode (class, index)."""
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            folder = root / "cifar10" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.full((32, 32, 3), 10 * c + i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}{suffix}")
    return root / "cifar10"


def make_archive(tree: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    return archive


def test_image_folder_loads_and_is_cached(tmp_path):
    tree = make_tree(tmp_path / "src")
    cache_dir = tmp_path / "cache"
    cifar = load_cifar10(tree, data_dir=cache_dir)
    assert cifar.train_images.shape == (20, 32, 32, 3) and cifar.train_images.dtype == np.uint8
    assert cifar.test_images.shape == (10, 32, 32, 3)
    assert cifar.classes == CLASSES
    assert cifar.train_labels.dtype == np.int64
    assert np.array_equal(np.bincount(cifar.train_labels), [2] * 10)
    # labels match the folder the pixels came from
    assert np.array_equal(cifar.train_images[:, 0, 0, 0] // 10, cifar.train_labels)
    caches = list(cache_dir.glob("cifar10-*.npz"))
    assert len(caches) == 1 and not list(cache_dir.glob(".cifar10-*"))  # no temp file left
    again = load_cifar10(tree, data_dir=cache_dir)
    assert np.array_equal(again.train_images, cifar.train_images) and again.source == cifar.source


def test_changed_source_is_read_again(tmp_path):
    tree = make_tree(tmp_path / "src")
    cache_dir = tmp_path / "cache"
    load_cifar10(tree, data_dir=cache_dir)
    changed = tree / "train" / "cat" / "0000.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(0, 10**18))
    cifar = load_cifar10(tree, data_dir=cache_dir)
    assert len(list(cache_dir.glob("cifar10-*.npz"))) == 1  # the stale entry is gone
    assert (cifar.train_images[cifar.train_labels == CLASSES.index("cat")] == 200).any()


def test_archive_equals_folder_and_env_variable_is_used(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "src")
    archive = make_archive(tree, tmp_path / "cifar10.tar.gz")
    from_folder = load_cifar10(tree, data_dir=tmp_path / "cache")
    monkeypatch.setenv(data.SOURCE_VARIABLE, str(archive))
    from_archive = load_cifar10(data_dir=tmp_path / "cache")
    assert str(archive) in from_archive.source
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(from_archive, field), getattr(from_folder, field))


def test_wrong_classes_are_named(tmp_path):
    classes = [c for c in CLASSES if c != "truck"] + ["tree"]
    tree = make_tree(tmp_path / "src", classes=classes)
    with pytest.raises(ValueError, match=r"missing \['truck'\], extra \['tree'\]"):
        load_cifar10(tree, data_dir=tmp_path / "cache")


def test_corrupt_image_is_named(tmp_path):
    tree = make_tree(tmp_path / "src", suffix=".jpg")
    broken = tree / "test" / "dog" / "0000.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode the image .*test/dog/0000\.jpg"):
        load_cifar10(tree, data_dir=tmp_path / "cache")


def test_corrupt_archive_is_named(tmp_path):
    archive = make_archive(make_tree(tmp_path / "src"), tmp_path / "cifar10.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read the archive .*truncated\.tar\.gz"):
        load_cifar10(truncated, data_dir=tmp_path / "cache")


def test_missing_source_says_how_to_get_one(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=data.SOURCE_VARIABLE):
        load_cifar10(tmp_path / "nowhere.tar.gz", data_dir=tmp_path)
    monkeypatch.delenv(data.SOURCE_VARIABLE, raising=False)
    with pytest.raises(FileNotFoundError, match="torchvision") as error:
        load_cifar10(data_dir=tmp_path, download=False)
    assert data.SOURCE_VARIABLE in str(error.value)


def test_failed_download_says_where_to_point(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv(data.SOURCE_VARIABLE, raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match="could not download CIFAR-10") as error:
        load_cifar10(data_dir=tmp_path)
    assert data.SOURCE_VARIABLE in str(error.value) and "network is unreachable" in str(error.value)


def test_the_jpeg_archive_holds_all_of_cifar10(cifar_archive):
    cifar = load_cifar10(cifar_archive, data_dir=REPO_DATA)
    assert cifar.train_images.shape == (50_000, 32, 32, 3)
    assert cifar.test_images.shape == (10_000, 32, 32, 3)
    assert np.array_equal(np.bincount(cifar.train_labels), [5000] * 10)
    assert np.array_equal(np.bincount(cifar.test_labels), [1000] * 10)
    assert "JPEG" in cifar.source


def fake_labels(per_class=100):
    labels = np.repeat(np.arange(10), per_class)
    return np.arange(len(labels))[:, None], labels  # "images" that are their own index


def test_balanced_subset_is_deterministic_and_balanced():
    images, labels = fake_labels()
    a_images, a_labels = balanced_subset(images, labels, per_class=7, seed=0)
    b_images, _ = balanced_subset(images, labels, per_class=7, seed=0)
    c_images, _ = balanced_subset(images, labels, per_class=7, seed=1)
    assert np.array_equal(np.bincount(a_labels), [7] * 10)
    assert np.array_equal(labels[a_images[:, 0]], a_labels)
    assert np.array_equal(a_images, b_images) and not np.array_equal(a_images, c_images)
    with pytest.raises(ValueError, match="has only 100"):
        balanced_subset(images, labels, per_class=101)


def test_validation_split_is_class_balanced_and_disjoint():
    images, labels = fake_labels(per_class=5000)
    train_images, train_labels, val_images, val_labels = train_val_split(images, labels, validation=5000)
    assert len(train_labels) == 45_000 and len(val_labels) == 5000
    assert np.array_equal(np.bincount(val_labels), [500] * 10)
    assert not set(train_images[:, 0]) & set(val_images[:, 0])
    again = train_val_split(images, labels, validation=5000)
    assert np.array_equal(again[2], val_images)


def test_pixel_mean_is_a_mean_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    mean = pixel_mean(images)
    assert mean.shape == (3, 32, 32) and mean.dtype == torch.float32
    assert torch.allclose(mean, to_tensor(images).float().mean(0) / 255)
    assert torch.allclose(pixel_mean(to_tensor(images)), mean)
    centred = normalize(to_tensor(images), mean)
    assert centred.dtype == torch.float32 and centred.mean(0).abs().max() < 1e-5


def test_a_cache_inside_the_source_folder_does_not_change_its_key(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "0.png").write_bytes(b"image")
    key = data._source_key(tmp_path)
    (tmp_path / "cifar10-1234-abcd.npz").write_bytes(b"cache")
    assert data._source_key(tmp_path) == key
    (tmp_path / "train" / "1.png").write_bytes(b"another image")
    assert data._source_key(tmp_path) != key


def test_images_with_the_channels_first_are_explained():
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\).*got shape \(4, 3, 32, 32\).*permute"):
        to_tensor(np.zeros((4, 3, 32, 32), dtype=np.uint8))


def test_augment_pads_crops_and_flips():
    torch.manual_seed(0)
    batch = torch.randint(1, 256, (256, 3, 32, 32), dtype=torch.uint8)
    one = batch[:1].expand(256, -1, -1, -1)
    out = augment(one, generator=torch.Generator().manual_seed(0))
    assert out.shape == one.shape and out.dtype == torch.uint8
    # every output is a 32x32 window of the zero-padded image, or its mirror
    padded = torch.nn.functional.pad(batch[0], (4, 4, 4, 4))
    crops = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
    windows = {crop.numpy().tobytes() for crop in crops} | {crop.flip(-1).numpy().tobytes() for crop in crops}
    assert all(image.numpy().tobytes() in windows for image in out)
    distinct = {image.numpy().tobytes() for image in out}
    assert len(distinct) > 100  # crops and flips vary from image to image
    unflipped = {padded[:, i:i + 32, j:j + 32].numpy().tobytes() for i in range(9) for j in range(9)}
    flipped = sum(image.numpy().tobytes() not in unflipped for image in out)
    assert 80 < flipped < 176  # about half are mirrored
    assert (out == 0).any() and out.max() <= batch[0].max()
    # float batches work the same way; padding=0 leaves only the flips
    flips_only = augment(batch.float(), padding=0)
    same = (flips_only == batch.float()).flatten(1).all(1)
    mirrored = (flips_only == batch.float().flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_augment_is_reproducible_with_a_generator():
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = augment(batch, generator=torch.Generator().manual_seed(3))
    b = augment(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
