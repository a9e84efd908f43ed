"""Table 1 of the paper, rebuilt from the code: per stage the output size and block layout,
per network the parameters and multiply-adds.

Multiply-adds are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts the
convolutions and matrix products of one real forward pass (2 FLOPs per multiply-add). The
paper's "FLOPs" (Sec. 3.3, Table 1) are multiply-adds, so we halve the count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import IMAGENET_LAYOUTS, BasicBlock, Bottleneck, ResNet, imagenet_resnet


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (BN's running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_multiply_adds(model: nn.Module, input_size: int = 224, in_channels: int = 3) -> int:
    """Multiply-adds of one forward pass of a single image, counted by PyTorch."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, in_channels, input_size, input_size))
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
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.in_channels, input_size, input_size))
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


def table1(depths=tuple(IMAGENET_LAYOUTS), input_size: int = 224) -> list[dict]:
    """One row per network of Table 1 (option B, the paper's "v1" stride placement):
    depth, per-stage output size and layout, parameters and multiply-adds (GMACs)."""
    rows = []
    for depth in depths:
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
