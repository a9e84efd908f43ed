"""The finished CIFAR-10 runs shipped with the package ("reference runs"), which the notebooks
plot beside the paper's Fig. 1, Fig. 6, Fig. 7 and Table 6, and a reader for one's own runs.

Each run is a folder in the format that ``annotated-resnet train`` and ``reproduce``
(:mod:`annotated_resnet.training.results`) write: ``log.jsonl``, ``weights-fp16.pt`` and
``provenance.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..training.checkpoints import LOG_NAME, PROVENANCE_NAME, WEIGHTS_NAME

REFERENCE_RUNS = Path(__file__).resolve().parent

__all__ = ["LOG_NAME", "PROVENANCE_NAME", "REFERENCE_RUNS", "WEIGHTS_NAME", "list_reference_runs",
           "load_reference_run", "longest_reference_run"]


def list_reference_runs(folder: str | os.PathLike | None = None) -> list[str]:
    """Names of the complete runs in ``folder`` (the package's shipped runs by default);
    an empty list when the folder is absent or holds none."""
    folder = Path(folder) if folder is not None else REFERENCE_RUNS
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if all((p / n).is_file() for n in (LOG_NAME, WEIGHTS_NAME, PROVENANCE_NAME)))


def load_reference_run(path: str | os.PathLike) -> tuple[list[dict], dict, dict]:
    """``(history, provenance, state_dict)`` of a finished run: ``path`` is a run folder, or
    the name of a run shipped in ``annotated_resnet/reference_runs/``."""
    folder = Path(path)
    if not folder.is_dir() and not folder.is_absolute() and len(folder.parts) == 1:
        shipped = list_reference_runs()
        if not shipped:
            raise FileNotFoundError(
                f"no reference run {str(path)!r}: this copy of annotated_resnet ships no reference runs "
                f"({REFERENCE_RUNS} is absent or empty). Make them on a GPU with "
                "`annotated-resnet reproduce --runs ... --out DIR` and pass a run folder.")
        if folder.name not in shipped:
            raise FileNotFoundError(f"no reference run {str(path)!r}; shipped runs: {', '.join(shipped)}")
        folder = REFERENCE_RUNS / folder.name
    missing = [n for n in (LOG_NAME, WEIGHTS_NAME, PROVENANCE_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} is not a finished run: {', '.join(missing)} missing "
                                f"(expected {LOG_NAME}, {WEIGHTS_NAME}, {PROVENANCE_NAME})")
    history = [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines() if line.strip()]
    provenance = json.loads((folder / PROVENANCE_NAME).read_text())
    if provenance.get("status") != "finished":
        raise ValueError(f"{str(folder)!r} is not a finished run (status: {provenance.get('status')!r}); "
                         "rerun the command in its provenance to finish it")
    state_dict = torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    return history, provenance, state_dict


def longest_reference_run(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The folder of the shipped run of model ``name`` (e.g. ``"plain56"``) trained for the
    most iterations, searched anywhere under ``folder`` (the package's reference runs by
    default), so a longer run shipped later is picked up without changing the caller."""
    root = Path(folder) if folder is not None else REFERENCE_RUNS
    candidates = []
    for provenance_path in sorted(root.rglob(PROVENANCE_NAME)):
        run = provenance_path.parent
        if all((run / n).is_file() for n in (LOG_NAME, WEIGHTS_NAME)):
            provenance = json.loads(provenance_path.read_text())
            if provenance.get("run") == name and provenance.get("status") == "finished":
                candidates.append((provenance["iterations_done"], str(run)))
    if not candidates:
        raise FileNotFoundError(f"no finished reference run of {name!r} under {str(root)!r}; "
                                f"shipped runs: {', '.join(list_reference_runs(root)) or 'none'}")
    return Path(max(candidates)[1])
