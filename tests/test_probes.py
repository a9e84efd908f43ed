"""The probes of notebooks 1-3: ILSVRC facts, gradient norms at init, the constructed solution."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

from annotated_resnet import count_parameters, create_model
from annotated_resnet.probes import (
    ILSVRC_WINNERS,
    deepen_with_identity_layers,
    gradient_norms,
    identity_block,
    naive_init_,
    plot_error_curves,
    plot_gradient_norms,
    plot_revolution_of_depth,
    weighted_layers,
    without_batchnorm,
)


def randomize_batchnorm_(model):
    """Give every BN layer non-trivial statistics and affine parameters, as training would."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.uniform_(-0.2, 0.2, generator=generator)
    return model


def test_ilsvrc_winners_match_the_paper_facts():
    resnet = ILSVRC_WINNERS[-1]
    assert (resnet.year, resnet.top5_error, resnet.depth) == (2015, 3.57, 152)
    winners = [e for e in ILSVRC_WINNERS if "2nd" not in e.name]
    errors = [e.top5_error for e in sorted(winners, key=lambda e: e.year)]
    assert errors == sorted(errors, reverse=True), "the winning error fell every year"
    assert [e.depth for e in winners if e.year < 2012] == [None, None]


@pytest.mark.parametrize("depth", [20, 56])
def test_weighted_layers_are_the_papers_6n_plus_2(depth):
    assert len(weighted_layers(create_model(f"plain{depth}"))) == depth
    assert len(weighted_layers(create_model(f"resnet{depth}"))) == depth


def test_projection_shortcuts_are_not_counted_as_weighted_layers():
    assert len(weighted_layers(create_model("resnet18"))) == 18


def test_gradient_norms_one_per_layer_and_model_left_clean():
    torch.manual_seed(0)
    model = create_model("plain20")
    norms = gradient_norms(model, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert list(norms) == [name for name, _ in weighted_layers(model)]
    assert all(v > 0 for v in norms.values())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_gradient_norms_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="N labels"):
        gradient_norms(create_model("plain20"), torch.randn(8, 3, 32, 32), torch.zeros(4, dtype=torch.long))


def test_naive_init_without_batchnorm_vanishes_and_batchnorm_does_not():
    """Sec. 1 and 4.1: a naive init without BN kills the gradient of a plain-56; with BN no
    layer's gradient is small next to the last conv layer's."""
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (16,))
    naive = naive_init_(without_batchnorm(create_model("plain56"))).double()
    assert max(gradient_norms(naive, images, labels).values()) < 1e-20
    with_bn = list(gradient_norms(create_model("plain56").double(), images, labels).values())
    assert min(with_bn[:-1]) > 0.1 * with_bn[-2]


def test_without_batchnorm_and_naive_init():
    model = naive_init_(without_batchnorm(create_model("plain20")), std=0.01)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert abs(model.layer3[0].conv1.weight.std().item() - 0.01) < 1e-3


def test_identity_block_is_the_identity_on_non_negative_inputs_only():
    block = identity_block(16)
    x = torch.rand(4, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block(x), x)
        assert not torch.allclose(block(x - 0.5), x - 0.5)   # ReLU clips negatives


def test_constructed_solution_computes_what_the_shallow_net_computes():
    torch.manual_seed(0)
    shallow = randomize_batchnorm_(create_model("plain20")).eval()
    deep = deepen_with_identity_layers(shallow, 56)
    assert len(weighted_layers(deep)) == 56
    assert count_parameters(deep) == count_parameters(create_model("plain56"))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deep(x), shallow(x), atol=1e-5)


def test_constructed_solution_keeps_the_width():
    shallow = create_model("plain20", base_width=8).eval()
    deep = deepen_with_identity_layers(shallow, 32)
    assert deep.conv1.out_channels == 8 and len(deep.layer3) == 5


@pytest.mark.parametrize("shallow, depth, message", [
    (create_model("resnet20"), 56, "plain CIFAR net"),
    (create_model("plain20"), 51, "6n\\+2"),
    (create_model("plain56"), 20, "at least"),
])
def test_constructed_solution_rejects_bad_input(shallow, depth, message):
    with pytest.raises(ValueError, match=message):
        deepen_with_identity_layers(shallow, depth)


def test_plots_draw_what_they_say():
    ax = plot_revolution_of_depth().axes[0]
    deep = [e for e in ILSVRC_WINNERS if e.depth is not None]
    points, *shallow_lines = ax.lines
    assert list(points.get_xdata()) == [e.depth for e in deep] and ax.get_xscale() == "log"
    assert [line.get_ydata()[0] for line in shallow_lines] == [e.top5_error for e in ILSVRC_WINNERS if e.depth is None]
    ax = plot_gradient_norms({"a": {"l1": 1.0, "l2": 2.0}})
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    history = [{"iteration": 10, "train_error": 0.5, "test_error": 0.6},
               {"iteration": 20, "train_error": 0.4, "test_error": 0.5}]
    axes = plot_error_curves({"20-layer": history, "56-layer": history})
    assert axes[0].get_ylabel() == "training error (%)" and axes[1].get_ylabel() == "test error (%)"
    assert list(axes[1].lines[0].get_ydata()) == [60.0, 50.0]
