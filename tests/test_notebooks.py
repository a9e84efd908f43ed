"""Every notebook opens in Colab and stands alone: the badge and setup cell that
``tools/colab.py`` builds come first, no cell reaches into the repository checkout, and each
notebook ends with a questionnaire and "going further" exercises, under headings that stand
alone. One notebook is also run from a folder outside the repository to prove it needs nothing
but the installed package."""

import importlib.util
import re
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# What a cell must not contain: a path into the checkout, or an import that only works there.
REPO_ONLY = {
    "a relative path out of the notebooks folder": re.compile(r"\.\./"),
    "a path into the package sources": re.compile(r"\bsrc/"),
    "a change of the import path": re.compile(r"\bsys\.path\b"),
    "a path into the repository": re.compile(r"""["'](?:\./)?(?:notebooks|tools|tests|src)/"""),
    "an import of the repository's tools": re.compile(r"^\s*(?:from|import)\s+(?:tools|tests|src)\b", re.M),
    "a relative file opened": re.compile(r"""\bopen\(\s*["'](?![/~])"""),
}


def load_colab_tool():
    spec = importlib.util.spec_from_file_location("colab", ROOT / "tools" / "colab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path):
    return nbformat.read(path, as_version=4)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_two_cells_are_the_colab_badge_and_setup(path):
    colab = load_colab_tool()
    cells = read(path).cells
    assert cells[0].cell_type == "markdown" and cells[0].source == colab.badge_source(path.name), \
        f"run `python tools/colab.py notebooks/{path.name}`"
    assert cells[1].cell_type == "code" and cells[1].source == colab.setup_source(), \
        f"run `python tools/colab.py notebooks/{path.name}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_cell_depends_on_the_repository_checkout(path):
    for index, cell in enumerate(read(path).cells[2:], start=2):
        if cell.cell_type != "code":
            continue
        for what, pattern in REPO_ONLY.items():
            assert not pattern.search(cell.source), f"{path.name}, cell {index}: {what}:\n{cell.source}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ends_with_a_questionnaire_and_going_further(path):
    headings = [line.strip("# ").lower() for cell in read(path).cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("#")]
    assert any(h.startswith("questionnaire") for h in headings), f"{path.name} has no Questionnaire heading"
    assert headings[-1].startswith("going further"), f"{path.name} must end with a 'Going further' section"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_heading_stands_alone_in_its_cell(path):
    """Folding a heading in JupyterLab or Colab hides the cells below it, not the rest of the heading's
    own cell: a heading alone in its cell lets a study group fold away what a question gives away."""
    for index, cell in enumerate(read(path).cells):
        lines = [line for line in cell.source.splitlines() if line.strip()]
        if cell.cell_type == "markdown" and any(line.startswith("#") for line in lines):
            assert len(lines) == 1, f"{path.name}, cell {index}: a heading shares its cell:\n{cell.source[:200]}"


def test_a_notebook_runs_outside_the_repository(tmp_path):
    """Notebook 1 (the cheapest) copied to an empty folder and executed there."""
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "01_abstract.ipynb"
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    notebook = read(copy)
    # raises CellExecutionError, with the cell and its traceback, if any cell fails
    NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert all(c.execution_count for c in notebook.cells if c.cell_type == "code")
