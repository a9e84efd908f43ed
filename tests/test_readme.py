"""The README's paper map points at headings that exist: every "N → "heading"" in the map is a
heading of notebook N, so a renamed or removed section fails here instead of leaving a dead
pointer."""

import re
from pathlib import Path

import pytest

from headings import heading_pointers, notebook_headings

ROOT = Path(__file__).resolve().parent.parent


def paper_map(readme: str) -> list[tuple[str, int, str]]:
    """(paper part, notebook number, heading) for every pointer in the README's "Paper map"."""
    section = readme.split("## Paper map", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\| .* \| \d+ →", line)]   # not the header
    pointers = []
    for row in rows:
        paper, where = [cell.strip() for cell in row.strip("| ").split(" | ")]
        pointers += [(paper, number, heading) for number, heading in heading_pointers(where)]
    return pointers


def test_the_parser_reads_headings_with_quotes_and_notes():
    readme = ('## Paper map\n\n| paper | notebook → heading |\n|---|---|\n'
              '| Fig. 2 | 2 → "What "plain" means" (the plain block); 3 → "A", "B" |\n\n## Next\n')
    assert paper_map(readme) == [("Fig. 2", 2, 'What "plain" means'), ("Fig. 2", 3, "A"), ("Fig. 2", 3, "B")]


POINTERS = paper_map((ROOT / "README.md").read_text())


def test_the_map_has_rows_for_every_notebook():
    assert {number for _, number, _ in POINTERS} == set(notebook_headings())


@pytest.mark.parametrize("paper, number, heading", POINTERS, ids=[f"{p}-{n}-{h[:30]}" for p, n, h in POINTERS])
def test_every_heading_in_the_paper_map_exists(paper, number, heading):
    headings = notebook_headings()
    assert heading.strip('"') in headings[number], (
        f"README paper map, {paper}: notebook {number} has no heading {heading!r}; its headings are "
        f"{sorted(headings[number])}")
