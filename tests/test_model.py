"""The networks against the paper's numbers (Tables 1, 3, 6) and torchvision."""

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from annotated_resnet import (
    MODEL_NAMES,
    cifar_resnet,
    count_multiply_adds,
    count_parameters,
    create_model,
    imagenet_resnet,
    stage_output_shapes,
    table1,
)
from annotated_resnet.course.probes import naive_init_
from annotated_resnet.model import ZeroPadShortcut, he_normal_

# Table 6's parameters (0.27M ... 19.4M) as exact counts of the option-A networks, made
# independently of this code.
TABLE6_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}
# Table 1: the paper's GFLOPs (multiply-adds), v1 stride placement, option B.
TABLE1_GFLOPS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}
# The same networks' multiply-adds (stride on the 1x1, option B), counted independently of this code.
COUNTED_GMACS = {18: 1.814, 34: 3.664, 50: 3.858, 101: 7.570, 152: 11.282}
TABLE1_SIZES = {"conv1": 112, "layer1": 56, "layer2": 28, "layer3": 14, "layer4": 7}


@pytest.mark.parametrize("depth", sorted(TABLE6_PARAMS))
def test_cifar_resnet_parameters_equal_table6(depth):
    assert count_parameters(create_model(f"resnet{depth}")) == TABLE6_PARAMS[depth]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_net_has_exactly_the_parameters_of_its_option_a_resnet(depth):
    assert count_parameters(create_model(f"plain{depth}")) == TABLE6_PARAMS[depth]


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_imagenet_parameters_equal_torchvision(depth):
    ours = create_model(f"resnet{depth}")
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    assert count_parameters(ours) == count_parameters(theirs)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_v15_loads_torchvision_state_dict_and_gives_same_outputs(depth):
    torch.manual_seed(depth)
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    # Random BN statistics, so eval mode exercises every buffer that was loaded.
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    ours = create_model(f"resnet{depth}", stride_on_3x3=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-4, atol=1e-4)


def test_v1_loads_the_same_state_dict_but_computes_something_else():
    theirs = torchvision.models.resnet50(weights=None)
    ours = create_model("resnet50")  # v1: stride on the first 1x1
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-3)


@pytest.mark.parametrize("depth", sorted(TABLE1_GFLOPS))
def test_multiply_adds_match_table1(depth):
    gmacs = count_multiply_adds(create_model(f"resnet{depth}")) / 1e9
    assert round(gmacs, 3) == COUNTED_GMACS[depth]
    # The paper gives one decimal, sometimes rounded (7.570 -> 7.6), sometimes cut (3.664 -> 3.6).
    assert abs(gmacs - TABLE1_GFLOPS[depth]) < 0.1


def test_v15_costs_more_multiply_adds_than_v1():
    v1 = count_multiply_adds(create_model("resnet50"))
    v15 = count_multiply_adds(create_model("resnet50", stride_on_3x3=True))
    assert round(v15 / 1e9, 3) == 4.089  # torchvision's resnet50
    assert v15 > v1


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain34"])
def test_stage_output_sizes_match_table1(name):
    model = create_model(name)
    shapes = stage_output_shapes(model, 224)
    assert {k: v[1] for k, v in shapes.items()} == TABLE1_SIZES
    assert all(v[1] == v[2] for v in shapes.values())
    expansion = 4 if model.block_type == "Bottleneck" else 1
    assert [shapes[f"layer{i}"][0] for i in range(1, 5)] == [w * expansion for w in (64, 128, 256, 512)]


@pytest.mark.parametrize("name", ["resnet20", "plain56", "resnet110"])
def test_cifar_stage_output_sizes_are_32_16_8(name):
    shapes = stage_output_shapes(create_model(name), 32)
    assert shapes == {"conv1": (16, 32, 32), "layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}


def test_table1_rows():
    rows = table1(depths=(18, 50))
    assert [r["params"] for r in rows] == [11_689_512, 25_557_032]
    assert rows[0]["stages"]["conv2_x"] == ("56x56", "[3x3, 64; 3x3, 64] x 2")
    assert rows[1]["stages"]["conv4_x"] == ("14x14", "[1x1, 256; 3x3, 256; 1x1, 1024] x 6")
    assert rows[1]["stages"]["conv1"] == ("112x112", "7x7, 64, stride 2")


def _projections(model):
    return sum(1 for m in model.modules() if getattr(m, "downsample", None) is not None
               and isinstance(m.downsample, torch.nn.Sequential))


def test_option_a_adds_no_parameters_over_plain():
    for depth in (18, 34):
        plain = count_parameters(create_model(f"plain{depth}"))
        assert count_parameters(create_model(f"resnet{depth}", shortcut="A")) == plain
    zero_pads = [m for m in create_model("resnet56").modules() if isinstance(m, ZeroPadShortcut)]
    assert len(zero_pads) == 2 and all(count_parameters(m) == 0 for m in zero_pads)


def test_option_b_adds_exactly_the_projections_at_dimension_changes():
    plain = count_parameters(create_model("plain34"))
    model_b = create_model("resnet34", shortcut="B")
    # conv3_1, conv4_1, conv5_1: 1x1 conv (in x out) + BN (2 x out) each.
    expected = sum(cin * cout + 2 * cout for cin, cout in [(64, 128), (128, 256), (256, 512)])
    assert count_parameters(model_b) - plain == expected
    assert _projections(model_b) == 3


def test_option_c_projects_every_block():
    model_b, model_c = create_model("resnet34", shortcut="B"), create_model("resnet34", shortcut="C")
    assert _projections(model_c) == 16  # one per block: 3 + 4 + 6 + 3
    assert _projections(model_c) - _projections(model_b) == 13  # the paper's 13 extra
    extra = sum(c * c + 2 * c for c, n in [(64, 3), (128, 3), (256, 5), (512, 2)] for _ in range(n))
    assert count_parameters(model_c) - count_parameters(model_b) == extra


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_residual_block_is_identity_when_residual_is_zero():
    model = create_model("resnet20", zero_init_residual=True).eval()
    block = model.layer1[0]
    x = torch.rand(2, 16, 8, 8)  # non-negative, as after a ReLU
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_every_name_builds_and_classifies():
    for name in MODEL_NAMES:
        if name in ("resnet1202", "resnet152", "resnet101"):
            continue  # large; their parameter counts are tested above
        model = create_model(name).eval()
        size = 32 if model.stem == "cifar" else 64
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
        assert out.shape == (1, 10 if model.stem == "cifar" else 1000)


def test_general_cifar_constructor_accepts_any_6n_plus_2():
    assert len(cifar_resnet(14).layer1) == 2
    assert count_parameters(cifar_resnet(8, shortcut="none")) == count_parameters(cifar_resnet(8))


def test_he_initialisation_and_default_classifier():
    model = create_model("resnet56")
    conv = model.layer2[0].conv1  # 3x3, 32 filters: fan_out = 9 * 32
    assert abs(conv.weight.std().item() - (2 / (9 * 32)) ** 0.5) < 0.01
    assert model.fc.weight.abs().max() <= 1 / 64 ** 0.5  # PyTorch's default, bound 1/sqrt(fan_in)


@pytest.mark.parametrize("fan", ["in", "out"])
def test_he_normal_draws_the_spread_of_torchs_kaiming_normal(fan):
    ours, torchs = torch.empty(256, 128, 3, 3), torch.empty(256, 128, 3, 3)
    he_normal_(ours, fan=fan)
    nn.init.kaiming_normal_(torchs, mode=f"fan_{fan}", nonlinearity="relu")
    assert abs(ours.std() / torchs.std() - 1) < 0.01 and abs(ours.mean()) < 0.01 * ours.std()
    with pytest.raises(ValueError, match="fan must be 'in' or 'out'"):
        he_normal_(ours, fan="fan_in")


INITIAL_WEIGHTS = """
import sys, torch
from annotated_resnet import create_model
from annotated_resnet.course.probes import naive_init_
torch.manual_seed(0)
he, naive = create_model("plain56").state_dict(), naive_init_(create_model("plain20")).state_dict()
torch.save({**he, **{"naive." + k: v for k, v in naive.items()}}, sys.argv[1])
"""


def test_the_initial_weights_do_not_depend_on_the_cpus_vector_kernels(tmp_path):
    # float32 normals come from AVX2 code on most x86 CPUs and from scalar code on ARM; under
    # ATEN_CPU_CAPABILITY=default this CPU takes the scalar code too
    kernels = ["default"] + (["avx2"] if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else [])
    weights = {}
    for kernel in kernels:
        file = tmp_path / f"{kernel}.pt"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel}
        subprocess.run([sys.executable, "-c", INITIAL_WEIGHTS, str(file)], env=env, check=True)
        weights[kernel] = torch.load(file, weights_only=True)
    torch.manual_seed(0)
    here = create_model("plain56").state_dict()
    here.update({"naive." + k: v for k, v in naive_init_(create_model("plain20")).state_dict().items()})
    for kernel, state in weights.items():
        assert all(torch.equal(state[k], here[k]) for k in here), f"{kernel} kernels draw other initial weights"


# --- bad input: each error says what was expected ---

@pytest.mark.parametrize("shape, message", [
    ((1, 1, 32, 32), "expected 3 input channels"),
    ((3, 32, 32), "expected a 4-d batch"),
    ((1, 3, 32), "expected a 4-d batch"),
    ((1, 3, 2, 2), "too small"),
])
def test_bad_input_tensors_are_explained(shape, message):
    with pytest.raises(ValueError, match=message):
        create_model("resnet20")(torch.randn(shape))


@pytest.mark.parametrize("dtype, message", [
    (torch.uint8, r"floating-point batch .*got torch.uint8.*normalize"),
    (torch.int64, r"floating-point batch .*got torch.int64"),
    (torch.float64, r"batch is torch.float64 but the network's weights are torch.float32.*x.to\(torch.float32\)"),
])
def test_a_batch_of_the_wrong_dtype_is_explained(dtype, message):
    with pytest.raises(TypeError, match=message):
        create_model("resnet20")(torch.zeros(1, 3, 32, 32, dtype=dtype))


def test_a_float32_batch_goes_through_under_autocast_and_float64_through_a_float64_net():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert create_model("resnet20")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert create_model("resnet20").double()(torch.zeros(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_too_small_imagenet_input_is_explained():
    with pytest.raises(ValueError, match="at least 32x32"):
        create_model("resnet18")(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("call, message", [
    (lambda: cifar_resnet(21), r"6n\+2"),
    (lambda: cifar_resnet(2), r"6n\+2"),
    (lambda: imagenet_resnet(42), r"\[18, 34, 50, 101, 152\]"),
    (lambda: create_model("resnet20", shortcut="D"), "expected one of: 'A'"),
    (lambda: create_model("resnet21"), "valid names: resnet20"),
    (lambda: create_model("vgg19"), "valid names:"),
    (lambda: create_model("plain20", shortcut="B"), "plain network"),
    (lambda: cifar_resnet(20, num_classes=0), "num_classes must be a whole number of at least 1"),
    (lambda: imagenet_resnet(18, num_classes=-3), "num_classes must be a whole number of at least 1"),
    (lambda: cifar_resnet(20, base_width=0), "base_width .* at least 1 .*got 0"),
    (lambda: create_model("resnet20", base_width=-1), "base_width .* at least 1 .*got -1"),
])
def test_bad_arguments_are_explained(call, message):
    with pytest.raises(ValueError, match=message):
        call()
