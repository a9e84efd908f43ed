"""The probes of notebooks 1-3: ILSVRC facts, gradient norms at init, the constructed solution."""

import copy
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from annotated_resnet import count_parameters, create_model
from annotated_resnet.data import normalize, pixel_mean, to_tensor, train_val_split
from annotated_resnet.course.ilsvrc import ILSVRC_ENTRIES, ilsvrc_winners, plot_revolution_of_depth
from annotated_resnet.reference_runs import reestimate_batchnorm_
from annotated_resnet.course.probes import (
    NET_COLORS,
    deepen_with_identity_layers,
    gradient_norms,
    identity_block,
    load_trained,
    longest_common_length,
    naive_init_,
    plot_error_curves,
    plot_gradient_norms,
    probe_batch,
    probe,
    signal_stds,
    spread,
    weight_norms,
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
    """The winners compared like with like (competition data only), and with extra data:
    AlexNet's winning 15.3% used extra data, its 16.4% did not (AlexNet's Table 2)."""
    winners = ilsvrc_winners()
    assert [(e.year, e.team, e.top5_error) for e in winners] == [
        (2010, "NEC-UIUC", 28.2), (2011, "XRCE", 25.8), (2012, "AlexNet", 16.4), (2013, "Clarifai", 11.7),
        (2014, "GoogLeNet", 6.7), (2015, "ResNet", 3.57)]
    assert [e.depth for e in winners] == [None, None, 8, 8, 22, 152]
    assert [e.top5_error for e in ilsvrc_winners(extra_data=True)] == [28.2, 25.8, 15.3, 11.2, 6.7, 3.57]
    assert not any(e.extra_data for e in winners)
    assert [e.team for e in ILSVRC_ENTRIES if e.place == 2] == ["VGG"]


@pytest.mark.parametrize("depth", [20, 56])
def test_weighted_layers_are_the_papers_6n_plus_2(depth):
    assert len(weighted_layers(create_model(f"plain{depth}"))) == depth
    assert len(weighted_layers(create_model(f"resnet{depth}"))) == depth


def test_projection_shortcuts_are_not_counted_as_weighted_layers():
    assert len(weighted_layers(create_model("resnet18"))) == 18


def test_gradient_norms_one_per_layer_and_model_left_as_it_was():
    """Probing a trained net must not change it: its mode, BN running statistics and
    gradients are as before (a probe in training mode updates the running statistics)."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(create_model("plain20")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        out_before = model(x)
    norms = gradient_norms(model, x, torch.randint(0, 10, (8,)))
    assert list(norms) == [name for name, _ in weighted_layers(model)]
    assert all(v > 0 for v in norms.values())
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


def test_gradient_norm_is_the_l2_norm_of_the_weight_gradient():
    torch.manual_seed(0)
    model = create_model("plain20")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    norms = gradient_norms(model, x, y)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert norms["layer2.0.conv1"] == pytest.approx(model.layer2[0].conv1.weight.grad.pow(2).sum().sqrt().item())


def test_signal_stds_one_per_block_and_model_left_as_it_was():
    torch.manual_seed(0)
    model = randomize_batchnorm_(create_model("resnet20")).eval()
    x = torch.randn(8, 3, 32, 32)
    in_training_mode = copy.deepcopy(model).train()
    with torch.no_grad():
        last_block = in_training_mode.features(x).std().item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stds = signal_stds(model, x)
    assert list(stds) == ["stem"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert stds["layer3.2"] == pytest.approx(last_block, rel=1e-5)
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class FakeCifar:
    """A CIFAR10-shaped stand-in: ``per_class`` random images of each of 10 classes."""

    def __init__(self, per_class, seed=0):
        rng = np.random.default_rng(seed)
        self.train_labels = np.tile(np.arange(10), per_class)
        self.train_images = rng.integers(0, 256, (10 * per_class, 32, 32, 3), dtype=np.uint8)


def test_probe_batch_is_the_same_every_time_and_mean_subtracted():
    cifar = FakeCifar(per_class=5)
    cifar.train_labels = np.sort(cifar.train_labels)             # stored class by class, as image folders are
    (a, labels_a), (b, labels_b) = probe_batch(cifar, size=12), probe_batch(cifar, size=12)
    assert a.shape == (12, 3, 32, 32) and labels_a.shape == (12,)
    assert torch.equal(a, b) and torch.equal(labels_a, labels_b)
    assert sorted(labels_a.tolist()) == sorted(list(range(10)) + [0, 1])   # every class, in turn
    assert abs(a.mean().item()) < 0.05 and a.min() < 0 < a.max()


def write_run(folder, name, model, data, iterations=30):
    """A finished run in the reference-run format (what `annotated-resnet reproduce` writes)."""
    folder.mkdir(parents=True)
    log = {"iteration": iterations, "train_error": 0.5, "test_error": 0.5}
    (folder / "log.jsonl").write_text(json.dumps(log) + "\n")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               folder / "weights-fp16.pt")
    depth = len(weighted_layers(model))
    shortcut = "none" if name.startswith("plain") else "A"
    provenance = {"run": name, "status": "finished", "iterations_done": iterations, "device": "CPU", "data": data,
                  "model": {"depth": depth, "shortcut": shortcut, "base_width": 16},
                  "recipe": {"batch_size": 128, "paper_iterations": 64000}}
    (folder / "provenance.json").write_text(json.dumps(provenance))


def test_load_trained_takes_the_longest_run_and_the_images_it_trained_on(tmp_path):
    cifar = FakeCifar(per_class=10)
    data = {"train_images": 80, "validation_images": 20, "train_per_class": None, "data_seed": 0}
    torch.manual_seed(0)
    short, long = create_model("plain20"), create_model("plain20")
    write_run(tmp_path / "short" / "plain20", "plain20", short, data, iterations=30)
    write_run(tmp_path / "long" / "plain20", "plain20", long, data, iterations=300)
    trained = load_trained("plain20", cifar, folder=tmp_path)
    assert trained.iterations == 300 and not trained.model.training
    assert torch.equal(trained.model.layer1[0].conv1.weight, long.layer1[0].conv1.weight.half().float())
    train_images, _, val_images, _ = train_val_split(cifar.train_images, cifar.train_labels, 20, 0)
    assert np.array_equal(trained.train_images, train_images) and len(trained.train_labels) == 80
    assert not any((val == trained.train_images).all(axis=(1, 2, 3)).any() for val in val_images)
    assert torch.allclose(trained.mean, pixel_mean(train_images))
    assert trained.describe().startswith("300 iterations of batch 128 (0.5% of the paper's 64,000) on 80")
    write_run(tmp_path / "full" / "plain20", "plain20", long, data, iterations=64_000)
    assert load_trained("plain20", cifar, folder=tmp_path).describe().startswith(
        "64,000 iterations of batch 128 (the paper's full schedule) on 80 training images, CPU")


def test_load_trained_reestimates_batchnorm_statistics_stored_as_infinity(tmp_path):
    """A running variance above fp16's 65,504 is stored as inf; eval mode then silences that
    channel. load_trained re-estimates BN's statistics from the run's training images."""
    cifar = FakeCifar(per_class=10)
    data = {"train_images": 100, "validation_images": 0, "train_per_class": None, "data_seed": 0}
    model = create_model("plain20")
    model.layer1[0].bn1.running_var[3] = 1e6
    write_run(tmp_path / "plain20", "plain20", model, data)
    trained = load_trained("plain20", cifar, folder=tmp_path, reestimate_images=20)
    assert trained.batchnorm_reestimated == 20
    assert all(torch.isfinite(b).all() for b in trained.model.buffers())
    assert torch.equal(trained.model.layer1[0].conv1.weight, model.layer1[0].conv1.weight.half().float())
    clean = tmp_path / "clean"
    write_run(clean / "plain20", "plain20", create_model("plain20"), data)
    assert load_trained("plain20", cifar, folder=clean).batchnorm_reestimated == 0


def test_reestimated_batchnorm_statistics_are_the_average_over_the_images():
    torch.manual_seed(0)
    model = create_model("plain20")
    images = FakeCifar(per_class=4).train_images
    mean = pixel_mean(images)
    reestimate_batchnorm_(model, images, mean, batch_size=40)
    first = normalize(to_tensor(images), mean)
    stem = model.conv1(first)
    assert torch.allclose(model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    assert model.bn1.momentum == 0.1 and not model.training


def test_longest_common_length_compares_nets_trained_equally_long(tmp_path):
    data = {"train_images": 100, "validation_images": 0, "train_per_class": None, "data_seed": 0}
    for name, lengths in (("plain20", (30, 300)), ("plain56", (30, 300, 3000))):
        for n in lengths:
            write_run(tmp_path / f"{name}-{n}" / name, name, create_model(name), data, iterations=n)
    assert longest_common_length(["plain20", "plain56"], folder=tmp_path) == 300
    assert load_trained("plain56", FakeCifar(per_class=10), folder=tmp_path).iterations == 3000
    assert load_trained("plain56", FakeCifar(per_class=10), iterations=300, folder=tmp_path).iterations == 300
    with pytest.raises(FileNotFoundError, match="shipped lengths: 30, 300"):
        load_trained("plain20", FakeCifar(per_class=10), iterations=3000, folder=tmp_path)
    with pytest.raises(FileNotFoundError, match="no run length is shipped for all of plain20, resnet20"):
        longest_common_length(["plain20", "resnet20"], folder=tmp_path)


def test_load_trained_refuses_another_copy_of_the_data(tmp_path):
    data = {"train_images": 45_000, "validation_images": 20, "train_per_class": None, "data_seed": 0}
    write_run(tmp_path / "plain20", "plain20", create_model("plain20"), data)
    with pytest.raises(ValueError, match="trained on 45,000 images"):
        load_trained("plain20", FakeCifar(per_class=10), folder=tmp_path)


def test_spread():
    assert spread([2.0, 8.0, 4.0]) == 4.0 and spread([3.0]) == 1.0


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
    deep = [e for e in ILSVRC_ENTRIES if e.depth is not None]
    points, shallow_lines = ax.lines[:len(deep)], ax.lines[len(deep):len(deep) + 2]
    assert [(p.get_xdata()[0], p.get_ydata()[0]) for p in points] == [(e.depth, e.top5_error) for e in deep]
    assert [p.get_markerfacecolor() == "white" for p in points] == [e not in ilsvrc_winners() for e in deep]
    assert [p.get_marker() for p in points] == ["s" if e.extra_data else "o" for e in deep]
    assert ax.get_xscale() == "log"
    depths = sorted({e.depth for e in deep})
    assert list(ax.get_xticks()) == depths and [t.get_text() for t in ax.get_xticklabels()] == [str(d) for d in depths]
    assert [line.get_ydata()[0] for line in shallow_lines] == [e.top5_error for e in ILSVRC_ENTRIES if e.depth is None]
    ax = plot_gradient_norms({"a": {"l1": 1.0, "l2": 2.0}})
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    history = [{"iteration": 10, "train_error": 0.5, "test_error": 0.6},
               {"iteration": 20, "train_error": 0.4, "test_error": 0.5}]
    axes = plot_error_curves({"20-layer": history, "56-layer": history})
    assert axes[0].get_ylabel() == "training error (%)" and axes[1].get_ylabel() == "test error (%)"
    assert list(axes[1].lines[0].get_ydata()) == [60.0, 50.0]


def test_each_net_keeps_its_colour_in_every_plot():
    ax = plot_gradient_norms({"plain56": {"l1": 1.0}, "ResNet-56": {"l1": 2.0}})
    assert [line.get_color() for line in ax.lines[:2]] == [NET_COLORS["plain56"], NET_COLORS["resnet56"]]
    ax = plot_gradient_norms({"plain56": {"l1": 1.0}}, colors={"plain56": "black"})
    assert ax.lines[0].get_color() == "black"
    history = [{"iteration": 10, "train_error": 0.5, "test_error": 0.6}]
    axes = plot_error_curves({"plain-20": history, "56-layer": history}, colors={"56-layer": NET_COLORS["plain56"]})
    for ax in axes:
        assert [line.get_color() for line in ax.lines] == [NET_COLORS["plain20"], NET_COLORS["plain56"]]
    assert len(set(NET_COLORS.values())) == len(NET_COLORS)


def test_probe_measures_in_one_pass_what_the_single_probes_measure():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    before = copy.deepcopy(model.state_dict())
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    result = probe(model, images, labels)
    assert result.weight_gradients == pytest.approx(gradient_norms(model, images, labels), rel=1e-12)
    assert result.signal == pytest.approx(signal_stds(model, images), rel=1e-12)
    assert result.weights == pytest.approx(weight_norms(model), rel=1e-12)
    for name, step in result.relative_steps.items():
        assert step == pytest.approx(result.weight_gradients[name] / result.weights[name])
    assert list(result.activation_gradients) == ["stem"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # the last block's value is the gradient with respect to its output, computed by hand
    copy_ = copy.deepcopy(model).double().train()
    features = copy_.layer3(copy_.layer2(copy_.layer1(copy_.relu(copy_.bn1(copy_.conv1(images.double()))))))
    features.retain_grad()
    torch.nn.functional.cross_entropy(copy_.fc(features.mean(dim=(2, 3))), labels).backward()
    assert result.activation_gradients["layer3.2"] == pytest.approx(features.grad.norm().item(), rel=1e-9)


def test_under_batchnorm_scaling_a_conv_divides_its_gradient_and_leaves_its_relative_step_scaled_by_its_square():
    torch.manual_seed(0)
    model = create_model("plain20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-30                               # next to nothing added to the variance: exact invariance
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    before = probe(model, images, labels)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(10)
    after = probe(model, images, labels)
    name = "layer1.0.conv1"
    assert after.weight_gradients[name] == pytest.approx(before.weight_gradients[name] / 10, rel=1e-6)
    assert after.relative_steps[name] == pytest.approx(before.relative_steps[name] / 100, rel=1e-6)
    assert after.activation_gradients == pytest.approx(before.activation_gradients, rel=1e-6)
