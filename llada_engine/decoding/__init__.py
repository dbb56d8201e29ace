"""Block-diffusion decoding: generate() with a KV cache, batches and streaming."""
from .generate import GenerateOutput, GenerateStats, generate
from .kv_cache import KVCache
from .schedule import min_commit_schedule

__all__ = ["GenerateOutput", "GenerateStats", "KVCache", "generate", "min_commit_schedule"]
