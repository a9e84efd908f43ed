"""The block diagrams of Fig. 2 and Fig. 5 are read from the blocks' own forward passes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch.nn.functional as F
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
from matplotlib.transforms import Bbox
from torch import nn

from annotated_resnet import BasicBlock, Bottleneck
from annotated_resnet.course.diagrams import Layer, draw_block, draw_blocks, trace_block


def drawn_text(ax):
    return [t.get_text() for t in ax.texts]


def test_building_block_of_fig2_traced_from_forward():
    trace = trace_block(BasicBlock(64, 64))
    assert [name for name, _ in trace.residual] == ["conv1", "bn1", "relu", "conv2", "bn2"]
    assert trace.residual[0] == Layer("conv1", "3x3 conv, 64")
    assert trace.shortcut == [] and trace.has_addition          # the identity: x itself
    assert trace.after == [Layer("relu", "ReLU")]                # Eq. 1's ReLU after the addition
    assert (trace.in_channels, trace.out_channels) == (64, 64)


def test_plain_block_has_the_same_layers_and_no_addition():
    trace = trace_block(BasicBlock(64, 64, shortcut="none"))
    assert not trace.has_addition and trace.shortcut == [] and trace.after == []
    assert [name for name, _ in trace.residual] == ["conv1", "bn1", "relu", "conv2", "bn2", "relu"]


def test_bottleneck_of_fig5():
    trace = trace_block(Bottleneck(256, 64))
    convs = [what for name, what in trace.residual if name.startswith("conv")]
    assert convs == ["1x1 conv, 64", "3x3 conv, 64", "1x1 conv, 256"]
    assert trace.shortcut == [] and (trace.in_channels, trace.out_channels) == (256, 256)


def test_shortcuts_that_change_dimensions():
    projection = trace_block(BasicBlock(64, 128, stride=2, shortcut="B"))
    assert projection.shortcut == [Layer("downsample.0", "1x1 conv, 128, /2"), Layer("downsample.1", "BN")]
    assert projection.residual[0] == Layer("conv1", "3x3 conv, 128, /2")
    option_a = trace_block(BasicBlock(16, 32, stride=2, shortcut="A"))
    assert [name for name, _ in option_a.shortcut] == ["downsample"]
    assert "16 zero channels" in option_a.shortcut[0].description


class ReluBeforeAddition(nn.Module):
    """A block written by hand, with names of its own and the ReLU in the wrong place for Fig. 2."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(8, 8, 5, padding=2, bias=False)
        self.norm_a = nn.BatchNorm2d(8)
        self.second = nn.Conv2d(8, 8, 5, padding=2, bias=False)
        self.norm_b = nn.BatchNorm2d(8)

    def forward(self, x):
        return x + F.relu(self.norm_b(self.second(F.relu(self.norm_a(self.first(x))))))


def test_the_drawing_follows_the_code_not_a_template():
    """A block with other names, 5x5 kernels and the ReLU before the addition is drawn as it
    is: its own labels, and nothing after the "+"."""
    trace = trace_block(ReluBeforeAddition())
    assert [name for name, _ in trace.residual] == ["first", "norm_a", "relu", "second", "norm_b", "relu_1"]
    assert trace.after == []
    text = " ".join(drawn_text(draw_block(ReluBeforeAddition())))
    assert "first: 5x5 conv, 8" in text and "second: 5x5 conv, 8" in text
    assert "conv1" not in text and "3x3" not in text


def test_boxes_are_drawn_in_the_order_of_the_computation():
    ax = draw_block(Bottleneck(256, 64))
    positions = {t.get_text(): t.get_position()[1] for t in ax.texts}
    order = ["x   (256-d)", "conv1: 1x1 conv, 64\nbn1: BN", "conv2: 3x3 conv, 64\nbn2: BN",
             "conv3: 1x1 conv, 256\nbn3: BN", "+", "relu: ReLU", "256-d"]   # the last ReLU: after the "+"
    assert [positions[label] for label in order] == sorted((positions[label] for label in order), reverse=True)
    assert "F(x)" in positions and "x\nidentity" in positions and "F(x) + x" in positions
    assert any(isinstance(p, Circle) for p in ax.patches)          # the "+" node
    assert ax.figure.get_size_inches()[1] > ax.figure.get_size_inches()[0]


def test_plain_block_drawn_without_plus_or_shortcut():
    text = drawn_text(draw_block(BasicBlock(16, 16, shortcut="none")))
    assert "+" not in text and "x\nidentity" not in text and "H(x)" in text


def test_projection_shortcut_drawn_in_its_own_column():
    ax = draw_block(BasicBlock(64, 128, stride=2, shortcut="B"))
    x_of = {t.get_text(): t.get_position()[0] for t in ax.texts}
    assert x_of["downsample.0:\n1x1 conv, 128, /2\ndownsample.1:\nBN"] > x_of["conv1: 3x3 conv, 128, /2\nbn1: BN"]


def test_side_by_side_share_one_scale_and_every_box_fits_its_text():
    axes = draw_blocks({"plain": BasicBlock(64, 64, shortcut="none"), "residual": BasicBlock(64, 64)})
    fig = axes[0].figure
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        assert ax.get_title() in ("plain", "residual")
        for text in ax.texts:
            if "conv" in text.get_text():
                box = next(p for p in ax.patches if p.contains_point(ax.transData.transform(text.get_position())))
                assert box.get_window_extent(renderer).contains(*text.get_window_extent(renderer).p0)
                assert box.get_window_extent(renderer).contains(*text.get_window_extent(renderer).p1)
    plt.close(fig)


def test_a_small_axes_shrinks_the_font_instead_of_overflowing():
    fig, ax = plt.subplots(figsize=(1.5, 1.5))
    draw_block(Bottleneck(256, 64), ax)
    assert max(t.get_fontsize() for t in ax.texts) < 8
    plt.close(fig)


def test_a_block_that_cannot_be_drawn_says_why():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ValueError, match="one input"):
        trace_block(TwoInputs())


@pytest.mark.parametrize("block", [BasicBlock(64, 64), Bottleneck(256, 64)], ids=["building", "bottleneck"])
def test_the_identity_line_goes_round_every_box(block):
    """The identity shortcut is led from x to the "+" outside the boxes of the residual path:
    no point of it falls inside a box (in Fig. 2 and 5 it runs beside them)."""
    ax = draw_block(block)
    boxes = [Bbox.from_bounds(p.get_x(), p.get_y(), p.get_width(), p.get_height())      # data coordinates
             for p in ax.patches if isinstance(p, FancyBboxPatch)]
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    line = max(arrows, key=lambda p: p.get_path().get_extents().width)    # the others are short vertical arrows
    assert boxes and line.get_path().get_extents().width > max(box.width for box in boxes) / 2
    # the line in data coordinates: its curves flattened into segments, each sampled at 20 points
    polygon = np.concatenate(line.get_path().to_polygons(closed_only=False))
    points = [a + t * (b - a) for a, b in zip(polygon, polygon[1:]) for t in np.linspace(0, 1, 20)]
    inside = [(x, y) for x, y in points for box in boxes if box.contains(x, y)]
    assert not inside, f"the identity line crosses a box at {inside[:3]}"
    plt.close(ax.figure)
