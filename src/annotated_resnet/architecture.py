"""Table 1 of the paper, rebuilt from the code: per stage the output size and block layout,
per network the multiply-adds (Table 1's "FLOPs") and the parameters (which Table 1 does not
give; we count them as well).

Multiply-adds are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts the
convolutions and matrix products of one real forward pass (2 FLOPs per multiply-add). The
paper's "FLOPs" (Sec. 3.3, Table 1) are multiply-adds, so we halve the count.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import IMAGENET_LAYOUTS, BasicBlock, Bottleneck, ResNet, ZeroPadShortcut, imagenet_resnet


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (BN's running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _one_image(model: nn.Module, input_size: int, in_channels: int | None = None):
    """A zero image (1, C, H, W) on the model's device, with the model in eval mode and no
    autograd; the model's training mode is restored afterwards."""
    weight = next(model.parameters())
    channels = in_channels or getattr(model, "in_channels", 3)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield torch.zeros(1, channels, input_size, input_size, device=weight.device, dtype=weight.dtype)
    finally:
        model.train(was_training)


def count_multiply_adds(model: nn.Module, input_size: int = 224, in_channels: int | None = None) -> int:
    """Multiply-adds of one forward pass of a single image, counted by PyTorch (``in_channels``:
    the model's own ``in_channels`` if it has one, else 3)."""
    counter = FlopCounterMode(display=False)
    with _one_image(model, input_size, in_channels) as x, counter:
        model(x)
    return counter.get_total_flops() // 2


def stage_output_shapes(model: ResNet, input_size: int = 224) -> dict[str, tuple[int, ...]]:
    """Shape (C, H, W) after the stem ("conv1") and after every stage, for one image."""
    shapes: dict[str, tuple[int, ...]] = {}
    named = [("conv1", model.relu)] + [(f"layer{i + 1}", s) for i, s in enumerate(model.stages)]

    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(output.shape[1:]))
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in named]
    try:
        with _one_image(model, input_size) as x:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def block_layout(block: nn.Module) -> str:
    """A block as Table 1 writes it, e.g. ``[3x3, 64; 3x3, 64]`` or ``[1x1, 64; 3x3, 64; 1x1, 256]``."""
    if isinstance(block, BasicBlock):
        convs = [block.conv1, block.conv2]
    elif isinstance(block, Bottleneck):
        convs = [block.conv1, block.conv2, block.conv3]
    else:
        raise TypeError(f"expected a BasicBlock or Bottleneck, got {type(block).__name__}")
    return "[" + "; ".join(f"{c.kernel_size[0]}x{c.kernel_size[1]}, {c.out_channels}" for c in convs) + "]"


def table1(depths=tuple(IMAGENET_LAYOUTS), input_size: int = 224, device: str = "meta") -> list[dict]:
    """One row per network of Table 1 (option B, the paper's "v1" stride placement):
    depth, per-stage output size and layout, multiply-adds (GMACs) and parameters (the last
    are our addition: Table 1 has no parameter counts).

    The networks are built on ``device``: by default PyTorch's meta device, whose tensors
    have shapes but no data, so the forward pass that the counter and the hooks watch runs
    every layer's code without doing its arithmetic (the counts are the same as on the CPU)."""
    rows = []
    for depth in depths:
        with torch.device(device):
            model = imagenet_resnet(depth)
        shapes = stage_output_shapes(model, input_size)
        stages = {
            "conv1": (f"{shapes['conv1'][1]}x{shapes['conv1'][2]}", "7x7, 64, stride 2"),
            **{f"conv{i + 2}_x": (f"{shapes[f'layer{i + 1}'][1]}x{shapes[f'layer{i + 1}'][2]}",
                                  f"{block_layout(stage[0])} x {len(stage)}")
               for i, stage in enumerate(model.stages)},
        }
        rows.append({
            "depth": depth,
            "stages": stages,
            "params": count_parameters(model),
            "gmacs": count_multiply_adds(model, input_size) / 1e9,
        })
    return rows


def format_table1(rows: list[dict]) -> str:
    """Table 1 as text: one line per stage, one column per network."""
    names = [f"{r['depth']}-layer" for r in rows]
    w = 2 + max(len(layout) for r in rows for _, layout in r["stages"].values())
    lines = [f"{'layer':<9}{'output':<9}" + "".join(f"{n:<{w}}" for n in names)]
    for stage in rows[0]["stages"]:
        size = rows[0]["stages"][stage][0]
        lines.append(f"{stage:<9}{size:<9}" + "".join(f"{r['stages'][stage][1]:<{w}}" for r in rows))
    lines.append(f"{'params':<18}" + "".join(f"{r['params']:<{w},}" for r in rows))
    lines.append(f"{'GMACs':<18}" + "".join(f"{r['gmacs']:<{w}.3f}" for r in rows))
    return "\n".join(line.rstrip() for line in lines)


def _shortcut_description(block: nn.Module) -> str:
    """What the shortcut of one block does to x (Sec. 3.3): identity, option A or a projection."""
    if not block.has_shortcut:
        return "no shortcut (plain)"
    if block.downsample is None:
        return "identity"
    if isinstance(block.downsample, ZeroPadShortcut):
        a = block.downsample
        return f"option A: subsample /{a.stride}, append {a.extra_channels} zero channels (no parameters)"
    conv = block.downsample[0]
    return f"projection W_s: 1x1 conv/{conv.stride[0]}, {conv.in_channels}->{conv.out_channels} channels, BN"


def trace_shapes(model: ResNet, input_size: int = 224) -> list[dict]:
    """Every step of one forward pass, in order, with the shape (C, H, W) it outputs.

    Steps are named as in Table 1: ``conv1``, ``maxpool``, ``conv3_1`` (stage 3, block 1),
    ``conv3_1 shortcut`` (the shortcut path of a block that changes dimensions, the dotted
    lines of Fig. 3), ``avgpool`` and ``fc``. Each row is a dict with ``step``, ``what``
    (the operation in words) and ``shape``.
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"expected an annotated_resnet.ResNet, got {type(model).__name__}")
    steps: list[tuple[str, str, nn.Module]] = []
    conv = model.conv1
    steps.append(("conv1", f"{conv.kernel_size[0]}x{conv.kernel_size[1]} conv/{conv.stride[0]}, "
                           f"{conv.out_channels} filters, BN, ReLU", model.relu))
    if isinstance(model.maxpool, nn.MaxPool2d):
        steps.append(("maxpool", f"{model.maxpool.kernel_size}x{model.maxpool.kernel_size} max pool/"
                                 f"{model.maxpool.stride}", model.maxpool))
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            name = f"conv{s + 2}_{b + 1}"
            stride = block.conv1.stride[0] * block.conv2.stride[0]
            layout = block_layout(block) + (f", stride {stride}" if stride > 1 else "")
            if block.downsample is not None:
                steps.append((f"{name} shortcut", _shortcut_description(block), block.downsample))
            adds = ("no shortcut" if not block.has_shortcut else
                    "adds x" if block.downsample is None else "adds the shortcut above")
            steps.append((name, f"{layout}; {adds}", block))
    steps.append(("avgpool", "global average pool, flatten", model.avgpool))
    steps.append(("fc", f"fully connected, {model.fc.out_features} outputs", model.fc))

    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(output.flatten(1).shape[1:] if name == "avgpool" else output.shape[1:]))
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, _, module in steps]
    try:
        with _one_image(model, input_size) as x:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    input_row = {"step": "input", "what": f"{input_size}x{input_size} image", "shape": tuple(x.shape[1:])}
    return [input_row] + [{"step": name, "what": what, "shape": shapes[name]} for name, what, _ in steps]


def format_trace(rows: list[dict]) -> str:
    """The rows of :func:`trace_shapes` as a text table: step, output shape, operation."""
    width = max(len(r["step"]) for r in rows) + 2
    return "\n".join(f"{r['step']:<{width}}{'x'.join(map(str, r['shape'])):<14}{r['what']}" for r in rows)

