"""The package imports, reports what it was built with, and the CLI prints it."""
import subprocess
import sys

import llada_engine


def test_build_info_fields():
    info = llada_engine.build_info()
    assert info["version"] == llada_engine.__version__
    assert info["native_extension"] is True
    assert isinstance(info["cuda_kernels"], bool)
    assert info["torch_version"].split("+")[0] == info["runtime_torch_version"].split("+")[0]
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and info["cutlass_version"]


def test_cli_info_prints_build_info():
    out = subprocess.run([sys.executable, "-m", "llada_engine.cli", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert f"llada_engine {llada_engine.__version__}" in out
    assert "cuda_kernels" in out and "torch_version" in out
