"""Fig. 3 of the paper drawn from the networks themselves: VGG-19, the 34-layer plain net and
the 34-layer residual net side by side (Sec. 3.3).

Nothing in the drawing is typed in by hand. :func:`network_column` runs one forward pass of
a network on a zero image and records, in the order they run, the layers Fig. 3 draws as
boxes (convolutions, pooling, fully connected layers) with the size of the map each one
outputs; for our :class:`~annotated_resnet.model.ResNet` it also records which block each
layer belongs to and what that block's shortcut does. :func:`draw_figure3` lays the columns
out side by side in the paper's conventions: one box per layer, "/2" where the map halves,
layers grouped by output size, and one arc per shortcut, solid for the identity and dotted
where the shortcut changes dimensions (Sec. 3.3), ending at the "+" of the addition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
from matplotlib.path import Path
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..architecture import _one_image
from ..model import ResNet

#: The layers Fig. 3 draws as boxes; everything else (BN, ReLU, dropout, flatten) is left out.
DRAWN_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear)
#: How each kind of box is filled.
BOX_COLOURS = {"conv": "#dbe8f6", "pool": "#e6e6e6", "fc": "#efe1f3", "image": "white"}
IDENTITY_STYLE = {"color": "black", "linestyle": "-", "linewidth": 1.3}
CHANGES_DIMENSIONS_STYLE = {"color": "#c0392b", "linestyle": (0, (1.2, 1.2)), "linewidth": 2.2}


@dataclass
class Box:
    """One layer of a column: its label as Fig. 3 writes it, the side of the map it outputs,
    whether it halves the map, and the index of the block it belongs to (``None`` outside
    blocks: the stem, pooling, the classifier, every layer of VGG)."""

    label: str
    kind: str
    size: int
    halves: bool
    block: int | None = None


@dataclass
class Shortcut:
    """The shortcut of one block, from the block's first box to its last: ``identity`` (solid
    in Fig. 3) or, where the block changes the map's size or width, ``zero-pad`` (option A) or
    ``projection`` (option B; option C also projects where dimensions stay)."""

    first: int
    last: int
    kind: str
    changes_dimensions: bool


@dataclass
class Column:
    """What :func:`draw_figure3` draws for one network."""

    name: str
    input_size: int
    boxes: list[Box]
    shortcuts: list[Shortcut] = field(default_factory=list)
    multiply_adds: int = 0

    @property
    def weighted_layers(self) -> int:
        """Convolutions and fully connected layers on the main path: the depth the paper counts
        (a shortcut's 1x1 projection is not counted)."""
        return sum(box.kind in ("conv", "fc") for box in self.boxes)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for stage in model.stages for block in stage] if isinstance(model, ResNet) else []


def _changes_dimensions(block: nn.Module) -> bool:
    """Whether a block's output differs from its input in size or width (Sec. 3.3's dotted lines)."""
    convs = [m for m in block.children() if isinstance(m, nn.Conv2d)]
    stride = 1
    for conv in convs:
        stride *= conv.stride[0]
    return stride > 1 or convs[0].in_channels != convs[-1].out_channels


def _label(module: nn.Module, halves: bool) -> tuple[str, str]:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"{kh}x{kw} conv, {module.out_channels}" + (", /2" if halves else ""), "conv"
    if isinstance(module, nn.Linear):
        return f"fc {module.out_features}", "fc"
    if isinstance(module, nn.MaxPool2d):
        return "pool" + (", /2" if halves else ""), "pool"
    return "avg pool", "pool"


def network_column(model: nn.Module, name: str, input_size: int = 224) -> Column:
    """The boxes and shortcuts of ``model`` in the order its forward pass runs them, with the
    output size of every box and the multiply-adds of the pass (one ``input_size`` image)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a ResNet, or torchvision's vgg19), got {type(model).__name__}")
    blocks = _blocks(model)
    block_of = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    on_shortcut = {id(m) for block in blocks if block.downsample is not None for m in block.downsample.modules()}
    seen: list[tuple[nn.Module, tuple, tuple]] = []

    def record(module, inputs, output):
        seen.append((module, tuple(inputs[0].shape), tuple(output.shape)))

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, DRAWN_LAYERS) and id(m) not in on_shortcut]
    counter = FlopCounterMode(display=False)
    try:
        with _one_image(model, input_size) as x, counter:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()

    boxes: list[Box] = []
    for module, in_shape, out_shape in seen:
        size = out_shape[-1] if len(out_shape) == 4 else 1
        if isinstance(module, nn.AdaptiveAvgPool2d) and size == in_shape[-1]:
            continue  # VGG's adaptive pool to 7x7 does nothing on a 224x224 image; Fig. 3 has no box for it
        halves = len(in_shape) == 4 and len(out_shape) == 4 and size * 2 == in_shape[-1] and size > 1
        label, kind = _label(module, halves)
        boxes.append(Box(label, kind, size, halves, block_of.get(id(module))))

    shortcuts = []
    for index, block in enumerate(blocks):
        if not block.has_shortcut:
            continue
        members = [i for i, box in enumerate(boxes) if box.block == index]
        changes = _changes_dimensions(block)
        kind = "identity" if block.downsample is None else (
            "projection" if isinstance(block.downsample, nn.Sequential) else "zero-pad")
        shortcuts.append(Shortcut(members[0], members[-1], kind, changes))
    return Column(name, input_size, boxes, shortcuts, counter.get_total_flops() // 2)


# --- Drawing ---

BOX_WIDTH, BOX_HEIGHT = 2.6, 0.62    # data units; one row of boxes is 1 unit high
ROW = 1.0                            # from one box to the next
ADDITION_GAP = 0.8                   # extra room below a block's last box, for the "+"
BAND_GAP = 0.6                       # extra room between two output sizes
COLUMN_SPACING = 4.6                 # from one column's centre to the next
ARC_BULGE = 0.95                     # how far a shortcut arc swings out to the right of the boxes


def _ends_block(boxes: list[Box], i: int) -> bool:
    return boxes[i].block is not None and (i + 1 == len(boxes) or boxes[i + 1].block != boxes[i].block)


def _layout(columns: list[Column]) -> tuple[list[list[float]], list[tuple[str, float, float]], float]:
    """The y of every box's top (downwards from 0), and the bands of output sizes as
    ``(label, top, bottom)``. Each band is as tall as its tallest column, so the same output
    size sits at the same height in every column."""
    sizes = []
    for column in columns:
        for box in column.boxes:
            if box.size not in sizes:
                sizes.append(box.size)
    sizes.sort(reverse=True)
    tops: list[list[float]] = [[0.0] * len(c.boxes) for c in columns]
    bands, y = [], -(ROW + BAND_GAP)      # the first row holds the "image" box
    for size in sizes:
        height = 0.0
        for c, column in enumerate(columns):
            offset = 0.0
            for i, box in enumerate(column.boxes):
                if box.size != size:
                    continue
                tops[c][i] = y - offset
                offset += ROW + (ADDITION_GAP if _ends_block(column.boxes, i) else 0.0)
            height = max(height, offset)
        bands.append((f"output size: {size}" if size > 1 else "output size: 1", y, y - height))
        y -= height + BAND_GAP
    return tops, bands, y


def _shortcut_path(x: float, start_y: float, end_y: float) -> Path:
    """A shortcut: leaves the main line at ``start_y``, swings out to the right of the boxes and
    comes back into the "+" at ``end_y``."""
    edge = x + BOX_WIDTH / 2 + 0.15
    out = edge + ARC_BULGE
    return Path([(x, start_y), (edge, start_y), (out, start_y), (out, end_y), (edge, end_y), (x + 0.2, end_y)],
                [Path.MOVETO, Path.LINETO, Path.CURVE4, Path.CURVE4, Path.CURVE4, Path.LINETO])


def draw_figure3(columns: list[Column], ax=None, row_inches: float = 0.2, title: str | None = None):
    """Draw ``columns`` side by side as Fig. 3 does; returns the matplotlib Axes.

    Each column is titled with its name, its weighted layers and the multiply-adds counted
    for one image. Boxes whose layer halves the map say "/2" (in bold); a band on the left
    names each output size. Every shortcut is its own arc from the line above its block to
    the "+" below it: solid black for the identity, dotted red where the shortcut changes
    dimensions. ``title`` goes above the columns."""
    if not columns:
        raise ValueError("draw_figure3 needs at least one Column (build them with network_column)")
    tops, bands, bottom = _layout(columns)
    if ax is None:
        width = 1.6 + 2.2 * len(columns)
        _, ax = plt.subplots(figsize=(width, row_inches * (-bottom + 4.4)))
    left = -BOX_WIDTH / 2 - 2.9
    right = (len(columns) - 1) * COLUMN_SPACING + BOX_WIDTH / 2 + ARC_BULGE + 0.4
    for index, (label, top, low) in enumerate(bands):
        ax.axhspan(low + 0.2 - ROW + BOX_HEIGHT, top + 0.3, color="0.94" if index % 2 else "0.975", zorder=0)
        ax.text(left + 0.1, top, label, fontsize=7, va="top", color="0.35")
    for c, column in enumerate(columns):
        x = c * COLUMN_SPACING
        gmacs = column.multiply_adds / 1e9
        ax.text(x, 1.9, column.name, ha="center", va="bottom", fontsize=9, weight="bold")
        ax.text(x, 0.45, f"{column.weighted_layers} weighted layers\n{gmacs:.1f} billion multiply-adds",
                ha="center", va="bottom", fontsize=7)
        image_top = 0.0
        centres = [image_top - BOX_HEIGHT / 2] + [t - BOX_HEIGHT / 2 for t in tops[c]]
        labels = [("image", "image", False)] + [(b.label, b.kind, b.halves) for b in column.boxes]
        for (label, kind, halves), centre in zip(labels, centres):
            ax.add_patch(FancyBboxPatch((x - BOX_WIDTH / 2, centre - BOX_HEIGHT / 2), BOX_WIDTH, BOX_HEIGHT,
                                        boxstyle="round,pad=0,rounding_size=0.12", facecolor=BOX_COLOURS[kind],
                                        edgecolor="0.25", linewidth=0.8, zorder=2))
            ax.text(x, centre, label, ha="center", va="center", fontsize=7, zorder=3,
                    weight="bold" if halves else "normal")
        for upper, lower in zip(centres, centres[1:]):
            ax.plot([x, x], [upper - BOX_HEIGHT / 2, lower + BOX_HEIGHT / 2], color="0.3", lw=0.8, zorder=1)
        for shortcut in column.shortcuts:
            first_top = tops[c][shortcut.first]
            last_bottom = tops[c][shortcut.last] - BOX_HEIGHT
            start = first_top + 0.3 * (ROW - BOX_HEIGHT)
            plus = last_bottom - 0.35 * (ROW - BOX_HEIGHT + ADDITION_GAP)
            style = CHANGES_DIMENSIONS_STYLE if shortcut.changes_dimensions else IDENTITY_STYLE
            ax.add_patch(FancyArrowPatch(path=_shortcut_path(x, start, plus), arrowstyle="-|>", mutation_scale=7,
                                         zorder=1, gid=f"shortcut:{shortcut.kind}", **style))
            ax.plot([x], [plus], marker="o", ms=8, mfc="white", mec="black", mew=0.9, zorder=4)
            ax.text(x, plus, "+", ha="center", va="center", fontsize=8, weight="bold", zorder=5)
    ax.plot([], [], **IDENTITY_STYLE, label="identity shortcut")
    ax.plot([], [], **CHANGES_DIMENSIONS_STYLE, label="shortcut that changes dimensions")
    ax.plot([], [], marker="$+$", ms=7, mec="black", linestyle="none", label="addition F(x) + shortcut")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7.5, frameon=False)
    ax.set_xlim(left, right)
    top = 3.2
    if title:
        ax.text((left + right) / 2, 3.4, title, ha="center", va="bottom", fontsize=9.5)
        top = 4.3
    ax.set_ylim(bottom + 0.2, top)
    ax.axis("off")
    return ax
