"""Every third-party module the package imports (anywhere, also inside functions) is a declared run-time
dependency in pyproject.toml and in requirements.txt, and the two files declare the same run-time
dependencies with the same version bounds (torch only in pyproject.toml: it is installed first, by hand).
A module imported only for an optional feature may instead be an extra of pyproject.toml's
optional-dependencies (e.g. `datasets` for prepare-data from a Hugging Face dataset)."""
import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_FIRST = {"torch"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(line: str) -> tuple[str, str]:
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", line.strip())
    assert match, line
    return normalize(match.group(1)), match.group(2).replace(" ", "")


def declared() -> tuple[dict, dict]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return dict(map(requirement, project)), dict(map(requirement, lines))


def optional_extras() -> set[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    return {requirement(line)[0] for name, lines in extras.items() if name != "test" for line in lines}


def imported_modules() -> dict[str, str]:
    """Top-level module -> a file of llada_engine that imports it, for every module outside the stdlib."""
    found = {}
    for file in sorted((ROOT / "llada_engine").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "llada_engine":
                    found.setdefault(top, str(file.relative_to(ROOT)))
    return found


def test_every_imported_module_is_declared_in_both_files():
    project, requirements = declared()
    distributions = importlib.metadata.packages_distributions()
    modules = imported_modules()
    assert {"torch", "safetensors", "huggingface_hub", "jinja2"} <= set(modules)   # the scan sees them
    optional = optional_extras()
    for module, file in modules.items():
        if normalize(module) in optional:
            continue
        assert module in distributions, f"{file} imports {module}, which no installed distribution provides"
        names = {normalize(d) for d in distributions[module]}
        assert names & set(project), f"{file} imports {module} ({names}): not in pyproject.toml's dependencies"
        if not names & INSTALLED_FIRST:
            assert names & set(requirements), f"{file} imports {module} ({names}): not in requirements.txt"


def test_pyproject_and_requirements_agree():
    project, requirements = declared()
    for name, spec in project.items():
        if name not in INSTALLED_FIRST:
            assert requirements.get(name) == spec, f"{name}{spec} in pyproject.toml, {requirements.get(name)} in " \
                                                   f"requirements.txt"
