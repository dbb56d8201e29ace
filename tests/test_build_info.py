"""The package imports, reports what it was built with, and the CLI prints it; the extension runs on the
shared C++ runtime that torch uses."""
import shutil
import subprocess
import sys

import pytest
import torch

import llada_engine


@pytest.mark.kernels
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


@pytest.mark.kernels
def test_error_messages_keep_their_numbers():
    # An extension carrying its own static libstdc++ formats integers through a second iostreams runtime
    # that does not know torch's locale: the number goes missing (seen on the CPU) or the call crashes.
    q, cu = torch.randn(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_size must be >= 1, got -3$"):
        torch.ops.llada.block_attention_fwd(q, q, q, cu, cu, 4, 4, block_size=-3, mask="block_causal",
                                            softmax_scale=1.0)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section with readelf")
@pytest.mark.kernels
def test_extension_links_the_shared_cxx_runtime():
    dynamic = subprocess.run(["readelf", "-d", llada_engine._C.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert "[libstdc++.so" in dynamic
