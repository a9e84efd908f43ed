"""The paper's block diagrams drawn from the blocks themselves: Fig. 2 (the building block,
and the plain block it is compared with) and Fig. 5 (basic block and bottleneck).

Nothing here is drawn by hand. :func:`trace_block` runs ``torch.fx`` over a block's
``forward`` and reads off the layers it calls, in order: the residual path F(x) up to the
addition of Eq. 1, the shortcut path (nothing for the identity, the modules of option A or of
a projection W_s otherwise, Eq. 2) and what follows the addition. :func:`draw_block` draws
that trace with matplotlib, each box labelled with the layer's own name and shape, so a
diagram cannot disagree with the code that computes the block. For example::

    draw_blocks({"plain block": BasicBlock(64, 64, shortcut="none"),
                 "building block (Fig. 2)": BasicBlock(64, 64)})
    draw_blocks({"64-d": BasicBlock(64, 64), "256-d": Bottleneck(256, 64)})      # Fig. 5
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.fx
import torch.nn.functional as F
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
from matplotlib.path import Path
from torch import nn

from ..model import ZeroPadShortcut

_ADDITIONS = (operator.add, operator.iadd, torch.add)
_RELUS = (F.relu, torch.relu, torch.relu_)


class Layer(NamedTuple):
    """One step of a block's computation: the name it has in the block (``"conv1"``,
    ``"downsample.0"``, or a function's name) and what it does (``"3x3 conv, 64"``)."""

    name: str
    description: str


class BlockTrace(NamedTuple):
    """A block's computation in the terms of Fig. 2 and Eq. 1 and 2.

    ``residual``: the layers from x to the addition (for a plain block: all its layers);
    ``shortcut``: the layers on the shortcut path (empty for the identity); ``after``: the
    layers after the addition; ``has_addition``: False for a plain block. ``in_channels``
    and ``out_channels``: the widths of x and of the output."""

    residual: list[Layer]
    shortcut: list[Layer]
    after: list[Layer]
    has_addition: bool
    in_channels: int
    out_channels: int


class _BlockTracer(torch.fx.Tracer):
    """Keeps option A's shortcut as one step, like the built-in layers."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, ZeroPadShortcut) or super().is_leaf_module(module, qualified_name)


def describe(module: nn.Module) -> str:
    """What one layer does, in the words of the paper's figures (Fig. 2, 3, 5)."""
    if isinstance(module, nn.Conv2d):
        k = "x".join(str(s) for s in module.kernel_size)
        stride = f", /{module.stride[0]}" if module.stride[0] > 1 else ""
        return f"{k} conv, {module.out_channels}{stride}"
    if isinstance(module, nn.BatchNorm2d):
        return "BN"
    if isinstance(module, nn.ReLU):
        return "ReLU"
    if isinstance(module, ZeroPadShortcut):
        return f"subsample /{module.stride},\n+{module.extra_channels} zero channels"
    return type(module).__name__


def _layer(node: torch.fx.Node, modules: dict[str, nn.Module]) -> Layer:
    if node.op == "call_module":
        return Layer(node.target, describe(modules[node.target]))
    if node.op == "call_function" and node.target in _RELUS:
        return Layer(node.name, "ReLU")
    target = getattr(node.target, "__name__", str(node.target))
    return Layer(node.name, target)


def _chain_back(node: torch.fx.Node, start: torch.fx.Node, modules) -> list[Layer]:
    """The layers between ``start`` (x) and ``node``, in the order x meets them."""
    layers = []
    while node is not start:
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(inputs) != 1:
            raise ValueError(f"cannot draw {node.format_node()}: each layer of a block must take one input")
        layers.append(_layer(node, modules))
        node = inputs[0]
    return layers[::-1]


def _chain_forward(node: torch.fx.Node, end: torch.fx.Node, modules) -> list[Layer]:
    """The layers from ``node`` (exclusive) to ``end`` (the output, inclusive of its input)."""
    layers = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise ValueError(f"cannot draw {node.format_node()}: its output goes to {len(users)} places")
        node = users[0]
        if node is end:
            return layers
        layers.append(_layer(node, modules))


def trace_block(block: nn.Module) -> BlockTrace:
    """Read a block's computation from its ``forward`` (with ``torch.fx``): a chain of layers
    from x, at most one addition of two paths that both start at x, then a chain to the output.
    Works for :class:`~annotated_resnet.BasicBlock` (identity, option A or projection shortcut,
    or ``shortcut="none"``, the plain block), :class:`~annotated_resnet.Bottleneck`, and any
    block written the same way."""
    graph = _BlockTracer().trace(block)
    modules = dict(block.named_modules())
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    if len(inputs) != 1:
        raise ValueError(f"a block takes one input x; {type(block).__name__}.forward takes {len(inputs)}")
    x = inputs[0]
    additions = [n for n in graph.nodes if (n.op == "call_function" and n.target in _ADDITIONS)
                 or (n.op == "call_method" and n.target in ("add", "add_"))]
    if len(additions) > 1:
        raise ValueError(f"{type(block).__name__} adds {len(additions)} times; a block of Fig. 2 adds once")
    if additions:
        addition = additions[0]
        paths = [_chain_back(arg, x, modules) for arg in addition.args[:2]]
        # the residual path is the one with more layers outside the shortcut module
        shortcut, residual = sorted(paths, key=lambda layers: sum(not n.startswith("downsample") for n, _ in layers))
        after = _chain_forward(addition, output, modules)
    else:
        shortcut, after = [], []
        residual = _chain_back(output.args[0], x, modules)
    convs = [modules[n] for n, _ in residual if isinstance(modules.get(n), nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(block).__name__} has no convolution on its residual path to draw")
    return BlockTrace(residual, shortcut, after, bool(additions), convs[0].in_channels, convs[-1].out_channels)


def _boxes(layers: list[Layer]) -> list[list[Layer]]:
    """Group a convolution with the BN right after it into one "weight layer" box, as in
    Fig. 2 (Sec. 3.4 puts BN right after each convolution)."""
    boxes = []
    for layer in layers:
        if layer.description == "BN" and boxes and "conv" in boxes[-1][-1].description:
            boxes[-1].append(layer)
        else:
            boxes.append([layer])
    return boxes


def _is_relu(box: list[Layer]) -> bool:
    return len(box) == 1 and box[0].description == "ReLU"


# Lengths of the layout in inches at font size 8 (they scale with the font). Text is measured
# before anything is placed, so every box fits its text.
PAD, GAP, PLUS_RADIUS, SPACE = 0.07, 0.2, 0.1, 0.08
_COLORS = {"weight": "#dce9f7", "relu": "#f2f2f2", "shortcut": "#f7e3cf"}


def draw_block(block: nn.Module, ax=None, title: str | None = None, path_label: str | None = None,
               fontsize: float = 8):
    """Draw a block as the paper's Fig. 2 and Fig. 5 draw it, from the block's own layers.

    Top to bottom: x with its width ("64-d"), the residual path (one box per weight layer,
    holding the convolution and the BN after it, and one per ReLU; the bracket on the left
    names the path F(x), or H(x) for a plain block), the "+" of Eq. 1 with the shortcut
    coming in from x on the right (a line with rounded corners, labelled "x, identity", or a column of the
    shortcut's own layers), the ReLU after the addition and the output width. Every box is
    labelled ``name: what it does`` from :func:`trace_block`. With ``ax=None`` a figure of
    the diagram's size is made; in an axes smaller than the diagram, the font shrinks until
    it fits. Returns the axes."""
    trace = trace_block(block)
    if ax is None:
        return draw_blocks({title or "": block}, fontsize=fontsize, path_labels=[path_label])[0]
    extent = _draw(trace, ax, title, path_label, fontsize)
    too_big = _fit(ax, extent)
    if too_big > 1.001:
        ax.clear()
        _fit(ax, _draw(trace, ax, title, path_label, fontsize / too_big))
    return ax


def draw_blocks(blocks: dict[str, nn.Module], fontsize: float = 8, path_labels=None):
    """Draw several blocks side by side at one scale, e.g. ``{"plain block": ...,
    "building block (Fig. 2)": ...}``, in a figure of just the right size; return the axes."""
    fig = plt.figure()
    path_labels = path_labels or [None] * len(blocks)
    axes, extents = [], []
    for (title, block), path_label in zip(blocks.items(), path_labels):
        ax = fig.add_axes([0, 0, 1, 1])
        axes.append(ax)
        extents.append(_draw(trace_block(block), ax, title or None, path_label, fontsize))
    widths = [right - left for left, right, _, _ in extents]
    height = max(top - bottom for _, _, top, bottom in extents)
    title_h = 0.35 * fontsize / 8 if any(blocks) else 0.0
    fig.set_size_inches(sum(widths), height + title_h)
    x = 0.0
    for ax, (left, right, top, _), w in zip(axes, extents, widths):
        ax.set_position([x / sum(widths), 0, w / sum(widths), height / (height + title_h)])
        _fit(ax, (left, right, top, top - height))    # tops aligned: every x on one line
        x += w
    return axes


def _fit(ax, extent) -> float:
    """Set ``ax``'s limits to 1 data unit = 1 inch both ways with the diagram centred; return
    how many times too big for ``ax`` the diagram is (1 if it fits)."""
    left, right, top, bottom = extent
    fig, position = ax.figure, ax.get_position()
    ax_w, ax_h = position.width * fig.get_figwidth(), position.height * fig.get_figheight()
    too_big = max((right - left) / ax_w, (top - bottom) / ax_h, 1.0)
    center_x, center_y = (left + right) / 2, (top + bottom) / 2
    ax.set_xlim(center_x - too_big * ax_w / 2, center_x + too_big * ax_w / 2)
    ax.set_ylim(center_y - too_big * ax_h / 2, center_y + too_big * ax_h / 2)
    return too_big


def _draw(trace: BlockTrace, ax, title, path_label, fontsize) -> tuple[float, float, float, float]:
    """Draw ``trace`` at 1 data unit = 1 inch, the main column at x = 0, x's label at the top
    (y = 0); return the diagram's extent (left, right, top, bottom)."""
    pad, gap, plus_radius, space = (length * fontsize / 8 for length in (PAD, GAP, PLUS_RADIUS, SPACE))
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    arrow = dict(arrowstyle="-|>", mutation_scale=fontsize, lw=1, color="black", shrinkA=0, shrinkB=0, zorder=2)

    def text(s, size=fontsize + 1, **options):
        """A text artist (placed later) and its width and height in inches."""
        options = {"ha": "center", "va": "center", **options}
        artist = ax.text(0, 0, s, fontsize=size, zorder=3, **options)
        extent = artist.get_window_extent(renderer)
        return artist, extent.width / fig.dpi, extent.height / fig.dpi

    def boxes(layers, kind, separator):
        out = []
        for box in _boxes(layers):
            label = "\n".join(f"{name}:{separator}{what}" for name, what in box)
            artist, w, h = text(label, size=fontsize, family="monospace")
            out.append((artist, w + 2 * pad, h + 2 * pad, "relu" if _is_relu(box) else kind))
        return out

    def place(box, x, y_top, w):
        """Draw a box of width w hanging from y_top; return its bottom."""
        artist, _, h, kind = box
        artist.set_position((x, y_top - h / 2))
        ax.add_patch(FancyBboxPatch((x - w / 2, y_top - h), w, h, boxstyle=f"round,pad=0,rounding_size={pad}",
                                    fc=_COLORS[kind], ec="black", lw=0.9, zorder=1))
        return y_top - h

    def column(column_boxes, y):
        """The boxes one under another from y, each reached by an arrow; return the bottom."""
        for box in column_boxes:
            ax.add_patch(FancyArrowPatch((0, y), (0, y - gap), **arrow))
            y = place(box, 0, y - gap, width)
        return y

    residual, after = boxes(trace.residual, "weight", " "), boxes(trace.after, "weight", " ")
    shortcut = boxes(trace.shortcut, "shortcut", "\n")
    width = max(w for _, w, _, _ in residual + after)   # the main column's boxes share one width

    x_label, _, x_height = text(f"x   ({trace.in_channels}-d)")
    x_label.set_position((0, -x_height / 2))
    branch_y = -x_height - space
    path_top, path_bottom = branch_y - gap, column(residual, branch_y)
    y = path_bottom
    name, name_w, _ = text(path_label or ("F(x)" if trace.has_addition else "H(x)"), size=fontsize + 3,
                           ha="right", style="italic")
    bracket_x = -width / 2 - space
    ax.plot([bracket_x + space, bracket_x, bracket_x, bracket_x + space],
            [path_top, path_top, path_bottom, path_bottom], color="0.35", lw=0.9)
    name.set_position((bracket_x - space, (path_top + path_bottom) / 2))
    left, right = bracket_x - space - name_w, width / 2

    if trace.has_addition:
        plus_y = y - 1.5 * gap - plus_radius
        ax.add_patch(FancyArrowPatch((0, y), (0, plus_y + plus_radius), **arrow))
        ax.add_patch(Circle((0, plus_y), plus_radius, fc="white", ec="black", lw=1.1, zorder=2))
        ax.text(0, plus_y, "+", ha="center", va="center_baseline", fontsize=fontsize + 4, zorder=3)
        if shortcut:                    # a column of the shortcut's layers, right of the main one
            shortcut_w = max(w for _, w, _, _ in shortcut)
            sx = width / 2 + 3 * space + shortcut_w / 2
            free = (branch_y - plus_y - sum(h for _, _, h, _ in shortcut)) / (len(shortcut) + 1)
            ax.plot([0, sx], [branch_y, branch_y], color="black", lw=1, zorder=2)
            top = branch_y
            for box in shortcut:
                ax.add_patch(FancyArrowPatch((sx, top), (sx, top - free), **arrow))
                top = place(box, sx, top - free, shortcut_w)
            ax.add_patch(FancyArrowPatch(path=Path([(sx, top), (sx, plus_y), (plus_radius, plus_y)]), **arrow))
            right = sx + shortcut_w / 2
        else:                           # the identity: x led round the boxes to the "+", labelled x
            reach = width / 2 + 4 * space   # the line's right edge, clear of the widest box
            r = min(3 * space, (branch_y - plus_y) / 3)      # rounded corners, turning only beside the boxes
            curve = Path([(0, branch_y), (reach - r, branch_y), (reach, branch_y), (reach, branch_y - r),
                          (reach, plus_y + r), (reach, plus_y), (reach - r, plus_y), (plus_radius, plus_y)],
                         [Path.MOVETO, Path.LINETO, Path.CURVE3, Path.CURVE3,
                          Path.LINETO, Path.CURVE3, Path.CURVE3, Path.LINETO])
            ax.add_patch(FancyArrowPatch(path=curve, **arrow))
            note, note_w, _ = text("x\nidentity", ha="left")
            note.set_position((reach + space, (branch_y + plus_y) / 2))
            right = reach + space + note_w
        total, _, _ = text("F(x) + x", ha="left", va="top")
        total.set_position((space, plus_y - plus_radius - space / 4))
        y = column(after, plus_y - plus_radius - gap / 2)   # a longer arrow, beside the label
    ax.add_patch(FancyArrowPatch((0, y), (0, y - 1.2 * gap), **arrow))
    out, _, out_h = text(f"{trace.out_channels}-d", va="top")
    out.set_position((0, y - 1.2 * gap - space / 4))
    bottom = y - 1.2 * gap - space / 2 - out_h

    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=fontsize + 2)
    return left - space, right + space, space, bottom - space
