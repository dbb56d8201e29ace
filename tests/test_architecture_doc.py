"""docs/ARCHITECTURE.md is the project's design doc: every reference to it in the code, the tests, the
benchmarks and the build ("docs/ARCHITECTURE.md, <section title>") names a section that exists there, and
nothing refers to a design file that is not in the repository or to sections by number."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
SOURCES = ("llada_engine", "csrc", "bindings", "tests", "benchmarks", "scripts", "configs")
SUFFIXES = {".py", ".cpp", ".cu", ".h", ".cuh", ".sh", ".txt", ".yaml", ".md", ".toml"}
REFERENCE = re.compile(r"docs/ARCHITECTURE\.md,\s+(?:#\s*|//\s*)?([A-Z][A-Za-z -]*[a-z])")
ELSEWHERE = re.compile("DESIGN" + r"\.md|§\s*\d")


def source_files():
    for top in SOURCES:
        yield from (p for p in sorted((ROOT / top).rglob("*")) if p.is_file() and p.suffix in SUFFIXES)
    for name in ("README.md", "setup.py", "CMakeLists.txt", "pyproject.toml"):
        yield ROOT / name


def section_titles() -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", DOC.read_text(), re.MULTILINE)}


def test_every_reference_names_a_section():
    titles = section_titles()
    assert {"Layout", "Block attention", "Mixture of experts", "Token commit", "Model", "Checkpoints", "Decoding",
            "Serving", "Training"} <= titles
    found = 0
    for file in source_files():
        for match in REFERENCE.finditer(file.read_text(errors="replace")):
            found += 1
            assert match.group(1) in titles, f"{file.relative_to(ROOT)} refers to a section " \
                                             f"'{match.group(1)}' that docs/ARCHITECTURE.md does not have"
    assert found >= 30


def test_nothing_refers_to_a_design_file_outside_the_repository():
    for file in [*source_files(), DOC]:
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            assert not ELSEWHERE.search(line), f"{file.relative_to(ROOT)}:{number}: {line.strip()}"
