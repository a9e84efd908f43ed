"""One training step in each precision: the choice by hardware, fp16's gradient scaling, the
learning rate read from a device tensor, and no host-device sync inside a step. All of it
runs on the CPU with the code a GPU captures into its CUDA graph (fused SGD included); the
capture itself is tested on a GPU only."""

import math
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from annotated_resnet.training.batches import DeviceBatches
from annotated_resnet.data import pixel_mean
from annotated_resnet.model import cifar_resnet
from annotated_resnet.training.recipe import paper_recipe, sgd
from annotated_resnet.training.step import TrainingStep, autocast, choose_device, choose_precision, grad_scaler

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
RECIPE = paper_recipe("resnet20").scaled(iterations=30, batch_size=16)


def tiny_model():
    torch.manual_seed(0)
    return cifar_resnet(8, base_width=4)


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(count)]


def step_for(model, precision="fp32", scaler=None, fused=True, **options):
    optimizer = sgd(model.parameters(), RECIPE, fused=fused)
    return TrainingStep(model, nn.CrossEntropyLoss(), optimizer, CPU, graph=False, precision=precision,
                        scaler=scaler, **options)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("capability, chosen", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_where_the_gpu_has_it_fp16_on_other_gpus_fp32_on_the_cpu(monkeypatch, capability,
                                                                                         chosen):
    # (7, 5) is the T4 of Colab and Kaggle: fp16 tensor cores, no bf16; (8, 0) the A100, (9, 0) the H100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert choose_precision(torch.device("cuda", 0)) == chosen
    assert choose_precision(torch.device("cuda", 0), "fp32") == "fp32"  # --precision overrides
    assert choose_precision(CPU) == "fp32" and choose_precision(CPU, "fp16") == "fp16"
    assert grad_scaler(CPU, "fp32") is None and grad_scaler(CPU, "bf16") is None
    assert isinstance(grad_scaler(CPU, "fp16"), torch.amp.GradScaler)  # fp16 alone needs scaling
    with autocast(CPU):
        assert not torch.is_autocast_enabled("cpu") and torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'; expected one of auto, bf16, fp16, fp32"):
        choose_precision(CPU, "fp8")


def test_graphs_and_gradient_scaling_need_a_gpu_and_fused_sgd():
    model = tiny_model()
    with pytest.raises(ValueError, match="CUDA device"):
        TrainingStep(model, nn.CrossEntropyLoss(), sgd(model.parameters(), RECIPE), CPU, graph=True)
    with pytest.raises(ValueError, match="fused=True"):
        step_for(model, "fp16", torch.amp.GradScaler("cpu"), fused=False)
    if torch.cuda.is_available():
        model = model.cuda()
        unfused = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match="fused=True"):
            TrainingStep(model, nn.CrossEntropyLoss(), unfused, torch.device("cuda"), graph=True)


def test_fp16_scale_doubles_after_its_growth_interval_and_halves_on_overflow():
    model = tiny_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    step = step_for(model, "fp16", scaler)
    data = batches(4)
    for x, y in data[:3]:
        _, loss = step(x, y, 0.1)
    assert scaler.get_scale() == 2048.0  # three good steps: doubled
    assert 1 < loss.item() < 5  # the returned loss is the unscaled one
    scaler.update(2.0 ** 60)  # so large that the scaled gradients overflow fp16
    before, buffers = weights(model), [b.clone() for b in step.optimizer.state_dict()["state"][0].values()]
    step(*data[3], 0.1)
    assert scaler.get_scale() == 2.0 ** 59  # halved
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped
    assert all(torch.equal(a, b) for a, b in zip(buffers, step.optimizer.state_dict()["state"][0].values()))


def test_a_skipped_first_step_leaves_momentum_at_zero_and_the_next_step_is_a_first_step():
    """fp16 often overflows at the first scale it tries: the run must go on as if that step
    had not been there (the fused update must not read an uninitialised momentum buffer)."""
    x, y = batches(1)[0]
    skipped_first = tiny_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    step = step_for(skipped_first, "fp16", scaler)
    step(x, y, 0.1)
    assert all(not buffer.any() for buffer in (step.optimizer.state[p]["momentum_buffer"]
                                               for p in skipped_first.parameters()))
    scaler.update(1024.0)
    step(x, y, 0.1)
    fresh = tiny_model()
    step_for(fresh, "fp16", torch.amp.GradScaler("cpu", init_scale=1024.0))(x, y, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(skipped_first.parameters(), fresh.parameters()))


def test_the_device_tensor_carries_every_change_of_the_learning_rate():
    """The update reads its rate from a device tensor, which the graph captures once: a change
    of rate (a milestone, the warm-up's end) must reach it. A zero rate freezes the weights."""
    model = tiny_model()
    step = step_for(model)
    data = batches(6)
    for x, y in data[:2]:
        step(x, y, 0.1)
    assert step.optimizer.param_groups[0]["lr"] == 0.1  # a number again after the step, for fastai
    frozen = weights(model)
    for x, y in data[2:4]:
        step(x, y, 0.0)
    assert step.rate.item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))
    step(*data[4], 0.05)
    assert step.rate.item() == pytest.approx(0.05) and not torch.equal(frozen[0], next(model.parameters()))


def test_the_fused_update_with_the_device_rate_trains_like_the_plain_one():
    results = []
    for fused in (False, True):
        model = tiny_model()
        step = step_for(model, fused=fused)
        for i, (x, y) in enumerate(batches(6)):
            step(x, y, 0.1 if i < 3 else 0.01)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    change = (results[0] - torch.cat([p.detach().flatten() for p in tiny_model().parameters()])).norm()
    assert (results[1] - results[0]).norm() < 1e-4 * change


class NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a value to the host (``.item()``, ``bool(tensor)``, ...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"{func} waits for the device inside a training step")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_step_never_waits_for_the_device(precision):
    """What a CUDA graph captures must not read a device value on the host: not the loss, not
    the scaler's overflow flag, not the learning rate."""
    model = tiny_model()
    step = step_for(model, precision, grad_scaler(CPU, precision))
    data = batches(4)
    step(*data[0], 0.1)
    with NoHostSync():
        for i, (x, y) in enumerate(data[1:]):
            step(x, y, 0.1 if i < 2 else 0.01)  # a milestone inside


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graph_step_trains_like_the_eager_step(precision):
    device = torch.device("cuda")
    if precision == "bf16" and choose_precision(device) != "bf16":
        pytest.skip("this GPU has no bf16 tensor cores")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
    labels = (torch.arange(200) % 10).numpy()
    loader = DeviceBatches(images, labels, 16, pixel_mean(images), train=True, device=device)
    batch_list = [b for _ in range(3) for b in loader]  # 36 batches
    params = {}
    for graph in (False, True):
        model = tiny_model().to(device)
        step = TrainingStep(model, nn.CrossEntropyLoss(), sgd(model.parameters(), RECIPE), device, graph=graph,
                            precision=precision, scaler=grad_scaler(device, precision))
        losses = [step(x, y, 0.1)[1].item() for x, y in batch_list[:30]]
        assert (step.captured is not None) == graph
        before = [p.detach().clone() for p in model.parameters()]
        for x, y in batch_list[30:]:
            step(x, y, 0.0)  # a zero learning rate must freeze the weights, graph or not
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        params[graph] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert all(math.isfinite(loss) for loss in losses)  # random images: no loss to lower
    initial = torch.cat([p.flatten() for p in tiny_model().parameters()]).to(device)
    change = (params[False] - initial).norm()
    assert change > 0 and (params[True] - params[False]).norm() < 0.05 * change


def test_the_device_variable_chooses_the_device_and_with_it_the_notebooks_scale(monkeypatch):
    from annotated_resnet.course.scale import run_scale

    monkeypatch.delenv("ANNOTATED_RESNET_SCALE", raising=False)
    monkeypatch.setenv("ANNOTATED_RESNET_DEVICE", "cpu")
    assert choose_device() == CPU and run_scale() == "small"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine kept on the CPU
    assert choose_device() == CPU and run_scale() == "small"
    assert choose_device("cpu") == CPU
    monkeypatch.setenv("ANNOTATED_RESNET_DEVICE", "")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert choose_device() == torch.device("cuda", 0) and run_scale() == "large"
