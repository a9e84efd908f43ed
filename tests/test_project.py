"""The project's own files: pyproject.toml and environment.yml describe one environment."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}  # conda-forge's name for the same package


def _split(requirement: str) -> tuple[str, str]:
    name, bound = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", requirement).groups()
    return name.lower(), bound.replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return dict(_split(r) for r in requirements)


def environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str) and not d.startswith(("python", "pip"))]
    return {CONDA_TO_PIP.get(name, name): bound for name, bound in map(_split, conda)}


def test_environment_yml_and_pyproject_name_the_same_packages_and_bounds():
    assert environment_requirements() == pyproject_requirements()


def test_environment_yml_installs_the_package_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["-e ."]


def test_ci_runs_exactly_the_readme_test_command():
    """The README's test command is `make test`, which runs `pytest --nbval tests notebooks`;
    CI runs that same target."""
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "-m pytest --nbval tests notebooks" in recipe
    assert "`make test` runs `pytest --nbval tests notebooks`" in readme
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in ci_commands


def test_readme_badge_is_built_from_the_one_place_that_names_the_repository():
    import importlib.util

    spec = importlib.util.spec_from_file_location("colab", ROOT / "tools" / "colab.py")
    colab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab)
    assert colab.badge_source("01_abstract.ipynb") in (ROOT / "README.md").read_text()
