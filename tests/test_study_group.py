"""STUDY_GROUP.md, the host's guide, stays true to the notebooks and the package: every heading it
names exists, its Colab links are the notebooks' own badges, the cells it tells the host to
start early are the ones that train, and the commands, variables, versions and error message it
quotes are the ones the project has. The README's first screen links to it."""

import importlib.util
import re
import tomllib
from pathlib import Path

import nbformat
import pytest

from headings import heading_pointers, notebook_headings

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "STUDY_GROUP.md").read_text()


def guide_pointers(guide: str) -> list[tuple[int, str]]:
    """(notebook number, heading) for every pointer in the guide. A pointer runs from `N →` to the
    end of its table cell, or of its line outside a table."""
    pointers = []
    for line in guide.splitlines():
        for piece in line.strip("| ").split(" | ") if line.startswith("|") else [line]:
            found = re.search(r"(?<![\w.])(\d+ → .*)$", piece)
            if found:
                pointers += heading_pointers(found.group(1))
    return pointers


def test_the_guide_parser_reads_cells_and_line_ends():
    guide = ('| 2 | ask | 3 → "A", "B (x)"; 5 → "C" |\n'
             '- Slow cells: 2 → "What "plain" means"; 6 → "D"\n')
    assert guide_pointers(guide) == [(3, "A"), (3, "B (x)"), (5, "C"), (2, 'What "plain" means'), (6, "D")]


POINTERS = guide_pointers(GUIDE)
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six"]


def test_every_arrow_in_the_guide_is_a_pointer_that_is_checked():
    """A `N →` written where the parser does not look would escape the heading check below."""
    assert len(re.findall(r"\d+ →", GUIDE)) == GUIDE.count("→")
    parsed = sum(len(re.findall(r"\d+ →", found)) for line in GUIDE.splitlines()
                 for found in re.findall(r"(?<![\w.])\d+ → .*", line))
    assert parsed == GUIDE.count("→") and POINTERS


@pytest.mark.parametrize("number, heading", POINTERS, ids=[f"{n}-{h[:30]}" for n, h in POINTERS])
def test_every_heading_the_guide_names_exists(number, heading):
    headings = notebook_headings()
    assert heading in headings.get(number, set()), (
        f"STUDY_GROUP.md: notebook {number} has no heading {heading!r}; its headings are "
        f"{sorted(headings.get(number, []))}")


def test_every_notebook_has_an_evening_a_link_and_its_colab_badge():
    spec = importlib.util.spec_from_file_location("colab", ROOT / "tools" / "colab.py")
    colab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    badges = {re.search(r"\]\((https://colab[^)]+)\)$", colab.badge_source(p.name)).group(1) for p in notebooks}
    assert set(re.findall(r"\((https://colab\.research\.google\.com/github/[^)]+)\)", GUIDE)) == badges
    assert set(re.findall(r"\]\((notebooks/[^)#]+)\)", GUIDE)) == {f"notebooks/{p.name}" for p in notebooks}


def test_the_slow_cells_are_the_cells_that_train():
    """The guide's "Slow cells" are the headings under which a code cell calls `train(`."""
    training = set()
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        heading = None
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                heading = next((line.lstrip("#").strip() for line in reversed(cell.source.splitlines())
                                if line.startswith("#")), heading)
            elif re.search(r"(?<![\w.])train\(", cell.source):
                training.add((int(path.name[:2]), heading))
    slow = next(line for line in GUIDE.splitlines() if line.startswith("- Slow cells: "))
    assert set(guide_pointers(slow)) == training and training
    phrase = ("One cell is slow enough to start early: it trains" if len(training) == 1
              else f"{NUMBER_WORDS[len(training)].capitalize()} cells are slow enough to start early: they train")
    assert phrase in GUIDE.replace("\n", " ")


def test_the_notebooks_that_train_longer_on_a_gpu_are_those_with_slow_cells():
    """The guide says the large scale changes only the notebooks whose slow cells it lists."""
    scaled = {int(path.name[:2]) for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
              if any(cell.cell_type == "code" and "at_scale(" in cell.source
                     for cell in nbformat.read(path, as_version=4).cells)}
    slow = next(line for line in GUIDE.splitlines() if line.startswith("- Slow cells: "))
    assert scaled == {number for number, _ in guide_pointers(slow)}
    words = GUIDE.replace("\n  ", " ").replace("\n", " ")
    phrase = (f"notebook {min(scaled)}'s slow cell trains longer" if len(scaled) == 1
              else "notebooks " + " and ".join(map(str, sorted(scaled))) + " train their slow cells longer")
    assert phrase in words


def test_commands_variables_and_versions_are_the_projects():
    from annotated_resnet import data
    from annotated_resnet.course import scale

    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert set(re.findall(r"`make (\w+)`", GUIDE)) <= targets and "`make lab`" in GUIDE
    assert set(re.findall(r"ANNOTATED_RESNET_\w+", GUIDE)) == {data.SOURCE_VARIABLE, scale.SCALE_VARIABLE}
    assert set(re.findall(rf"{scale.SCALE_VARIABLE}=(\w+)", GUIDE)) <= set(scale.SCALES)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_minimum = next(re.fullmatch(r"torch>=([\d.]+)", d).group(1) for d in project["dependencies"]
                         if d.startswith("torch>="))
    assert f"torch {torch_minimum} or newer" in GUIDE
    assert f"Python {project['requires-python'].removeprefix('>=')} or newer" in GUIDE


def test_the_quoted_download_error_is_the_one_a_blocked_download_gives(monkeypatch, tmp_path):
    from annotated_resnet import data

    def blocked(*args, **kwargs):
        raise OSError("network unreachable")

    quoted = re.search(r"`(could not download CIFAR-10 into [^`]+)`", GUIDE).group(1)
    monkeypatch.delenv(data.SOURCE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", blocked)
    with pytest.raises(RuntimeError) as error:
        data.load_cifar10()
    assert str(error.value).startswith(quoted) and data.SOURCE_VARIABLE in str(error.value)


def test_the_readme_links_the_guide_on_its_first_screen():
    readme = (ROOT / "README.md").read_text()
    assert "(STUDY_GROUP.md)" in readme.split("\n## ", 1)[0]


def colab_repository() -> str:
    """owner/name of the repository that the notebooks' Colab badges open."""
    spec = importlib.util.spec_from_file_location("colab", ROOT / "tools" / "colab.py")
    colab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab)
    badge = colab.badge_source("01_abstract.ipynb")
    return re.search(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/", badge).group(1)


def test_the_participants_commands_are_the_projects():
    """The clone and zip addresses are the badges' repository, the conda environment is
    environment.yml's, the pip extra exists, and the fastai minimum is pyproject.toml's."""
    repository = colab_repository()
    assert f"git clone https://github.com/{repository}.git" in GUIDE
    assert {f"https://github.com/{found}" for found in re.findall(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git|/archive/)",
                                                                  GUIDE)} == {f"https://github.com/{repository}"}

    environment = (ROOT / "environment.yml").read_text()
    name = re.search(r"^name: (\S+)$", environment, re.M).group(1)
    assert "conda env create -f environment.yml" in GUIDE
    assert set(re.findall(r"conda (?:activate|env remove -n) ([\w-]+)", GUIDE)) == {name}

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.findall(r'pip install -e "\.\[([\w,]+)\]"', GUIDE)
    assert extras and all(set(e.split(",")) <= set(project["optional-dependencies"]) for e in extras)
    fastai_minimum = next(re.fullmatch(r"fastai>=([\d.]+)", d).group(1) for d in project["dependencies"]
                          if d.startswith("fastai>="))
    assert f"fastai {fastai_minimum} or newer" in GUIDE


def test_the_drive_command_says_what_it_leaves_out():
    """A `reproduce` command in the guide whose paper sets omit ResNet-1202 says so, and how to add it."""
    from annotated_resnet.cli import PAPER_SETS

    commands = re.findall(r"annotated-resnet reproduce ([\w ]+?) --out", GUIDE)
    assert commands
    for sets in commands:
        runs = set().union(*(PAPER_SETS[name] for name in sets.split()))
        if "resnet1202" not in runs:
            words = GUIDE.replace("\n", " ")
            assert "This command leaves out ResNet-1202" in words and "`--runs resnet1202`" in words


def test_the_guide_says_how_each_notebook_hides_its_answers():
    """Notebooks keep their questionnaire answers in a collapsed block or under an "Answers"
    heading; the participants' section names which notebooks do which."""
    collapsed, headed = set(), set()
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        markdown = [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "markdown"]
        if any("<summary><b>Answers</b>" in source for source in markdown):
            collapsed.add(int(path.name[:2]))
        elif any(line.strip() == "## Answers" for source in markdown for line in source.splitlines()):
            headed.add(int(path.name[:2]))
    assert collapsed | headed == set(range(1, len(collapsed | headed) + 1)) and collapsed | headed

    def span(numbers):
        assert numbers == set(range(min(numbers), max(numbers) + 1)), f"not a run of notebooks: {sorted(numbers)}"
        return f"notebooks {min(numbers)} to {max(numbers)}"

    words = GUIDE.replace("\n", " ")
    if collapsed:
        assert f'in {span(collapsed)} inside a collapsed "Answers" block' in words
    if headed:
        assert f'in {span(headed)} under an "Answers" heading' in words
