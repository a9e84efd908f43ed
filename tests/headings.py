"""The notebooks' headings, and the pointers to them that the README and STUDY_GROUP.md write as
`N → "heading", "heading" (a note); M → "heading"`. Both documents' tests use these two
functions, so a renamed or removed section fails there instead of leaving a dead pointer."""

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def notebook_headings() -> dict[int, set[str]]:
    """{notebook number: the text of every markdown heading in it}, without quotes at either end
    (a pointer quotes each heading, so a heading's own outer quotes can't be told apart there)."""
    headings = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        lines = [line for cell in cells if cell.cell_type == "markdown" for line in cell.source.splitlines()]
        headings[int(path.name[:2])] = {line.lstrip("#").strip().strip('"') for line in lines if line.startswith("#")}
    return headings


def heading_pointers(where: str) -> list[tuple[int, str]]:
    """(notebook number, heading) for every heading named in ``where``, one table cell such as
    `2 → "What "plain" means" (the plain block); 3 → "A", "B"`."""
    pointers = []
    for part in re.split(r";\s*(?=\d+ →)", where.strip()):
        number, headings = re.fullmatch(r"(\d+) → (.*)", part.strip()).groups()
        headings = re.sub(r"\s*\([^\"]*\)$", "", headings)    # a trailing note in parentheses
        for heading in headings.strip('"').split('", "'):
            pointers.append((int(number), heading))
    return pointers
