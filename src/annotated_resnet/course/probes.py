"""Probes for notebooks 2 and 3: the degradation problem (Sec. 1, Fig. 1, Sec. 4.1) and the
identity shortcut (Sec. 3.1, 3.2, Fig. 2).

1. the gradient norm of every weighted layer and the spread of the forward signal, and the
   two ways to break a net's initialization they are compared against (no BN, a naive
   N(0, 0.01) init);
2. the trained nets the package ships (its reference runs), with the images they trained on;
3. the constructed solution of Sec. 1: a trained shallow plain net plus identity layers;
4. error curves drawn the way Fig. 1 draws them (training error left, test error right).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import balanced_subset, normalize, pixel_mean, to_tensor
from ..model import BasicBlock, ResNet, cifar_resnet, normal_
from ..reference_runs import runs_at_one_schedule, shipped_runs

# --- 1. Gradients and forward signals (Sec. 1, Sec. 4.1) ---


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The weighted layers in the order the input meets them: every convolution of the stem and
    of the residual paths, and the classifier (for a CIFAR net, the 6n+2 layers the paper
    counts). Projection shortcuts (``downsample``) are not counted, as in the paper."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name]


def _check_batch(images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if images.dim() != 4 or (labels is not None and images.shape[0] != labels.shape[0]):
        expected = "images of shape (N, C, H, W)" + ("" if labels is None else " and N labels")
        got = f"{tuple(images.shape)}" + ("" if labels is None else f" and {tuple(labels.shape)}")
        raise ValueError(f"expected {expected}, got {got}")


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in training mode, to probe without touching the original.

    At initialization a plain net's gradients pass through dozens of layers that each multiply
    rounding errors; in float32 the result then depends on the CPU's kernels (AVX2, AVX-512 and
    ARM sum in different orders) by about 1%. In float64 those differences stay far below what
    is printed, so every machine shows the same numbers."""
    return copy.deepcopy(model).to(torch.float64).train()


def gradient_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The gradient norm of every weighted layer, input side first: for one batch, the gradient
    of the mean cross-entropy loss with respect to the layer's weight tensor, a tensor of the
    weight's shape, and its L2 norm, the square root of the sum of its squared entries.

    Measured in training mode (BN uses the batch's statistics, as SGD sees the net), in float64
    on a copy of the model (see :func:`_float64_copy`), so the model is left as it was. Vanishing
    gradients show as norms many orders of magnitude below a healthy net's."""
    _check_batch(images, labels)
    probe = _float64_copy(model)
    F.cross_entropy(probe(images.to(torch.float64)), labels).backward()
    return {name: m.weight.grad.norm().item() for name, m in weighted_layers(probe)}


def weight_norms(model: nn.Module) -> dict[str, float]:
    """The L2 norm of every weighted layer's weight tensor, input side first (the layers of
    :func:`weighted_layers`), computed in float64."""
    return {name: m.weight.detach().double().norm().item() for name, m in weighted_layers(model)}


class Probe(NamedTuple):
    """What one forward and backward pass of :func:`probe` measures, each a dict in the order the
    input meets the layers: per weighted layer, the ``weight_gradients`` (||dL/dW||), the
    ``weights`` (||W||) and the ``relative_steps`` (||dL/dW|| / ||W||); per block (the stem,
    then every block), the ``activation_gradients`` (||dL/dy|| for the block's output y, the
    backward signal) and the ``signal`` (the standard deviation of y, the forward signal)."""

    weight_gradients: dict[str, float]
    weights: dict[str, float]
    relative_steps: dict[str, float]
    activation_gradients: dict[str, float]
    signal: dict[str, float]


def _blocks(model: ResNet) -> list[tuple[str, nn.Module]]:
    """The stem (its ReLU) and every block of a CIFAR ResNet or plain net, input side first."""
    return [("stem", model.relu)] + [(f"layer{i + 1}.{j}", block) for i, stage in enumerate(model.stages)
                                     for j, block in enumerate(stage)]


def probe(model: ResNet, images: torch.Tensor, labels: torch.Tensor) -> Probe:
    """Everything notebook 2 measures about a net, from one forward and one backward pass of the
    mean cross-entropy loss L on one batch, in training mode and float64, on a copy of the model
    (see :func:`_float64_copy`), so the model is left as it was.

    ``relative_steps``: how far, relative to its own size, one SGD step of learning rate 1 would
    move each layer's weights (multiply by the learning rate for a real step). For a convolution
    followed by batch norm the loss does not change when W is scaled, so the raw gradient norm
    shrinks like 1 / ||W||, and only this ratio says how hard a layer is pushed.
    ``activation_gradients``: the gradient with respect to what each block outputs, the
    "backward propagated" signal, as opposed to the gradient with respect to the weights."""
    _check_batch(images, labels)
    copy_, outputs = _float64_copy(model), {}

    def record(name):
        def hook(module, inputs, output):
            if name not in outputs:
                output.retain_grad()
                outputs[name] = output
        return hook

    for name, module in _blocks(copy_):
        module.register_forward_hook(record(name))
    logits = copy_(images.to(torch.float64))
    signal = {name: output.std().item() for name, output in outputs.items()}
    F.cross_entropy(logits, labels).backward()
    layers = weighted_layers(copy_)
    grads = {name: m.weight.grad.norm().item() for name, m in layers}
    weights = {name: m.weight.detach().norm().item() for name, m in layers}
    return Probe(grads, weights, {name: grads[name] / weights[name] for name in grads},
                 {name: output.grad.norm().item() for name, output in outputs.items()}, signal)


def signal_stds(model: ResNet, images: torch.Tensor) -> dict[str, float]:
    """The forward signal: the standard deviation of what the stem and each block output, for
    one batch in training mode (Sec. 4.1: BN keeps it at non-zero variance), in float64 on a copy
    of the model (see :func:`_float64_copy`), so the model is left as it was."""
    _check_batch(images)
    probe, stds = _float64_copy(model), {}

    def record(name):
        def hook(module, inputs, output):
            stds.setdefault(name, output.std().item())
        return hook

    for name, module in _blocks(probe):
        module.register_forward_hook(record(name))
    with torch.no_grad():
        probe(images.to(torch.float64))
    return stds


def probe_batch(cifar, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch every gradient probe of notebooks 2 and 3 uses, so that their numbers agree:
    ``size`` CIFAR-10 training images drawn at random with ``seed``, the classes taking turns
    (so 32 images hold 3 or 4 of every class), with the per-pixel mean of the training set
    subtracted (Sec. 4.2), and their labels."""
    images, labels = balanced_subset(cifar.train_images, cifar.train_labels, per_class=-(-size // 10), seed=seed)
    turn = np.zeros(len(labels), dtype=int)         # 0 for each class's first image, 1 for its second, ...
    for label in np.unique(labels):
        turn[labels == label] = np.arange((labels == label).sum())
    chosen = np.lexsort((labels, turn))[:size]      # by turn, then by class
    batch = normalize(to_tensor(images[chosen]), pixel_mean(cifar.train_images))
    return batch, torch.as_tensor(labels[chosen])


def spread(values) -> float:
    """Largest over smallest: how unevenly a set of positive numbers (a net's layer gradient
    norms, say) is spread. 1 means all equal."""
    values = list(values)
    return max(values) / min(values)


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
            normal_(m.weight, std)
    return model


#: One colour per CIFAR net, the same in every figure of notebooks 2 and 3: plain nets warm,
#: ResNets cool.
NET_COLORS = {"plain20": "tab:orange", "plain56": "tab:red", "resnet20": "tab:cyan", "resnet56": "tab:blue"}


def net_color(label: str, colors: dict[str, str] | None = None) -> str | None:
    """The colour of a line labelled ``label``: ``colors[label]`` if given, else the net's own
    colour from :data:`NET_COLORS` when the label is a net's name ("plain56", "ResNet-56"),
    else ``None`` (matplotlib's next colour)."""
    if colors and label in colors:
        return colors[label]
    return NET_COLORS.get(label.lower().replace("-", ""))


def plot_gradient_norms(norms_by_label: dict[str, dict[str, float]], ax=None, title: str = "",
                        ylabel: str = "gradient norm at init",
                        xlabel: str = "layer (1 = first conv, last = classifier)",
                        colors: dict[str, str] | None = None):
    """One line per network: gradient norm (log scale) against layer index, input side left.
    A line takes its colour from ``colors`` or, for a net's name, from :data:`NET_COLORS`."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for label, norms in norms_by_label.items():
        ax.semilogy(range(1, len(norms) + 1), list(norms.values()), marker=".", label=label,
                    color=net_color(label, colors))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return ax


# --- 2. The trained nets the package ships (reference runs) ---


class TrainedNet(NamedTuple):
    """A shipped reference run, ready to probe: the trained ``model`` (eval mode), the per-pixel
    ``mean`` it was trained with, the ``train_images`` and ``train_labels`` it trained on, its
    per-epoch ``history`` and its ``provenance`` (hardware, data, recipe).
    ``batchnorm_reestimated``: how many training images BN's running statistics were
    re-estimated from, because the file held infinite ones (0: used as shipped)."""

    model: ResNet
    mean: torch.Tensor
    train_images: np.ndarray
    train_labels: np.ndarray
    history: list[dict]
    provenance: dict
    batchnorm_reestimated: int = 0

    @property
    def iterations(self) -> int:
        return self.provenance["iterations_done"]

    def describe(self) -> str:
        """How long, on what, and on which data the net was trained, in one line."""
        recipe, data = self.provenance["recipe"], self.provenance["data"]
        fraction = self.iterations / recipe["paper_iterations"]
        length = "the paper's full schedule" if fraction == 1 else \
            f"{fraction:.1%} of the paper's {recipe['paper_iterations']:,}"
        return (f"{self.iterations:,} iterations of batch {recipe['batch_size']} ({length}) on "
                f"{data['train_images']:,} training images, {self.provenance['device']}")


def longest_common_length(names, folder=None) -> int:
    """The longest schedule (in iterations) for which every net in ``names`` has a shipped run,
    so that nets compared with one another were trained for equally long."""
    runs = runs_at_one_schedule(shipped_runs(folder), names)
    if not runs:
        raise FileNotFoundError(f"no run length is shipped for all of {', '.join(names)}; make the runs with "
                                f"`annotated-resnet reproduce --runs {','.join(names)} --out DIR`")
    return next(iter(runs.values())).iterations


def load_trained(name: str, cifar, iterations: int | None = None, folder=None,
                 reestimate_images: int = 1000) -> TrainedNet:
    """The shipped run of CIFAR-10 net ``name`` (``"plain20"``, ``"resnet56"``, ...) trained for
    ``iterations``, or for the most iterations if ``None`` (so longer runs shipped later are
    picked up), rebuilt with its weights, and the training images it saw: the run's
    train/validation split and subset, recomputed from its provenance. Where the shipped file
    holds infinite BN running statistics, they are re-estimated from ``reestimate_images`` of
    those images (:meth:`annotated_resnet.reference_runs.ReferenceRun.model`)."""
    runs = [run for run in shipped_runs(folder) if run.name == name]
    chosen = [run for run in runs if iterations in (None, run.iterations)]
    if not chosen:
        raise FileNotFoundError(f"no shipped run of {name!r} with {iterations:,} iterations; shipped lengths: "
                                f"{', '.join(f'{run.iterations:,}' for run in runs) or 'none'}")
    run = chosen[-1]
    model = run.model(cifar, reestimate_images)
    images, labels = run.training_images(cifar)
    return TrainedNet(model, pixel_mean(images), images, labels, run.history, run.provenance,
                      run.batchnorm_reestimated)


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
                      thick: tuple[str, ...] = (), colors: dict[str, str] | None = None):
    """Fig. 1's layout: training error (%) on the left, test error (%) on the right, against
    iterations, one line per network. ``histories`` maps a label ("20-layer") to the
    per-epoch history that :func:`annotated_resnet.training.train.train` returns; a line takes its
    colour from ``colors`` or, for a net's name, from :data:`NET_COLORS`."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for label, history in histories.items():
        iterations = [h["iteration"] for h in history]
        width = 2.5 if label in thick else 1.5
        line, = axes[0].plot(iterations, [100 * h["train_error"] for h in history], lw=width, label=label,
                             color=net_color(label, colors))
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
