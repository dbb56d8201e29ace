"""llada_engine: kernels and a small engine for LLaDA2.0-style block-diffusion language models.

    import llada_engine
    llada_engine.build_info()          # what the native extension was built with
    llada_engine.ops.commit_tokens(...)  # the ops, each with its pure-PyTorch reference beside it
    model = llada_engine.load_model(path)                  # an official LLaDA2.0 checkpoint
    llada_engine.generate(model, prompt_ids).sequences     # block-diffusion decoding with a KV cache
    engine = llada_engine.Engine(model); engine.submit(prompt_ids)   # continuous batching, paged KV cache

The native kernels are registered as `torch.ops.llada.*` by the extension `llada_engine._C`; the
package imports without it, and then every op's reference still works.
"""
import torch  # noqa: F401  (the extension links against libtorch: torch must be loaded first)

from . import ops
from ._extension import build_info, kernels_available
from .decoding import Engine, GenerateOutput, Request, generate
from .model import LLaDA2Config, LLaDA2Model, load_model, load_tokenizer
from .version import __version__

__all__ = ["Engine", "GenerateOutput", "Request", "LLaDA2Config", "LLaDA2Model", "__version__", "build_info", "generate",
           "kernels_available", "load_model", "load_tokenizer", "ops"]
