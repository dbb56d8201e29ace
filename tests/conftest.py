"""Shared pytest setup: GPU tests are marked `gpu` and skipped without a CUDA device; the helper modules
beside this file (op_testing.py) are importable from every test folder."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import llada_engine  # noqa: E402

if not llada_engine.kernels_available():
    pytest.exit(
        f"llada_engine at {Path(llada_engine.__file__).parent} has no compiled kernels. Build it first "
        "(see the README's test command: `pip install --no-build-isolation -e .`).",
        returncode=2,
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
