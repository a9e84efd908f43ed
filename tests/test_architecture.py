"""The shape trace of Sec. 3.3 / Fig. 3 and the costs of Fig. 3 (VGG-19) and Table 3."""

import pytest
import torch
import torchvision

from annotated_resnet import count_multiply_adds, count_parameters, create_model, table1
from annotated_resnet.architecture import format_trace, trace_shapes

# The study group's question, answered: how the identity is added back in ResNet-34 on a 224x224 input.
RESNET34_TRACE = {
    "input": (3, 224, 224), "conv1": (64, 112, 112), "maxpool": (64, 56, 56),
    "conv2_1": (64, 56, 56), "conv2_3": (64, 56, 56),
    "conv3_1 shortcut": (128, 28, 28), "conv3_1": (128, 28, 28), "conv3_4": (128, 28, 28),
    "conv4_1 shortcut": (256, 14, 14), "conv4_6": (256, 14, 14),
    "conv5_1 shortcut": (512, 7, 7), "conv5_3": (512, 7, 7),
    "avgpool": (512,), "fc": (1000,),
}


def test_resnet34_trace_matches_table1_and_fig3():
    rows = trace_shapes(create_model("resnet34"), 224)
    shapes = {r["step"]: r["shape"] for r in rows}
    for step, shape in RESNET34_TRACE.items():
        assert shapes[step] == shape, step
    # 1 input + conv1 + maxpool + 16 blocks + 3 dotted shortcuts + avgpool + fc.
    assert len(rows) == 1 + 2 + 16 + 3 + 2
    assert [r["step"] for r in rows if r["step"].endswith("shortcut")] == [
        "conv3_1 shortcut", "conv4_1 shortcut", "conv5_1 shortcut"]


def test_trace_names_option_a_and_has_no_maxpool_on_cifar():
    rows = trace_shapes(create_model("resnet20"), 32)
    steps = [r["step"] for r in rows]
    assert "maxpool" not in steps
    shortcut = next(r for r in rows if r["step"] == "conv3_1 shortcut")
    assert shortcut["shape"] == (32, 16, 16)
    assert "option A" in shortcut["what"] and "16 zero channels" in shortcut["what"]
    assert rows[-1]["shape"] == (10,)


def test_trace_of_plain_net_has_no_shortcut_rows():
    rows = trace_shapes(create_model("plain34"), 224)
    assert not any(r["step"].endswith("shortcut") for r in rows)
    assert all("no shortcut" in r["what"] for r in rows if r["step"].startswith("conv") and "_" in r["step"])


def test_trace_leaves_no_hooks_behind_and_formats_every_row():
    model = create_model("resnet20")
    rows = trace_shapes(model, 32)
    assert all(not m._forward_hooks for m in model.modules())
    text = format_trace(rows)
    assert len(text.splitlines()) == len(rows)
    assert "32x16x16" in text


def test_trace_rejects_other_models_and_small_inputs():
    with pytest.raises(TypeError, match="annotated_resnet.ResNet"):
        trace_shapes(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="too small"):
        trace_shapes(create_model("resnet34"), 16)


def test_vgg19_costs_what_sec_3_3_says():
    # Sec. 3.3: VGG-19 19.6 billion FLOPs (multiply-adds); plain-34 3.6 billion, 18% of it.
    vgg = count_multiply_adds(torchvision.models.vgg19(weights=None))
    plain34 = count_multiply_adds(create_model("plain34"))
    assert round(vgg / 1e9, 1) == 19.6
    assert round(plain34 / 1e9, 1) == 3.6
    assert 18 <= 100 * plain34 / vgg < 19


def test_option_a_b_c_parameter_ordering_for_resnet34():
    # Table 3: A adds no parameters, B three projections, C thirteen more (one per block).
    models = {o: create_model("resnet34", shortcut=o) for o in "ABC"}
    projections = {o: sum(b.downsample is not None and not hasattr(b.downsample, "extra_channels")
                          for s in m.stages for b in s) for o, m in models.items()}
    assert projections == {"A": 0, "B": 3, "C": 16}
    params = {o: count_parameters(m) for o, m in models.items()}
    assert params["A"] == count_parameters(create_model("plain34"))
    assert params["A"] < params["B"] < params["C"]


def test_table1_on_the_meta_device_counts_what_the_cpu_counts():
    # The meta device only carries shapes; the counts must not depend on it.
    meta, cpu = table1(depths=(18,)), table1(depths=(18,), device="cpu")
    assert meta == cpu
    assert meta[0]["params"] == 11_689_512 and round(meta[0]["gmacs"], 3) == 1.814
