"""Serving-core benchmark: the continuous-batching Engine under closed-loop load at several concurrencies.

    python -m benchmarks.engine [--model default|small|mini] [--device cpu|cuda] [--concurrency 1 4 16]
                                [--requests 32] [--gen-length 128] [--compile] [--quick]

C clients each keep one request in flight (a new one is submitted as soon as one finishes) until `--requests`
have run, prompts drawn with a fixed seed (held-out Shakespeare lines for the default model, random ids for a
random-weight LLaDA2.0-shaped model). Per concurrency: output tokens/s, tokens per forward (TPF), the mean
step time, and on a GPU the step time against its memory floor (benchmarks/decode.py). Eager and, with
`--compile`, the compiled step (torch.compile(fullgraph=True); CUDA graphs on a GPU). The last line is JSON.
"""
import argparse
import random
import time
from pathlib import Path

import torch

import llada_engine
from benchmarks.decode import SHAPES, step_floor_bytes
from benchmarks.timer import peak_bandwidth, print_json, print_table
from llada_engine.decoding import Engine
from llada_engine.decoding.speed import random_prompts
from llada_engine.model import LLaDA2Config
from llada_engine.model.init import random_model

HELD_OUT = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "valid.txt"


def prompts_for(model_name: str, model, count: int, length: int, seed: int) -> list[list[int]]:
    if model_name != "default":
        return random_prompts(model.config, count, length, seed=seed)
    tokenizer = llada_engine.load_tokenizer("default")
    ids = tokenizer.encode(HELD_OUT.read_text()).ids
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - length) for _ in range(count)]
    return [ids[s:s + length] for s in starts]


def closed_loop(engine: Engine, prompts: list[list[int]], concurrency: int, **kwargs) -> dict:
    """Runs every prompt with `concurrency` in flight; returns tokens, steps and wall time."""
    queue = list(prompts)
    in_flight, finished = [], []
    steps = 0
    begin = time.perf_counter()
    while queue or in_flight:
        while queue and len(in_flight) < concurrency:
            in_flight.append(engine.submit(queue.pop(), **kwargs))
        engine.step()
        steps += 1
        finished += [r for r in in_flight if r.done]
        in_flight = [r for r in in_flight if not r.done]
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    tokens = sum(len(r.result()) for r in finished)
    denoise = sum(r.denoise_steps for r in finished)
    return {"tokens": tokens, "tok_s": tokens / seconds, "TPF": tokens / max(denoise, 1),
            "step_ms": seconds / steps * 1e3, "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default (the embedded model) or a shape: " + ", ".join(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--compile", action="store_true", help="also time the compiled step")
    parser.add_argument("--quick", action="store_true", help="tiny shape, few short requests (a smoke run)")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    name = args.model or ("tiny" if args.quick else "mini" if on_gpu else "default")
    if args.quick:
        args.requests, args.gen_length, args.concurrency = 4, 32, [1, 2]
    if name == "default":
        model = llada_engine.load_model("default", device=args.device)
    else:
        dtype = torch.bfloat16 if on_gpu else torch.float32
        model = random_model(LLaDA2Config(**SHAPES[name]), seed=0, dtype=dtype, device=args.device)
    bandwidth = peak_bandwidth(args.device) if on_gpu else None
    prompts = prompts_for(name, model, args.requests, args.prompt_length, seed=0)
    kwargs = dict(gen_length=args.gen_length, threshold=args.threshold)

    rows = []
    for compiled in [False, True] if args.compile else [False]:
        for concurrency in args.concurrency:
            engine = Engine(model, max_running=max(args.concurrency), compile=compiled,
                            cache_tokens=max(args.concurrency) * (args.prompt_length + args.gen_length + 64))
            closed_loop(engine, prompts[:max(2, concurrency)], concurrency, **kwargs)   # warm-up (and compile)
            row = {"model": name, "compiled": compiled, "concurrency": concurrency}
            row |= closed_loop(engine, prompts, concurrency, **kwargs)
            if on_gpu:
                floor = step_floor_bytes(model, concurrency, args.prompt_length + args.gen_length) / bandwidth
                row |= {"step_floor_ms": floor * 1e3, "frac_floor": floor / (row["step_ms"] / 1e3)}
            rows.append(row)
        base = next(r["tok_s"] for r in rows if r["compiled"] == compiled and r["concurrency"] == args.concurrency[0])
        for r in rows:
            if r["compiled"] == compiled:
                r["vs_c1"] = r["tok_s"] / base
    device_name = torch.cuda.get_device_name() if on_gpu else f"cpu x{torch.get_num_threads()}"
    print(f"engine on {device_name}, model {name}, {str(model.dtype).replace('torch.', '')}, "
          f"{args.requests} requests, prompt {args.prompt_length}, gen {args.gen_length}")
    print_table(rows)
    print_json({"benchmark": "engine", "device": device_name, "model": name, "quick": args.quick,
                "dtype": str(model.dtype).replace("torch.", ""), "rows": rows})


if __name__ == "__main__":
    main()
