"""Every network of He et al., *Deep Residual Learning for Image Recognition* (2015).

The file follows the paper's order:

1. the shortcut connections of Sec. 3.2 and 3.3 (identity, option A, options B and C);
2. the building block of Fig. 2 and the bottleneck block of Fig. 5;
3. one network class that stacks blocks into stages (Fig. 3, Table 1, Sec. 4.2);
4. the CIFAR-10 family of Sec. 4.2 (6n+2 layers) and the ImageNet family of Table 1;
5. one entry point by name, :func:`create_model`.

Parameter names follow torchvision's ``models/resnet.py`` (``conv1``, ``bn1``, ``layer1``,
``downsample``, ``fc``), so a torchvision state_dict loads into our ImageNet networks with
``strict=True``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

#: Shortcut options of Sec. 3.3 and Table 3, plus "none" for the plain networks.
SHORTCUT_OPTIONS = {
    "A": "identity; zero-padded channels and stride-2 subsampling where dimensions change",
    "B": "identity; 1x1 projection (conv + BN) only where dimensions change",
    "C": "1x1 projection (conv + BN) on every block",
    "none": "no shortcut at all: the plain network",
}


def _check_shortcut(shortcut: str) -> str:
    if shortcut not in SHORTCUT_OPTIONS:
        choices = ", ".join(f"{k!r} ({v})" for k, v in SHORTCUT_OPTIONS.items())
        raise ValueError(f"unknown shortcut option {shortcut!r}; expected one of: {choices}")
    return shortcut


# --- 1. Shortcuts (Sec. 3.2, Eq. 1 and 2; Sec. 3.3 options A and B; Table 3 option C) ---


class ZeroPadShortcut(nn.Module):
    """Option A (Sec. 3.3): subsample by taking every ``stride``-th pixel, then append zero
    channels until the width matches. It has no parameters, like the identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option A can only widen: got {in_channels} -> {out_channels} channels; "
                "use shortcut='B' to project to fewer channels"
            )
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Options B and C: the linear projection W_s of Eq. 2, a 1x1 convolution (strided
    where the map halves) followed by BN, as in Sec. 3.3 and 3.4."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def make_shortcut(shortcut: str, in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The shortcut module of one block, or ``None`` where the shortcut is the bare identity
    (options A and B when dimensions match) or absent (``"none"``, the plain network)."""
    _check_shortcut(shortcut)
    dimensions_change = stride != 1 or in_channels != out_channels
    if shortcut == "none" or (shortcut in ("A", "B") and not dimensions_change):
        return None
    if shortcut == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return projection_shortcut(in_channels, out_channels, stride)


# --- 2. Blocks (Fig. 2 and Fig. 5) ---


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1; no bias, because BN follows it (Sec. 3.4)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A 1x1 convolution without bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """The building block of Fig. 2: two 3x3 conv + BN layers form the residual path F(x);
    the shortcut path carries x (or its projection, Eq. 2) to the addition, y = F(x) + x (Eq. 1);
    a ReLU follows the addition (Sec. 3.2's text and Fig. 2; Eq. 1 itself stops at the sum).
    With ``shortcut="none"`` the same layers make a plain block.

    The shortcut module is called ``downsample``, as in torchvision; it is ``None`` where
    the shortcut is the parameter-free identity or where there is no shortcut.
    """

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        out_channels = width * self.expansion
        self.has_shortcut = _check_shortcut(shortcut) != "none"
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = make_shortcut(shortcut, in_channels, out_channels, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) = BN(W2 relu(BN(W1 x))): the residual path of Fig. 2."""
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if self.has_shortcut:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """The bottleneck block of Fig. 5: 1x1 (reduce to ``width``), 3x3, 1x1 (restore to
    4 x ``width``), each followed by BN.

    Where a downsampling block puts its stride, the paper's text does not say. Table 1's FLOPs
    and the Caffe models the authors released put it on the first 1x1 convolution ("v1",
    ``stride_on_3x3=False``, the default); torchvision strides the 3x3 instead ("v1.5",
    ``stride_on_3x3=True``). Weight shapes are the same either way.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, shortcut: str = "B",
                 stride_on_3x3: bool = False):
        super().__init__()
        out_channels = width * self.expansion
        self.has_shortcut = _check_shortcut(shortcut) != "none"
        stride_1x1, stride_3x3 = (1, stride) if stride_on_3x3 else (stride, 1)
        self.conv1 = conv1x1(in_channels, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_channels, out_channels, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): the three weight layers of Fig. 5 (right)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if self.has_shortcut:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


# --- 3. The network (Fig. 3, Table 1, Sec. 4.2) ---


@torch.no_grad()
def normal_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``weight`` from N(0, std^2), the same numbers on every CPU for the same seed.

    The numbers are drawn in float64 on the CPU's default generator, then rounded to the
    weight's dtype: PyTorch fills float32 normals with AVX2 code where the CPU has it and with
    scalar code elsewhere (ARM, or ``ATEN_CPU_CAPABILITY=default``), and the two differ in the
    last bits; its float64 fill is the same scalar code on every CPU.
    """
    return weight.copy_(torch.empty(weight.shape, dtype=torch.float64).normal_(0.0, std))


@torch.no_grad()
def he_normal_(weight: torch.Tensor, fan: str = "out") -> torch.Tensor:
    """Fill a conv weight from N(0, 2 / fan), He et al. 2015 as cited in Sec. 3.4 (reference [13]
    in the paper's arXiv version, [12] in the CVPR version).

    ``fan="out"`` (the package's choice, and torchvision's for ResNets): the layer's filters
    times its kernel area; ``fan="in"``: its input channels times its kernel area. Drawn with
    :func:`normal_`, so ``torch.manual_seed(s)`` builds the same network on every machine.
    """
    if fan not in ("in", "out"):
        raise ValueError(f"fan must be 'in' or 'out', got {fan!r}")
    fans = {"in": weight.shape[1], "out": weight.shape[0]}
    return normal_(weight, math.sqrt(2.0 / (fans[fan] * weight[0, 0].numel())))


class ResNet(nn.Module):
    """A stem, stages of blocks, global average pooling and a fully connected classifier.

    ``stem="imagenet"``: 7x7/2 conv, BN, ReLU, 3x3/2 max pool (Table 1, conv1 and the start
    of conv2_x). ``stem="cifar"``: one 3x3 conv with ``widths[0]`` filters, BN, ReLU
    (Sec. 4.2). Each stage after the first halves the map with a stride-2 first block and
    uses the next width. Stages are ``layer1``, ``layer2``, ... as in torchvision.

    Weights use He initialization (Sec. 3.4; reference [13] of the arXiv version) for
    convolutions, BN starts at scale 1 and shift 0, and the classifier keeps PyTorch's default
    (fan-in) initialization.
    ``zero_init_residual=True`` starts each block's last BN at scale 0, so every residual
    block begins as the identity (an option, not the paper's recipe).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: list[int],
                 widths: list[int], stem: str = "imagenet", shortcut: str = "B",
                 num_classes: int = 1000, stride_on_3x3: bool = False,
                 zero_init_residual: bool = False, in_channels: int = 3):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")
        if len(blocks_per_stage) != len(widths):
            raise ValueError(f"got {len(blocks_per_stage)} stages but {len(widths)} widths")
        if not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"every stage needs at least 1 filter; got widths {list(widths)}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a whole number of at least 1 (10 for CIFAR-10, 1000 for "
                             f"ImageNet); got {num_classes!r}")
        _check_shortcut(shortcut)
        self.in_channels = in_channels
        self.block_type, self.shortcut, self.stem = block.__name__, shortcut, stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)

        channels = widths[0]
        block_options = {"stride_on_3x3": stride_on_3x3} if block is Bottleneck else {}
        for index, (count, width) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if index == 0 else 2
            stage = []
            for i in range(count):
                stage.append(block(channels, width, stride if i == 0 else 1, shortcut, **block_options))
                channels = width * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.min_input_size = (4 if stem == "imagenet" else 1) * 2 ** (len(widths) - 1)
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        """He initialization of every convolution; BN at identity; default classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                he_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.fc.reset_parameters()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The stages in order (conv2_x ... conv5_x in Table 1)."""
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise an error that says what was expected if ``x`` can't go through the net: a
        TypeError for a non-tensor or a wrong dtype, a ValueError for a wrong shape."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape (N, {self.in_channels}, H, W), got {type(x).__name__}")
        weights = self.conv1.weight.dtype
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point batch ({weights}, the dtype of the network's weights), got "
                            f"{x.dtype}; uint8 images become network input with annotated_resnet.data.normalize(x, "
                            "mean) (to [0, 1], per-pixel mean subtracted as in Sec. 4.2), or at least x.float() / 255")
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"the batch is {x.dtype} but the network's weights are {weights}; convert the batch "
                            f"with x.to({weights}) (or the network with model.to({x.dtype}))")
        if x.dim() != 4:
            hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(f"expected a 4-d batch of shape (N, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels (shape (N, {self.in_channels}, H, W)), "
                             f"got {x.shape[1]} in shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"input of {x.shape[-2]}x{x.shape[-1]} is too small: this network halves the map "
                             f"{int.bit_length(self.min_input_size) - 1} times, so its last stage would work on "
                             "padding rather than image; give it at least "
                             f"{self.min_input_size}x{self.min_input_size} (the paper: 32x32 CIFAR-10 images, "
                             "224x224 ImageNet crops)")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone: stem and stages, the last feature map before pooling (Sec. 4.3)."""
        self.check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


# --- 4. The two families ---

#: Table 1: block type and blocks per stage (conv2_x ... conv5_x) for each depth.
IMAGENET_LAYOUTS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
IMAGENET_WIDTHS = [64, 128, 256, 512]
CIFAR_WIDTHS = [16, 32, 64]


def cifar_resnet(depth: int, shortcut: str = "A", num_classes: int = 10, base_width: int = 16,
                 **kwargs) -> ResNet:
    """The CIFAR-10 network of Sec. 4.2 with ``depth = 6n + 2`` weighted layers: a 3x3 conv,
    three stages of n building blocks on 32/16/8 maps with 16/32/64 filters, global average
    pooling and a 10-way classifier. ``shortcut="none"`` gives the plain net of Fig. 6 (left).
    ``base_width`` scales the widths (16 is the paper's)."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has 6n+2 layers (8, 14, 20, 32, 44, 56, 110, 1202, ...); got depth={depth!r}")
    if not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"base_width is the number of filters of the first stage, a whole number of at least 1 "
                         f"(the paper: 16); got {base_width!r}")
    n = (depth - 2) // 6
    widths = [base_width, 2 * base_width, 4 * base_width]
    return ResNet(BasicBlock, [n, n, n], widths, stem="cifar", shortcut=shortcut,
                  num_classes=num_classes, **kwargs)


def imagenet_resnet(depth: int, shortcut: str = "B", num_classes: int = 1000,
                    stride_on_3x3: bool = False, **kwargs) -> ResNet:
    """The ImageNet networks of Table 1 (18, 34, 50, 101, 152 layers). Option B by default:
    after Table 3 the paper builds its deeper nets with B and says it does not use option C in
    the rest of the paper (its Table 4 still lists a ResNet-34 C). ``stride_on_3x3=True`` is
    torchvision's "v1.5"."""
    if depth not in IMAGENET_LAYOUTS:
        raise ValueError(f"Table 1 has ImageNet ResNets of depth {sorted(IMAGENET_LAYOUTS)}; got depth={depth!r}")
    block, layout = IMAGENET_LAYOUTS[depth]
    return ResNet(block, layout, IMAGENET_WIDTHS, stem="imagenet", shortcut=shortcut,
                  num_classes=num_classes, stride_on_3x3=stride_on_3x3, **kwargs)


# --- 5. By name ---

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_PLAIN_DEPTHS = (18, 34)

MODEL_NAMES = (
    [f"resnet{d}" for d in CIFAR_DEPTHS] + [f"plain{d}" for d in CIFAR_PLAIN_DEPTHS]
    + [f"resnet{d}" for d in IMAGENET_LAYOUTS] + [f"plain{d}" for d in IMAGENET_PLAIN_DEPTHS]
)


def create_model(name: str, **kwargs) -> ResNet:
    """Build a network of the paper by name, e.g. ``create_model("resnet56")`` or
    ``create_model("resnet34", shortcut="C")``. CIFAR nets (20-1202 layers) default to
    option A and 10 classes; ImageNet nets (18-152) to option B and 1000 classes.
    ``plainN`` is the same network without shortcuts. Keyword arguments go to
    :func:`cifar_resnet` or :func:`imagenet_resnet`."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)} "
                         "(any other 6n+2 depth: annotated_resnet.cifar_resnet(depth))")
    kind, depth = re.fullmatch(r"(resnet|plain)(\d+)", name).groups()
    depth = int(depth)
    if kind == "plain":
        if "shortcut" in kwargs:
            raise ValueError(f"{name} is a plain network and has no shortcut; use 'resnet{depth}' to choose one")
        kwargs["shortcut"] = "none"
    if depth in IMAGENET_LAYOUTS:
        return imagenet_resnet(depth, **kwargs)
    return cifar_resnet(depth, **kwargs)
