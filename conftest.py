"""Shared test set-up: the scale and device the notebooks are compared at, and where the
CIFAR-10 archive is, for tests and notebooks alike."""

import os
from pathlib import Path

import pytest

DATA_VARIABLE = "ANNOTATED_RESNET_CIFAR10"
SHARED_ARCHIVE = Path(__file__).resolve().parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

# Notebooks run in kernels started by nbval, which inherit this process's environment: they
# find the archive through the same variable a user sets to point at a local copy.
if DATA_VARIABLE not in os.environ and SHARED_ARCHIVE.exists():
    os.environ[DATA_VARIABLE] = str(SHARED_ARCHIVE)

# The committed outputs are those of the small scale on the CPU, so the suite runs the notebooks
# there whatever the machine has; on a GPU machine that only leaves the GPU idle. Setting
# ANNOTATED_RESNET_SCALE yourself (e.g. =large, with --nbval-lax) runs them as you choose.
if "ANNOTATED_RESNET_SCALE" not in os.environ:
    os.environ["ANNOTATED_RESNET_SCALE"] = "small"
    os.environ.setdefault("ANNOTATED_RESNET_DEVICE", "cpu")


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    """The JPEG CIFAR-10 archive (``$ANNOTATED_RESNET_CIFAR10`` or ``../shared/data``), or skip."""
    path = Path(os.environ.get(DATA_VARIABLE, SHARED_ARCHIVE))
    if not path.exists():
        pytest.skip(f"no CIFAR-10 archive: set {DATA_VARIABLE} or place one at {SHARED_ARCHIVE}")
    return path
