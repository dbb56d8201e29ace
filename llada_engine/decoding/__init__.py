"""Block-diffusion decoding: the continuous-batching Engine over a paged KV cache, and generate() on top."""
from .engine import Engine
from .generate import GenerateOutput, generate
from .paged_cache import PagedKVCache
from .request import Request, RequestError
from .schedule import min_commit_schedule
from .stats import GenerateStats

__all__ = ["Engine", "GenerateOutput", "GenerateStats", "PagedKVCache", "Request", "RequestError", "generate",
           "min_commit_schedule"]
