"""The Colab badge and setup cell of every notebook, built from one place.

A fork changes ``GITHUB_REPO`` (and ``BRANCH``) here, then runs

    python tools/colab.py notebooks/*.ipynb

which rewrites the first two cells of each notebook: the badge (markdown) and the setup cell
(code). ``tests/test_notebooks.py`` fails if a notebook's cells differ from what this file
builds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

GITHUB_REPO = "annotated-resnet/annotated-resnet"
BRANCH = "main"

BADGE_TAG = "colab-badge"
SETUP_TAG = "colab-setup"


def badge_source(notebook: str) -> str:
    """Markdown for the "Open in Colab" badge of ``notebooks/<notebook>``."""
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def setup_source() -> str:
    """The first code cell: installs the course package in Colab, does nothing elsewhere."""
    return (
        "# In Colab: install the course's package from GitHub. Elsewhere this cell does nothing.\n"
        "import sys\n"
        "if \"google.colab\" in sys.modules:\n"
        f"    %pip install -q \"annotated-resnet @ git+https://github.com/{GITHUB_REPO}@{BRANCH}\""
    )


def stamp(path: Path) -> None:
    """Make the first two cells of the notebook at ``path`` the badge and the setup cell."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if not set(c.metadata.get("tags", [])) & {BADGE_TAG, SETUP_TAG}]
    badge = nbformat.v4.new_markdown_cell(badge_source(path.name), metadata={"tags": [BADGE_TAG]})
    setup = nbformat.v4.new_code_cell(setup_source(), metadata={"tags": [SETUP_TAG]})
    nb.cells = [badge, setup] + cells
    nbformat.write(nb, path)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        stamp(Path(name))
