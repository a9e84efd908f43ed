"""Run scales: how much each notebook trains.

``small`` fits a 2-core CPU (each notebook in about 2 minutes; the test suite runs this);
``large`` is sized for a GPU (notebook 6 trains four nets for 4,000 mini-batches of 128 on
all the data; not yet timed on Colab's T4). The scale is chosen from the
device the package trains on (a CUDA GPU, unless ``ANNOTATED_RESNET_DEVICE=cpu``) and
overridden by the environment variable ``ANNOTATED_RESNET_SCALE``. The paper's
full recipe runs from the command line (``annotated-resnet train``), not in a notebook.
"""

from __future__ import annotations

import os

from ..training.step import choose_device

SCALES = ("small", "large")
SCALE_VARIABLE = "ANNOTATED_RESNET_SCALE"


def run_scale() -> str:
    """``$ANNOTATED_RESNET_SCALE`` if set, else ``large`` when training goes to a CUDA GPU
    (:func:`~annotated_resnet.training.step.choose_device`) and ``small`` otherwise."""
    chosen = os.environ.get(SCALE_VARIABLE, "").strip().lower()
    if chosen and chosen not in SCALES:
        raise ValueError(f"{SCALE_VARIABLE}={chosen!r} is not a run scale; expected one of {SCALES} "
                         f"(or leave it unset to choose by hardware)")
    return chosen or ("large" if choose_device().type == "cuda" else "small")


def at_scale(small, large):
    """Pick the value for the current run scale: ``at_scale(small=200, large=4000)``."""
    return small if run_scale() == "small" else large
