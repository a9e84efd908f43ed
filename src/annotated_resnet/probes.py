"""Probes for the first three notebooks: the context of the abstract, the degradation problem
(Sec. 1, Fig. 1, Sec. 4.1) and the identity shortcut (Sec. 3.1, 3.2, Fig. 2).

1. the ILSVRC classification winners (the "revolution of depth") and their plot;
2. the gradient norm of every weighted layer at initialization, and the two ways to break a
   net's initialization that it is compared against (no BN, a naive N(0, 0.01) init);
3. the constructed solution of Sec. 1: a trained shallow plain net plus identity layers;
4. error curves drawn the way Fig. 1 draws them (training error left, test error right).
"""

from __future__ import annotations

from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from .model import BasicBlock, ResNet, cifar_resnet

# --- 1. The context of the abstract: ILSVRC classification winners ---


class IlsvrcEntry(NamedTuple):
    """One ILSVRC classification entry: top-5 test error (%) and depth (``None``: shallow,
    i.e. not a deep network)."""

    year: int
    name: str
    top5_error: float
    depth: int | None


#: Winners of ILSVRC classification 2010-2015, plus VGG (2nd in 2014). ResNet's 3.57% is
#: the ensemble result of the abstract; its deepest single model has 152 layers.
ILSVRC_WINNERS = (
    IlsvrcEntry(2010, "NEC-UIUC", 28.2, None),
    IlsvrcEntry(2011, "XRCE", 25.8, None),
    IlsvrcEntry(2012, "AlexNet", 16.4, 8),
    IlsvrcEntry(2013, "ZFNet", 11.7, 8),
    IlsvrcEntry(2014, "VGG (2nd)", 7.3, 19),
    IlsvrcEntry(2014, "GoogLeNet", 6.7, 22),
    IlsvrcEntry(2015, "ResNet", 3.57, 152),
)


def plot_revolution_of_depth(entries=ILSVRC_WINNERS):
    """Top-5 error against depth (log scale) for the deep entries; the shallow winners, which
    have no depth to plot, are drawn as dashed horizontal lines at their error."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    deep = [e for e in entries if e.depth is not None]
    ax.plot([e.depth for e in deep], [e.top5_error for e in deep], "o", color="tab:blue")
    for i, e in enumerate(deep):  # labels alternate above and below their point, so none overlap
        ax.annotate(f"{e.year} {e.name}\n{e.top5_error}%", (e.depth, e.top5_error), textcoords="offset points",
                    xytext=(6, 4 if i % 2 == 0 else -24), fontsize=8)
    for e in entries:
        if e.depth is None:
            ax.axhline(e.top5_error, color="0.6", ls="--", lw=1)
            ax.annotate(f"{e.year} {e.name} (shallow): {e.top5_error}%", (deep[0].depth, e.top5_error),
                        textcoords="offset points", xytext=(0, 3), fontsize=8, color="0.4")
    ax.set_xscale("log")
    ax.set_xlim(deep[0].depth * 0.7, max(e.depth for e in deep) * 2.5)
    ax.set_ylim(0, max(e.top5_error for e in entries) * 1.15)
    ax.set_xlabel("depth (weighted layers, log scale)")
    ax.set_ylabel("ILSVRC top-5 error (%)")
    ax.set_title("ILSVRC classification: the revolution of depth")
    fig.tight_layout()
    return fig


# --- 2. Gradients at initialization (Sec. 1, Sec. 4.1) ---


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The weighted layers in the order the input meets them: every convolution of the stem and
    of the residual paths, and the classifier (for a CIFAR net, the 6n+2 layers the paper
    counts). Projection shortcuts (``downsample``) are not counted, as in the paper."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name]


def gradient_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The L2 norm of the loss gradient with respect to each weighted layer's weights, for one
    batch, in training mode (BN uses the batch's statistics, as during training).

    Vanishing gradients show as norms orders of magnitude smaller than a healthy net's: at the
    layers near the input when the backward signal decays, at every layer when the forward
    signal itself dies out. Sec. 4.1 says a BN plain net has healthy norms."""
    if images.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected images of shape (N, C, H, W) and N labels, got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    model.train()
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    norms = {name: m.weight.grad.norm().item() for name, m in weighted_layers(model)}
    model.zero_grad()
    return norms


def without_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by the identity, in place (the convolutions
    have no bias, so the net is then a stack of bare convolutions and ReLUs)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
    return model


def naive_init_(model: nn.Module, std: float = 0.01) -> nn.Module:
    """Re-initialize every convolution from N(0, std^2): a fixed scale that ignores the layer's
    fan-in, the kind of initialization that normalized (He) initialization replaced."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=std)
    return model


def plot_gradient_norms(norms_by_label: dict[str, dict[str, float]], ax=None, title: str = "",
                        ylabel: str = "gradient norm at init"):
    """One line per network: gradient norm (log scale) against layer index, input side left."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for label, norms in norms_by_label.items():
        ax.semilogy(range(1, len(norms) + 1), list(norms.values()), marker=".", label=label)
    ax.set_xlabel("layer (1 = first conv, last = classifier)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return ax


# --- 3. The constructed solution (Sec. 1) ---


def identity_block(channels: int) -> BasicBlock:
    """A plain block (conv-BN-ReLU-conv-BN-ReLU) that is exactly the identity, in eval mode, on
    the non-negative inputs it receives after a ReLU.

    The 3x3 convolutions are Dirac deltas (``nn.init.dirac_``: each output channel copies its
    input channel); each BN has scale 1, shift 0, running mean 0 and running variance
    ``1 - eps``, so that x / sqrt(running_var + eps) = x; ReLU leaves non-negative values alone.
    """
    block = BasicBlock(channels, channels, stride=1, shortcut="none")
    for conv in (block.conv1, block.conv2):
        nn.init.dirac_(conv.weight)
    for bn in (block.bn1, block.bn2):
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    return block.eval()


def deepen_with_identity_layers(shallow: ResNet, depth: int) -> ResNet:
    """The constructed solution of Sec. 1: a plain CIFAR net of ``depth`` layers whose first
    blocks in each stage are copied from the trained ``shallow`` plain net and whose added
    blocks are identity blocks. In eval mode it computes exactly what ``shallow`` computes.

    The added blocks go at the end of each stage, after the copied ones, so that each stage
    still starts with the copied stride-2 block."""
    if not isinstance(shallow, ResNet) or shallow.stem != "cifar" or shallow.shortcut != "none":
        raise ValueError("expected a plain CIFAR net, e.g. create_model('plain20'); identity layers "
                         "are only the identity on the non-negative outputs of a plain block")
    shallow_blocks = len(shallow.layer1)
    if not isinstance(depth, int) or (depth - 2) % 6 or (depth - 2) // 6 < shallow_blocks:
        raise ValueError(f"depth must be 6n+2 and at least the shallow net's {6 * shallow_blocks + 2} layers; "
                         f"got depth={depth!r}")
    deep = cifar_resnet(depth, shortcut="none", num_classes=shallow.fc.out_features,
                        base_width=shallow.conv1.out_channels)
    state = deep.state_dict()
    state.update(shallow.state_dict())          # stem, copied blocks (same names) and classifier
    deep.load_state_dict(state)
    for shallow_stage, deep_stage in zip(shallow.stages, deep.stages):
        channels = shallow_stage[-1].conv2.out_channels
        for index in range(shallow_blocks, len(deep_stage)):
            deep_stage[index] = identity_block(channels)
    return deep.eval()


# --- 4. Error curves in the style of Fig. 1 ---


def plot_error_curves(histories: dict[str, list[dict]], axes=None, scale_note: str = "",
                      thick: tuple[str, ...] = ()):
    """Fig. 1's layout: training error (%) on the left, test error (%) on the right, against
    iterations, one line per network. ``histories`` maps a label ("20-layer") to the
    per-epoch history that :func:`annotated_resnet.train.train` returns."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for label, history in histories.items():
        iterations = [h["iteration"] for h in history]
        width = 2.5 if label in thick else 1.5
        line, = axes[0].plot(iterations, [100 * h["train_error"] for h in history], lw=width, label=label)
        axes[1].plot(iterations, [100 * h["test_error"] for h in history], lw=width,
                     color=line.get_color(), label=label)
    for ax, what in zip(axes, ("training error (%)", "test error (%)")):
        ax.set_xlabel("iterations")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if scale_note:
        axes[0].figure.suptitle(scale_note, fontsize=9)
    axes[0].figure.tight_layout()
    return axes
