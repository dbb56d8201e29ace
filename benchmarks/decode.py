"""End-to-end decoding benchmark: generate() with and without the KV cache on a random-weight model.

    python -m benchmarks.decode [--shape tiny|small|mini] [--device cpu|cuda] [--batch 1 16] [--gen-length 256]
    torchrun --nproc_per_node N -m benchmarks.decode --parallel tp [...]

Reports tokens/s, tokens per forward (TPF) and the latency of one denoising step for the cached and the
uncached path, checks that both give identical tokens, and on a GPU the cached step latency against its
memory floor (bytes of the dense weights, of the experts a step touches and of the KV cache read, over the
copy bandwidth measured in the same run). Random weights give near-uniform logits, so every step commits the
scheduled minimum (TPF about 1): the speeds are per-step speeds. The last line printed is JSON.

--parallel tp runs the model tensor- and expert-parallel over torchrun's N processes (rank 0 saves the random
model to a temporary folder and each rank reads its part of it; with --model DIR its part of that checkpoint)
and adds each rank's memory: its parameter bytes and the replicated part of them, and on a GPU the peak
allocated while decoding (on the CPU the resident set after it and its peak).
On the CPU the ranks share one machine's cores and memory bandwidth: the numbers show the cost of the
collectives, not a speed-up.
"""
import argparse
import resource
import shutil
import tempfile

import torch
import torch.distributed as dist

from benchmarks.timer import peak_bandwidth, print_json, print_table
from llada_engine import load_model, parallel
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
    parser.add_argument("--parallel", choices=["tp"], default=None, help="tensor/expert-parallel under torchrun")
    parser.add_argument("--model", default=None, help="a checkpoint folder instead of random weights")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    shape = args.shape or ("tiny" if args.quick else "mini" if on_gpu else "small")
    gen_length = 32 if args.quick else args.gen_length
    batches = [1, 2] if args.quick else args.batch
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.parallel:
        args.device = str(parallel.start(args.device))
    model = build_model(args, shape, dtype)
    config = model.config
    bandwidth = peak_bandwidth(args.device) if on_gpu else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(args.device)

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
    record = {"benchmark": "decode", "device": device_name, "shape": shape, "quick": args.quick, "rows": rows}
    if args.parallel:
        memory = [None] * dist.get_world_size()
        dist.all_gather_object(memory, rank_memory(model, args.device))
        record |= {"parallel": args.parallel, "ranks": len(memory), "rank_memory": memory}
        main = parallel.is_main()
        parallel.stop()
        if not main:
            return
    print(f"decode on {device_name}, shape {shape}, {str(dtype).replace('torch.', '')}"
          + (f", {args.parallel} over {record['ranks']} ranks" if args.parallel else ""))
    print_table(rows)
    print_table(record.get("rank_memory", []))
    print_json(record)


def build_model(args, shape: str, dtype: torch.dtype):
    if args.model is not None:
        return load_model(args.model, dtype=dtype, device=args.device, parallel=args.parallel)
    model = random_model(LLaDA2Config(**SHAPES[shape]), seed=0, dtype=dtype,
                         device="cpu" if args.parallel else args.device)
    if args.parallel is None:
        return model
    # Rank 0 saves the random model; every rank reads its part of it, as from a real checkpoint, so that
    # its memory is what a rank of a real run holds.
    folder = [tempfile.mkdtemp(prefix="decode-tp-") if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        model.save_pretrained(folder[0])
    del model
    dist.broadcast_object_list(folder)
    try:
        return load_model(folder[0], dtype=dtype, device=args.device, parallel=args.parallel)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(folder[0])


def rank_memory(model, device: str) -> dict:
    """This rank's parameter bytes (and the replicated part), and its peak GPU memory or CPU resident set."""
    sizes = parallel.parameter_bytes(model)
    row = {"rank": dist.get_rank(), "param_MB": sizes["bytes"] / 2**20, "replicated_MB": sizes["replicated_bytes"] / 2**20}
    if device.startswith("cuda"):
        row["peak_allocated_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["rss_MB"] = _resident_bytes() / 2**20
        row["max_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return row


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


if __name__ == "__main__":
    main()
