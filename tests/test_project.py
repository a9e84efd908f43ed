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


def test_ci_runs_the_other_kernels_and_the_oldest_releases_too():
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test-kernels" in ci_commands and "make test-oldest" in ci_commands
    makefile = (ROOT / "Makefile").read_text()
    kernels = re.search(r"^test-kernels:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    lines = kernels.splitlines()
    assert any("ATEN_CPU_CAPABILITY=avx2" in line and "--nbval notebooks" in line for line in lines)
    assert any("ATEN_CPU_CAPABILITY=default" in line and "--nbval notebooks" in line for line in lines)


def test_the_oldest_releases_tested_are_pyprojects_lower_bounds():
    pinned = dict(line.split("==") for line in (ROOT / ".ci" / "oldest-versions.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    bounds = pyproject_requirements()
    assert {"torch", "torchvision", "fastai"} <= pinned.keys()
    for name, version in ((name, pinned[name]) for name in ("torch", "torchvision", "fastai")):
        floor = bounds[name].removeprefix(">=")
        assert version.split(".")[:len(floor.split("."))] == floor.split(".") or version == floor, (name, version)


def test_readme_badge_is_built_from_the_one_place_that_names_the_repository():
    import importlib.util

    spec = importlib.util.spec_from_file_location("colab", ROOT / "tools" / "colab.py")
    colab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab)
    assert colab.badge_source("01_abstract.ipynb") in (ROOT / "README.md").read_text()


# --- The package's layout: networks, then training, then the shipped runs, then the course ---

PACKAGE = ROOT / "src" / "annotated_resnet"
PART_ORDER = ["networks", "training", "reference_runs", "course", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """Which part of the package a module belongs to (``annotated_resnet.training.step`` -> training)."""
    inner = module.split(".")[1:]
    if not inner or inner[0] in ("model", "architecture", "data"):
        return "networks"
    return inner[0]


def package_imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (at any depth of its code)."""
    import ast

    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    imports = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    found.add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        imports[name] = {m for m in found if m in modules and m != name}
    return imports


def test_every_module_belongs_to_a_known_part():
    assert {part_of(m) for m in package_imports()} == set(PART_ORDER)


def test_no_module_imports_from_a_part_above_its_own():
    rank = {part: i for i, part in enumerate(PART_ORDER)}
    upward = [(m, t) for m, targets in package_imports().items() for t in targets
              if rank[part_of(t)] > rank[part_of(m)]]
    assert upward == []


def test_the_package_has_no_import_circle():
    imports = package_imports()
    # a package's __init__ is imported by its own modules' import machinery, not by their code
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in imports.items()}
    finished, visiting = set(), []

    def visit(module):
        if module in visiting:
            raise AssertionError("import circle: " + " -> ".join(visiting[visiting.index(module):] + [module]))
        if module not in finished:
            visiting.append(module)
            for target in sorted(graph[module]):
                visit(target)
            visiting.pop()
            finished.add(module)

    for module in sorted(graph):
        visit(module)
