"""Checkpoints and logs of a training run: written atomically, read back with
``weights_only=True``, and checked to belong to the run that resumes them."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..model import ResNet, cifar_resnet

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1  # the layout of the dict that checkpoint.pt holds
LOG_NAME = "log.jsonl"
#: A finished run's files beside its log (the reference-run format, :mod:`annotated_resnet.training.results`).
WEIGHTS_NAME = "weights-fp16.pt"
PROVENANCE_NAME = "provenance.json"


@dataclass
class RunState:
    """Where a run stands: everything besides the model, optimizer and loader states that a
    checkpoint stores: the iteration, the epoch and the batches into it, the warm-up, the running
    sums of the epoch's training loss and error, and the per-epoch history."""

    iteration: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    warmed_up: bool = True
    smoothed_error: float = 1.0
    seconds: float = 0.0
    loss_sum: float = 0.0
    error_sum: float = 0.0
    history: list = field(default_factory=list)


def describe_model(model: ResNet) -> dict:
    """The arguments of :func:`cifar_resnet` that rebuild ``model`` (for checkpoints)."""
    if not isinstance(model, ResNet) or model.stem != "cifar":
        raise ValueError("training here is for the CIFAR-10 networks of Sec. 4.2 (cifar_resnet / resnet20 ...); "
                         f"got {type(model).__name__}")
    return {"depth": 6 * len(model.layer1) + 2, "shortcut": model.shortcut, "base_width": model.conv1.out_channels}


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        torch.save(obj, tmp)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def write_log(path: Path, history: list[dict]) -> None:
    """The history as JSON lines, one epoch a line, rewritten whole and atomically right after
    each checkpoint (a reader never sees a half-written log)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.writelines(json.dumps(record) + "\n" for record in history)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`annotated_resnet.training.train.train`, loaded with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}; `annotated-resnet train` writes "
                                f"<out>/{CHECKPOINT_NAME}")
    expected = f"expected a {CHECKPOINT_NAME} written by `annotated-resnet train` (or train(..., out=...))"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file, another format, or a pickle with arbitrary objects
        raise ValueError(f"{str(path)!r} cannot be read as a checkpoint ({type(error).__name__}); {expected}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this package (format {CHECKPOINT_FORMAT}); "
                         f"{expected}. A bare state_dict loads with model.load_state_dict(torch.load(path, weights_only=True)).")
    return checkpoint


def checkpoint_to_resume(out: str | os.PathLike | None, resume: bool) -> dict | None:
    """The checkpoint in the run folder ``out`` if ``resume``, ``None`` for a new run; an
    error that says what to do if the folder and ``resume`` disagree."""
    if out is not None and (Path(out) / CHECKPOINT_NAME).exists():
        if not resume:
            raise FileExistsError(f"{str(out)!r} already holds a run; resume it (--resume / resume=True) "
                                  "or choose another output folder")
        return load_checkpoint(out)
    if resume:
        raise FileNotFoundError(f"nothing to resume: no {CHECKPOINT_NAME} in {str(out)!r}; "
                                "drop --resume (resume=False) to start a new run there")
    return None


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """The CIFAR-10 net a checkpoint describes, with the checkpoint's weights."""
    model = cifar_resnet(**checkpoint["model"])
    model.load_state_dict(checkpoint["model_state"])
    return model


def check_same_run(checkpoint: dict, now: dict, out) -> None:
    """A resumed run must continue the run it resumes: ``now`` (the resuming run's model,
    recipe, seed and data, as a checkpoint holds them) must match the checkpoint's. The data's
    path may change; what was taken from it may not."""
    now = {**now, "data": {k: v for k, v in now["data"].items() if k != "source"}}
    saved = {**{k: checkpoint[k] for k in ("model", "recipe", "seed")},
             "data": {k: v for k, v in checkpoint["data"].items() if k != "source"}}
    changed = [f"{key}: {saved[key]} then, {now[key]} now" for key in now if saved[key] != now[key]]
    if changed:
        raise ValueError(f"the checkpoint in {str(out)!r} is another run ({'; '.join(changed)}); resume with "
                         "the settings it was started with, or choose another output folder")


#: How a run computes, as its checkpoint records it; a resumed run goes on as it started.
COMPUTE_SETTINGS = ("precision", "compile", "channels_last")


def settings_to_resume(checkpoint: dict | None, out, **asked) -> dict:
    """How a run computes (:data:`COMPUTE_SETTINGS`): what was ``asked`` for a new run; for a
    resumed one, what its checkpoint recorded, so that the same command with ``--resume``
    continues a bf16 compiled run as one. A setting asked for (not ``None`` or ``"auto"``) that
    differs from the checkpoint's is refused: the run would silently change how it trains."""
    if checkpoint is None:
        return asked
    saved = {key: checkpoint.get(key) for key in COMPUTE_SETTINGS}
    if saved["precision"] is not None:  # older checkpoints list every precision: "bf16, then fp16"
        saved["precision"] = saved["precision"].rsplit(", then ", 1)[-1]
    settings = {}
    for key, value in asked.items():
        if value in (None, "auto"):
            settings[key] = value if saved[key] is None else saved[key]
        elif saved[key] is not None and value != saved[key]:
            raise ValueError(f"the run in {str(out)!r} was trained with {key} {saved[key]}, not {value}; resume it "
                             f"without the {key} option (it is taken from the checkpoint), or start a new run in "
                             "another folder")
        else:
            settings[key] = value
    return settings


def check_same_device_type(checkpoint: dict, device: torch.device, out) -> None:
    """A run resumes on the kind of device it was trained on: the augmentation's generator of a
    GPU and of the CPU are different algorithms whose states do not convert, so the run could
    not continue exactly. (Checkpoints without the ``device`` entry are told apart by the size
    of that generator's state.)"""
    then = checkpoint.get("device")
    if then is None:
        states = checkpoint.get("process_states") or [checkpoint]
        cpu_state_size = torch.Generator().get_state().numel()
        then = "cpu" if states[0]["loader"]["augment_state"].numel() == cpu_state_size else "cuda"
    if then != device.type:
        raise ValueError(f"the checkpoint in {str(out)!r} was trained on {then.upper()} and resumes exactly only "
                         f"there (its random streams are the {then.upper()}'s); resume it with --device {then}, "
                         "or start a new run in another folder")


def check_same_processes(checkpoint: dict, processes: int, batch_norm: str, out) -> None:
    """A data-parallel run resumes with as many processes as it had, and the same batch norm:
    each process has its own augmentation stream, which the checkpoint continues."""
    then = checkpoint.get("processes", 1), checkpoint.get("batch_norm", "per process")
    if then != (processes, batch_norm):
        raise ValueError(f"the checkpoint in {str(out)!r} was trained by {then[0]} process(es) with batch norm "
                         f"{then[1]}; it resumes exactly only as it ran: start {then[0]} process(es) "
                         f"(torchrun --nproc-per-node {then[0]}) with the same batch norm (--sync-batchnorm, --bn-groups G or neither), "
                         f"not {processes} with batch norm {batch_norm}")
