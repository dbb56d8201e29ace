"""End-to-end decoding benchmark: generate() with and without the KV cache on a random-weight model.

    python -m benchmarks.decode [--shape tiny|small|mini] [--device cpu|cuda] [--batch 1 16] [--gen-length 256]

Reports tokens/s, tokens per forward (TPF) and the latency of one denoising step for the cached and the
uncached path, checks that both give identical tokens, and on a GPU the cached step latency against its
memory floor (bytes of the dense weights, of the experts a step touches and of the KV cache read, over the
copy bandwidth measured in the same run). Random weights give near-uniform logits, so every step commits the
scheduled minimum (TPF about 1): the speeds are per-step speeds. The last line printed is JSON.
"""
import argparse

import torch

from benchmarks.timer import peak_bandwidth, print_json, print_table
from llada_engine.decoding.speed import random_prompts, speed_row
from llada_engine.model import LLaDA2Config
from llada_engine.model.init import random_model

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                 moe_intermediate_size=64, mask_token_id=511, eos_token_id=510, pad_token_id=510),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=8,
                  n_group=8, topk_group=4, moe_intermediate_size=128, mask_token_id=4095, eos_token_id=4094,
                  pad_token_id=4094),
    "mini": {},  # the LLaDA2.0-mini shape (the config defaults)
}


def step_floor_bytes(model, batch: int, context: int) -> float:
    """Bytes one cached denoising step must read: dense weights, the experts it can touch, the KV cache."""
    cfg = model.config
    size = model.dtype.itemsize
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("mlp.w13") or name.endswith("mlp.w2"):
            touched = min(cfg.num_experts, batch * 32 * cfg.num_experts_per_tok)
            total += p.numel() // p.shape[0] * touched * size
        elif not name.endswith("word_embeddings.weight"):
            total += p.numel() * size
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * cfg.head_dim * size
    return total + kv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny shape, short generation (a smoke run)")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    shape = args.shape or ("tiny" if args.quick else "mini" if on_gpu else "small")
    gen_length = 32 if args.quick else args.gen_length
    batches = [1, 2] if args.quick else args.batch
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = LLaDA2Config(**SHAPES[shape])
    model = random_model(config, seed=0, dtype=dtype, device=args.device)
    bandwidth = peak_bandwidth(args.device) if on_gpu else None

    rows = []
    for batch in batches:
        prompts = random_prompts(config, batch, args.prompt_length)
        row = {"shape": shape} | speed_row(model, prompts, gen_length=gen_length)
        if on_gpu:
            floor = step_floor_bytes(model, batch, args.prompt_length + gen_length) / bandwidth
            row["step_floor_ms"] = floor * 1e3
            row["frac_floor"] = floor / (row["cached_step_ms"] / 1e3)
        rows.append(row)
    device_name = torch.cuda.get_device_name() if on_gpu else f"cpu x{torch.get_num_threads()}"
    print(f"decode on {device_name}, shape {shape}, {str(dtype).replace('torch.', '')}")
    print_table(rows)
    print_json({"benchmark": "decode", "device": device_name, "shape": shape, "quick": args.quick, "rows": rows})


if __name__ == "__main__":
    main()
