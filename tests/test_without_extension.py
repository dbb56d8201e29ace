"""`python -m pytest` in a checkout where the extension was never built: a copy of the package without
llada_engine/_C*.so collects the whole suite (nothing aborts it), skips the tests marked `kernels` with the
one reason, and runs the others."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unbuilt_checkout(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__", "*.pyc")
    shutil.copytree(ROOT / "llada_engine", dest / "llada_engine", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    for file in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / file, dest)
    return dest


# An editable install adds a finder that would still find the built extension of the real checkout: drop it.
NO_INSTALLED_COPY = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                     "if not getattr(f, '__module__', '').startswith('__editable__')]; ")


def python_in(checkout: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_INSTALLED_COPY + code], cwd=checkout,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)


def pytest_in(checkout: Path, *args) -> subprocess.CompletedProcess:
    return python_in(checkout, f"import pytest; sys.exit(pytest.main({['-q', '-p', 'no:cacheprovider', *args]!r}))")


def test_an_unbuilt_checkout_skips_the_kernel_tests_for_one_reason_and_runs_the_rest(tmp_path):
    checkout = unbuilt_checkout(tmp_path)
    probe = python_in(checkout, "import llada_engine; print(llada_engine.__file__, llada_engine.kernels_available())")
    assert probe.stdout.split() == [str(checkout / "llada_engine" / "__init__.py"), "False"], probe.stderr

    collected = pytest_in(checkout, "--collect-only", "tests")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert re.search(r"\d+ tests collected", collected.stdout)

    run = pytest_in(checkout, "-rs", "tests/ops/test_commit_tokens.py", "tests/decoding/test_validation.py",
                    "tests/model/test_model.py", "tests/test_dependencies.py")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    passed, skipped = (int(re.search(rf"(\d+) {word}", summary).group(1)) for word in ("passed", "skipped"))
    assert passed > 50 and skipped > 50, summary
    # (pytest gives no line for a test without parameters skipped by its module's mark)
    reasons = {re.sub(r"^SKIPPED \[\d+\] [^:]+(:\d+)?: ", "", line) for line in run.stdout.splitlines()
               if line.startswith("SKIPPED")}
    assert len(reasons) == 1 and next(iter(reasons)).startswith(
        "needs the compiled kernels: llada_engine._C did not import (No module named 'llada_engine._C')"), reasons
