"""Sec. 3.4 of the paper: how the ImageNet networks were trained and tested, as data one can
print, beside torchvision's reference recipe; and the paper's augmentation and test-time views
as torchvision transforms, to try on an image.

Training (Sec. 3.4): the image's shorter side is resized to a random length in [256, 480]
(scale augmentation, from VGG [41]); a random 224x224 crop of it or of its horizontal flip is
taken; the per-pixel mean is subtracted; AlexNet's colour augmentation [21] is applied. BN
follows every convolution, weights start as in He et al. [13]; SGD with mini-batches of 256,
learning rate 0.1 divided by 10 when the error plateaus, up to 600,000 iterations (an upper
bound: the paper does not say how long each net trained), weight decay 1e-4, momentum 0.9, no
dropout. Testing: the standard 10-crop testing of AlexNet [21] for the comparisons; for the
best results, the fully convolutional network on the whole image at several scales, scores
averaged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

#: ImageNet-1k (ILSVRC 2012) training images: what "epochs" are counted in.
IMAGENET_TRAINING_IMAGES = 1_281_167


@dataclass(frozen=True)
class ImageNetRecipe:
    """One way of training and testing an ImageNet classifier, field by field."""

    name: str
    training_crop: str
    flip: str
    normalization: str
    colour_augmentation: str
    batch_norm: str
    initialization: str
    batch_size: int
    lr: float
    lr_schedule: str
    iterations: int
    weight_decay: float
    momentum: float
    dropout: str
    bottleneck_stride: str
    testing: str
    #: ``True`` where ``iterations`` is the most the recipe allows, not the length of a run
    iterations_upper_bound: bool = False

    @property
    def epochs(self) -> float:
        """Passes over ImageNet's training images: iterations x batch / 1,281,167."""
        return self.iterations * self.batch_size / IMAGENET_TRAINING_IMAGES

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` for every field, numbers written out, the length in iterations
        and in epochs (as "up to ..., at most ... epochs" where it is only an upper bound)."""
        rows = []
        for f in dataclasses.fields(self):
            if f.name in ("name", "iterations_upper_bound"):
                continue
            value = getattr(self, f.name)
            if f.name == "iterations" and self.iterations_upper_bound:
                value = f"up to {value:,} (an upper bound: at most {self.epochs:.0f} epochs)"
            elif f.name == "iterations":
                value = f"{value:,} iterations = {self.epochs:.0f} epochs"
            rows.append((f.name.replace("_", " "), str(value)))
        return rows

    def describe(self) -> str:
        """The recipe as a two-column text table."""
        width = max(len(name) for name, _ in self.rows()) + 2
        return "\n".join([self.name] + [f"  {name:<{width}}{value}" for name, value in self.rows()])


#: Sec. 3.4, in numbers. Its 600,000 iterations are an upper bound ("up to"), not the length of
#: every run. Sec. 3.4 names the 10-crop test by citing AlexNet [21] and gives no sizes; the
#: views of :func:`ten_crops` (corners and centre of the image resized to a shorter side of 256,
#: and of its mirror image) are the common practice, not the paper's text.
PAPER = ImageNetRecipe(
    name="He et al. (2015), Sec. 3.4",
    training_crop="shorter side resized to a random length in [256, 480], then a random 224x224 crop",
    flip="random horizontal flip",
    normalization="per-pixel mean subtracted",
    colour_augmentation="AlexNet's PCA lighting noise (std 0.1)",
    batch_norm="after every convolution, before the activation",
    initialization="He et al. 2015 [13]",
    batch_size=256,
    lr=0.1,
    lr_schedule="divided by 10 when the error plateaus",
    iterations=600_000,
    weight_decay=1e-4,
    momentum=0.9,
    dropout="none",
    bottleneck_stride="first 1x1 convolution (not in the text: Table 1's FLOPs and the released Caffe models)",
    testing="10-crop [21] for comparisons; best results: fully convolutional, shorter side in {224, 256, 384, 480, 640}, scores averaged",
    iterations_upper_bound=True,
)

#: torchvision's reference training script for its ResNets (references/classification, the
#: IMAGENET1K_V1 weights): 8 GPUs x 32 images, 90 epochs, learning rate / 10 every 30 epochs.
TORCHVISION_REFERENCE = ImageNetRecipe(
    name="torchvision's reference recipe (IMAGENET1K_V1 weights)",
    training_crop="RandomResizedCrop(224): 8%-100% of the area, aspect ratio 3/4-4/3, resized to 224x224",
    flip="random horizontal flip",
    normalization="per-channel mean and std (Normalize)",
    colour_augmentation="none",
    batch_norm="after every convolution, before the activation",
    initialization="He et al. 2015 [13]",
    batch_size=256,
    lr=0.1,
    lr_schedule="divided by 10 every 30 epochs",
    iterations=round(90 * IMAGENET_TRAINING_IMAGES / 256),
    weight_decay=1e-4,
    momentum=0.9,
    dropout="none",
    bottleneck_stride="3x3 convolution (\"v1.5\")",
    testing="one 224x224 centre crop of the image resized to a shorter side of 256",
)


def compare(first: ImageNetRecipe, second: ImageNetRecipe, labels: tuple[str, str] = ("paper", "torchvision")) -> str:
    """The two recipes field by field: one line where they agree (``same``), two where they
    differ, each value after its recipe's label."""
    rows = list(zip(first.rows(), second.rows()))
    name_w = max(len(name) for (name, _), _ in rows) + 2
    label_w = max(map(len, labels)) + 2
    lines = [f"{labels[0]}: {first.name}", f"{labels[1]}: {second.name}", ""]
    for (name, a), (_, b) in rows:
        if a == b:
            lines.append(f"{name:<{name_w}}{'same':<{label_w}}{a}")
        else:
            lines.append(f"{name:<{name_w}}{labels[0]:<{label_w}}{a}")
            lines.append(f"{'':<{name_w}}{labels[1]:<{label_w}}{b}")
    return "\n".join(lines)


# --- The training augmentation, as torchvision transforms ---


def rgb_principal_components(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (largest first) and eigenvectors (columns) of the 3x3 covariance of the RGB
    values of every pixel of ``images``, uint8 of shape (N, H, W, 3), scaled to [0, 1]:
    the principal components AlexNet's colour augmentation [21] moves along."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    pixels = images.reshape(-1, 3).double() / 255
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(pixels.T))
    order = eigenvalues.argsort(descending=True)
    return eigenvalues[order].float(), eigenvectors[:, order].float()


class PCALighting(nn.Module):
    """AlexNet's colour augmentation [21], which Sec. 3.4 uses: add to every pixel of a float
    image (3, H, W) in [0, 1] the same RGB offset ``eigenvectors @ (alpha * eigenvalues)``,
    with ``alpha`` drawn once per image from a normal distribution of std ``std`` (0.1)."""

    def __init__(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, std: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("eigenvalues", torch.as_tensor(eigenvalues, dtype=torch.float32))
        self.register_buffer("eigenvectors", torch.as_tensor(eigenvectors, dtype=torch.float32))
        self.std, self.generator = std, generator

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point() or image.shape[-3] != 3:
            raise ValueError("PCALighting works on a float RGB image (3, H, W); put v2.ToDtype(torch.float32, "
                             "scale=True) before it")
        alpha = torch.randn(3, generator=self.generator) * self.std
        offset = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + offset.view(3, 1, 1).to(image)


def paper_training_transform(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor,
                             mean_image: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Sec. 3.4's training views as a torchvision pipeline on a uint8 image tensor (3, H, W):
    shorter side to a random length in [256, 480], random 224x224 crop, random flip, to float,
    PCA lighting, and (given a (3, 224, 224) ``mean_image``) the per-pixel mean subtracted."""
    steps = [
        v2.RandomShortestSize(min_size=list(range(256, 481)), antialias=True),
        v2.RandomCrop(224),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        PCALighting(eigenvalues, eigenvectors, generator=generator),
    ]
    if mean_image is not None:
        steps.append(v2.Lambda(lambda image: image - mean_image))
    return v2.Compose(steps)


def torchvision_training_transform():
    """torchvision's reference training views, for comparison (before its Normalize)."""
    return v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True)])


def ten_crops(image: torch.Tensor, resize: int = 256, crop: int = 224) -> list[torch.Tensor]:
    """The 10 test views: corners and centre of the image resized to a shorter side of
    ``resize``, and of its mirror image. Sec. 3.4 only cites AlexNet [21] for 10-crop testing;
    the resize to 256 is the common practice, not the paper's text."""
    return list(v2.TenCrop(crop)(v2.Resize(resize, antialias=True)(image)))


# --- Testing fully convolutionally at several scales ---


def score_map(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The classifier applied at every position of the last feature map, as a 1x1 convolution
    with the fc layer's weights (the "fully-convolutional form" of Sec. 3.4): (N, classes, h, w)
    for a batch (N, 3, H, W) of any size. Its spatial mean equals ``model(image)``, because
    averaging and a linear layer commute."""
    features = model.features(image)
    weight = model.fc.weight[:, :, None, None]
    return F.conv2d(features, weight, model.fc.bias)


def multiscale_scores(model: nn.Module, image: torch.Tensor, scales=(224, 256, 384, 480, 640)) -> torch.Tensor:
    """Sec. 3.4's best test: resize the image so its shorter side is each of ``scales``, score
    it fully convolutionally, average the score maps over positions and then over scales.
    ``image``: a float batch (N, 3, H, W), normalized as for training."""
    scores = [score_map(model, v2.Resize(size, antialias=True)(image)).mean(dim=(2, 3)) for size in scales]
    return torch.stack(scores).mean(0)
