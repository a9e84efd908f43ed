"""CIFAR-10 as the paper uses it (Sec. 4.2): 50k training and 10k test images of 32x32 pixels,
per-pixel mean subtracted, padded-crop-and-flip augmentation for training only.

Where the images come from, in order of precedence:

1. the ``source`` argument of :func:`load_cifar10`;
2. the environment variable ``ANNOTATED_RESNET_CIFAR10``;
3. torchvision's CIFAR-10, downloaded into the data folder (``./data`` by default).

A source is an image-folder tree in fastai's layout (``train/<class>/*.jpg`` and
``test/<class>/*.jpg``, possibly under one top folder such as ``cifar10/``), a ``.tar.gz`` of
such a tree, or a torchvision root (a folder holding ``cifar-10-batches-py``). Images are
decoded once and the uint8 arrays cached in the data folder, keyed by the source's path,
size and modification time, so a changed source is read again.

Everything after loading works on whole batches as tensors on the training device:
:func:`augment` (Sec. 4.2's pad 4, random 32x32 crop, random horizontal flip) and
:func:`normalize` (per-pixel mean subtraction).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SOURCE_VARIABLE = "ANNOTATED_RESNET_CIFAR10"
DEFAULT_DATA_DIR = Path("data")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SIZE = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
TORCHVISION_FOLDER = "cifar-10-batches-py"
SPLITS = ("train", "test")

HOW_TO_PROVIDE = (
    "Provide CIFAR-10 in one of these ways:\n"
    "  - with internet: give no source (no --data, no $ANNOTATED_RESNET_CIFAR10) and torchvision "
    "downloads it into ./data;\n"
    f"  - point at a local copy: export {SOURCE_VARIABLE}=/path/to/cifar10.tar.gz or /path/to/cifar10 "
    "(an image-folder tree train/<class>/*.jpg, test/<class>/*.jpg, or a .tar.gz of one), "
    "or pass it as load_cifar10(source) / --data PATH."
)


@dataclass(frozen=True)
class CIFAR10:
    """The decoded data set: ``*_images`` are uint8 arrays (N, 32, 32, 3), ``*_labels`` int64
    arrays (N,) indexing :attr:`classes`. :attr:`source` says where the images came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str

    def __repr__(self) -> str:
        return (f"CIFAR10({len(self.train_labels):,} train, {len(self.test_labels):,} test images, "
                f"source={self.source!r})")


# --- Loading ---


def load_cifar10(source: str | os.PathLike | None = None, data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
                 download: bool = True) -> CIFAR10:
    """Load CIFAR-10 from ``source``, else ``$ANNOTATED_RESNET_CIFAR10``, else torchvision's
    copy in ``data_dir`` (downloaded there if ``download``). Decoded arrays are cached in
    ``data_dir``; the second load of the same source reads the cache."""
    data_dir = Path(data_dir)
    if source is None and os.environ.get(SOURCE_VARIABLE):
        source = os.environ[SOURCE_VARIABLE]
    if source is None:
        return _load_torchvision(data_dir, download)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 source {str(path)!r} does not exist.\n{HOW_TO_PROVIDE}")
    if path.is_dir() and (path / TORCHVISION_FOLDER).is_dir():
        return _load_torchvision(path, download=False)
    if path.is_dir() or path.name.endswith(ARCHIVE_SUFFIXES):
        return _cached(path, data_dir, _decode_image_folder)
    raise ValueError(f"CIFAR-10 source {str(path)!r} is neither a folder nor a .tar.gz/.tgz/.tar archive.\n"
                     f"{HOW_TO_PROVIDE}")


def _load_torchvision(root: Path, download: bool) -> CIFAR10:
    """torchvision's CIFAR10 (the original pickled batches), downloaded into ``root``."""
    from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

    if not (root / TORCHVISION_FOLDER).is_dir() and not download:
        raise FileNotFoundError(f"no CIFAR-10 in {str(root)!r} and downloading is off.\n{HOW_TO_PROVIDE}")
    try:
        splits = [TorchvisionCIFAR10(str(root), train=split == "train", download=download) for split in SPLITS]
    except Exception as error:  # network errors come in many types (URLError, OSError, ...)
        what = "download CIFAR-10 into" if download else "read torchvision's CIFAR-10 batches in"
        raise RuntimeError(f"could not {what} {str(root)!r} ({error}).\n{HOW_TO_PROVIDE}") from error
    train, test = splits
    return CIFAR10(train.data, np.asarray(train.targets, dtype=np.int64), test.data,
                   np.asarray(test.targets, dtype=np.int64), tuple(train.classes),
                   f"torchvision CIFAR-10 in {root}")


def _cached(path: Path, data_dir: Path, decode) -> CIFAR10:
    """Decode ``path`` once; later calls read the uint8 arrays from ``data_dir``."""
    place, state = _source_key(path)
    cache = data_dir / f"cifar10-{place}-{state}.npz"
    if cache.exists():
        with np.load(cache) as arrays:
            info = json.loads(str(arrays["info"]))
            return CIFAR10(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                           arrays["test_labels"], tuple(info["classes"]), info["source"])
    data = decode(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    info = json.dumps({"classes": data.classes, "source": data.source})
    with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".cifar10-", suffix=".npz", delete=False) as tmp:
        np.savez(tmp, train_images=data.train_images, train_labels=data.train_labels,
                 test_images=data.test_images, test_labels=data.test_labels, info=np.array(info))
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, cache)  # atomic: a reader sees the old cache or the complete new one
    for stale in data_dir.glob(f"cifar10-{place}-*.npz"):  # the same source as it was before it changed
        if stale != cache:
            stale.unlink(missing_ok=True)
    return data


def _source_key(path: Path) -> tuple[str, str]:
    """Short hashes of the source's absolute path and of its size and modification time (for
    a folder: of every file in it), so that a changed source gets a new cache entry."""
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _is_cache_file(p)) if path.is_dir() else [path]
    state = hashlib.sha256()
    for file in files:
        stat = file.stat()
        state.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return hashlib.sha256(str(path).encode()).hexdigest()[:8], state.hexdigest()[:12]


def _is_cache_file(path: Path) -> bool:
    """A cache this module wrote (``cifar10-*.npz``, or one being written), which may sit
    inside a source folder such as ``data/`` without making the source look changed."""
    return path.suffix == ".npz" and path.name.startswith(("cifar10-", ".cifar10-"))


def _describe(path: Path, names: list[str]) -> str:
    kind = "archive of an image-folder tree" if path.is_file() else "image-folder tree"
    if any(name.lower().endswith((".jpg", ".jpeg")) for name in names):
        kind += " of JPEGs (lossy re-encoded CIFAR-10, not bit-identical to the original)"
    return f"{kind}: {path}"


def _decode_image_folder(path: Path) -> CIFAR10:
    """Read every image of a fastai-layout tree (a folder or an archive of one)."""
    if path.is_dir():
        entries = ((p.relative_to(path).parts, p.read_bytes, str(p)) for p in sorted(path.rglob("*")) if p.is_file())
        images = _collect(entries, path)
    else:
        try:
            with tarfile.open(path, "r:*") as archive:
                entries = ((Path(m.name).parts, archive.extractfile(m).read, f"{path}:{m.name}")
                           for m in archive if m.isfile())
                images = _collect(entries, path)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            raise ValueError(f"cannot read the archive {str(path)!r}: {error}. Is it a complete .tar.gz of an "
                             f"image-folder tree? Download or copy it again.") from error
    source = _describe(path, [name for _, name, _ in images["train"]])
    train_images, train_labels = _stack(images["train"])
    test_images, test_labels = _stack(images["test"])
    return CIFAR10(train_images, train_labels, test_images, test_labels, CLASSES, source)


def _collect(entries, root: Path) -> dict[str, list]:
    """Decode the images of ``entries`` (parts, read function, name) into per-split lists of
    (class, file name, pixels); check that the classes are CIFAR-10's."""
    found = {split: [] for split in SPLITS}
    for parts, read, name in entries:
        if len(parts) < 3 or parts[-3] not in SPLITS or len(parts) > 4:
            continue
        if parts[-1].startswith(".") or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            continue
        found[parts[-3]].append((parts[-2], parts[-1], _decode(read(), name)))
    for split in SPLITS:
        if not found[split]:
            raise ValueError(f"no {split}/<class>/ images found in {str(root)!r}; expected an image-folder tree "
                             f"train/<class>/*.jpg and test/<class>/*.jpg (optionally under one top folder).\n"
                             f"{HOW_TO_PROVIDE}")
        classes = {label for label, _, _ in found[split]}
        if classes != set(CLASSES):
            missing, extra = sorted(set(CLASSES) - classes), sorted(classes - set(CLASSES))
            raise ValueError(f"{str(root)!r} {split}/ does not hold CIFAR-10's classes: missing {missing}, "
                             f"extra {extra}; expected the folders {', '.join(CLASSES)}")
    return found


def _decode(raw: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except Exception as error:  # Pillow raises several types for broken files
        raise ValueError(f"cannot decode the image {name}: {error}. Replace the file or get the data set again.") from error
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"the image {name} is {pixels.shape[1]}x{pixels.shape[0]}; CIFAR-10 images are 32x32")
    return pixels


def _stack(items: list) -> tuple[np.ndarray, np.ndarray]:
    """Sort by class and file name (archive order varies), stack into arrays."""
    items.sort(key=lambda item: (item[0], _natural_key(item[1])))
    images = np.stack([pixels for _, _, pixels in items])
    labels = np.array([CLASSES.index(label) for label, _, _ in items], dtype=np.int64)
    return images, labels


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# --- Subsets and the validation split ---


def _per_class_choice(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``per_class`` seeded random images of each class, and of all the others."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if per_class > len(members):
            raise ValueError(f"asked for {per_class} images per class but class {label} has only {len(members)}")
        chosen.append(rng.permutation(members)[:per_class])
    chosen = np.sort(np.concatenate(chosen))
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return chosen, rest


def balanced_subset(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int = 0):
    """``per_class`` images of every class, chosen at random with ``seed`` (the same every
    time for the same seed), in their original order."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    chosen, _ = _per_class_choice(labels, per_class, seed)
    return images[chosen], labels[chosen]


def train_val_split(images: np.ndarray, labels: np.ndarray, validation: int = 5000, seed: int = 0):
    """Hold out ``validation`` training images, the same number from each class, as Sec. 4.2's
    45k/5k split. Returns ``(train_images, train_labels, val_images, val_labels)``."""
    classes = len(np.unique(labels))
    if validation % classes:
        raise ValueError(f"validation={validation} does not split evenly over {classes} classes")
    val, train = _per_class_choice(labels, validation // classes, seed)
    return images[train], labels[train], images[val], labels[val]


# --- Preprocessing on the device (Sec. 4.2) ---


def to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, 32, 32, 3) array -> uint8 tensor (N, 3, 32, 32) on ``device``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images as CIFAR10 holds them, (N, 32, 32, 3) with the channels "
                         f"last, got shape {tuple(images.shape)}; a (N, 3, H, W) batch becomes that with "
                         "x.permute(0, 2, 3, 1)")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)


def pixel_mean(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The per-pixel mean image (3, 32, 32) of the training images, in [0, 1] units: the
    only normalisation the paper uses (Sec. 4.2, "per-pixel mean subtracted")."""
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images.mean(axis=0, dtype=np.float64)).permute(2, 0, 1).float() / 255
    return images.double().mean(dim=0).float() / 255


def normalize(batch: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """uint8 batch (N, 3, 32, 32) -> float, scaled to [0, 1], per-pixel mean subtracted."""
    return batch.float().div_(255).sub_(mean.to(batch.device))


def augment(batch: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sec. 4.2's training augmentation on a whole batch (N, C, H, W), in one pass of tensor
    ops: pad ``padding`` zero pixels on each side, take a random HxW crop and flip it
    horizontally with probability 1/2, independently for every image."""
    n, _, height, width = batch.shape
    padded = F.pad(batch, (padding, padding, padding, padding))
    device = batch.device
    top = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    flip = torch.rand(n, 1, device=device, generator=generator) < 0.5
    rows = top + torch.arange(height, device=device)
    cols = left + torch.arange(width, device=device)
    cols = torch.where(flip, cols.flip(1), cols)
    picked = padded[torch.arange(n, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # advanced indexing put the channels last
