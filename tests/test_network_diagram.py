"""Fig. 3 drawn from the networks (Sec. 3.3): the columns read from a forward pass, and the
drawing has one arc per shortcut, dotted exactly where the shortcut changes dimensions."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torchvision
from matplotlib.patches import FancyArrowPatch

from annotated_resnet import create_model
from annotated_resnet.course.network_diagram import (CHANGES_DIMENSIONS_STYLE, draw_figure3, network_column)


@pytest.fixture(scope="module")
def resnet34_column():
    return network_column(create_model("resnet34", shortcut="A"), "34-layer residual")


def test_resnet34_column_is_fig3_right(resnet34_column):
    column = resnet34_column
    labels = [box.label for box in column.boxes]
    assert column.weighted_layers == 34
    assert labels[:2] == ["7x7 conv, 64, /2", "pool, /2"] and labels[-2:] == ["avg pool", "fc 1000"]
    assert [label for label in labels if label.endswith("/2")] == [
        "7x7 conv, 64, /2", "pool, /2", "3x3 conv, 128, /2", "3x3 conv, 256, /2", "3x3 conv, 512, /2"]
    assert [box.size for box in column.boxes if box.kind == "conv"][:2] == [112, 56]
    assert len(column.shortcuts) == 16
    dotted = [s for s in column.shortcuts if s.changes_dimensions]
    assert [column.boxes[s.first].label for s in dotted] == ["3x3 conv, 128, /2", "3x3 conv, 256, /2", "3x3 conv, 512, /2"]
    assert all(s.kind == "zero-pad" for s in dotted) and all(s.last == s.first + 1 for s in column.shortcuts)
    assert round(column.multiply_adds / 1e9, 1) == 3.6


def test_option_b_projections_stay_off_the_main_column():
    column = network_column(create_model("resnet34", shortcut="B"), "B")
    assert column.weighted_layers == 34                       # the three 1x1 projections are not boxes
    assert [s.kind for s in column.shortcuts if s.changes_dimensions] == ["projection"] * 3


def test_plain_net_has_the_same_boxes_and_no_shortcuts(resnet34_column):
    plain = network_column(create_model("plain34"), "34-layer plain")
    assert [b.label for b in plain.boxes] == [b.label for b in resnet34_column.boxes]
    assert plain.shortcuts == [] and plain.multiply_adds == resnet34_column.multiply_adds


def test_vgg19_column_is_fig3_left():
    column = network_column(torchvision.models.vgg19(weights=None), "VGG-19")
    labels = [box.label for box in column.boxes]
    assert column.weighted_layers == 19 and column.shortcuts == []
    assert labels.count("pool, /2") == 5 and labels[-3:] == ["fc 4096", "fc 4096", "fc 1000"]
    assert "avg pool" not in labels                            # torchvision's 7x7 adaptive pool is a no-op here
    assert [b.size for b in column.boxes if b.label == "pool, /2"] == [112, 56, 28, 14, 7]


def test_bottleneck_and_cifar_columns():
    resnet50 = network_column(create_model("resnet50"), "ResNet-50")
    assert resnet50.weighted_layers == 50 and len(resnet50.shortcuts) == 16
    assert all(s.last == s.first + 2 for s in resnet50.shortcuts)   # three layers per bottleneck block
    # conv2_1 widens 64 -> 256 without halving the map: its shortcut changes dimensions too
    assert [s.changes_dimensions for s in resnet50.shortcuts].count(True) == 4
    resnet20 = network_column(create_model("resnet20"), "ResNet-20", input_size=32)
    assert {b.size for b in resnet20.boxes} == {32, 16, 8, 1} and resnet20.weighted_layers == 20


def test_drawing_has_one_arc_per_shortcut_dotted_where_dimensions_change(resnet34_column):
    plain = network_column(create_model("plain34"), "34-layer plain")
    ax = draw_figure3([plain, resnet34_column])
    arcs = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arcs) == 16
    dotted = [a for a in arcs if a.get_linestyle() != "-"]
    assert len(dotted) == 3 and all(a.get_edgecolor() == matplotlib.colors.to_rgba(CHANGES_DIMENSIONS_STYLE["color"])
                                    for a in dotted)
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("+") == 16 and texts.count("3x3 conv, 128, /2") == 2
    assert "34 weighted layers\n3.6 billion multiply-adds" in texts
    plt.close(ax.figure)


def test_rejects_what_it_cannot_draw():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        network_column("resnet34", "x")
    with pytest.raises(ValueError, match="network_column"):
        draw_figure3([])
