"""Shared pytest setup; the helper modules beside this file (op_testing.py, model_testing.py) are importable
from every test folder.

- `gpu` tests need a CUDA device and are skipped without one.
- `kernels` tests need the compiled extension llada_engine._C (a test parametrized with backend="kernels"
  is one too). In a checkout where it is not built they are skipped, all for the same reason, and every other
  test runs. Where it is built, every test NOT marked `kernels` runs with the kernels hidden, so a test that
  needs them but lacks the mark fails here, not only in an unbuilt checkout.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from llada_engine import _extension  # noqa: E402

BUILT = _extension.kernels_available()
NOT_BUILT = (f"needs the compiled kernels: llada_engine._C did not import ({_extension._IMPORT_ERROR}); build them "
             f"with `pip install --no-build-isolation -e .`")


def needs_kernels(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "kernels" in item.keywords or "gpu" in item.keywords or params.get("backend") == "kernels"


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if needs_kernels(item) and not BUILT:
            item.add_marker(pytest.mark.skip(reason=NOT_BUILT))
        elif "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _kernels_only_where_marked(request, monkeypatch):
    if BUILT and not needs_kernels(request.node):
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setattr(_extension, "_IMPORT_ERROR", "hidden from this test: mark it `kernels` if it needs them")
