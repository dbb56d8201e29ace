"""HTTP serving benchmark: `llada-engine serve` under load from C concurrent clients.

    python -m benchmarks.serve [--concurrency 1 4 16] [--requests 32] [--gen-length 64] [--dtype auto]
                               [--device cpu] [--quick]

Starts the server in a subprocess on a free port of 127.0.0.1 with the embedded default model. Per concurrency
C it sends `--requests` streamed completions: prompts are held-out Shakespeare passages of seeded random lengths,
request i arrives at a seeded Poisson time (mean gap `--arrival-gap`), and C clients take the requests in
arrival order, each sending its next one once that has arrived and the client's previous one has ended.
Reported per C: requests/s, output tokens/s (usage.completion_tokens over the wall time), time to first block
(the first chunk with text) and end-to-end latency, p50 and p99, and tokens/s against C = 1. Then the server's
overhead (HTTP, JSON, detokenisation, the event loop): the same requests run one at a time on an Engine in this
process, with the server's settings, give the engine's own time per request, set against the HTTP end-to-end
latency at C = 1. The last line is JSON.
"""
import argparse
import asyncio
import json
import queue
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

import llada_engine
from benchmarks.timer import print_json, print_table

HELD_OUT = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "valid.txt"
START_TIMEOUT = 300
REQUEST_TIMEOUT = 600


def workload(count: int, min_length: int, max_length: int, gap: float, seed: int) -> list[tuple[float, list[int]]]:
    """(arrival time in s, prompt ids) of each request: held-out passages of seeded lengths, Poisson arrivals."""
    ids = llada_engine.load_tokenizer("default").encode(HELD_OUT.read_text()).ids
    rng = random.Random(seed)
    arrival, out = 0.0, []
    for _ in range(count):
        length = rng.randint(min_length, max_length)
        start = rng.randrange(len(ids) - length)
        out.append((arrival, ids[start:start + length]))
        arrival += rng.expovariate(1 / gap) if gap > 0 else 0.0
    return out


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "llada_engine.cli", "serve", "--model", "default", "--host", "127.0.0.1",
               "--port", "0", "--max-running", str(max(args.concurrency)), "--block-length", str(args.block_length),
               "--dtype", args.dtype, "--log-level", "warning"] + (["--device", args.device] if args.device else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"the server did not listen within {START_TIMEOUT} s") from None
            if line is None:
                raise RuntimeError(f"the server exited with {proc.wait()}")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
            if found:
                return proc, found.group(1)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], args) -> dict:
    body = {"model": "default", "prompt": prompt, "max_tokens": args.gen_length, "threshold": args.threshold,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, tokens = None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return {"latency": ended - sent, "first_block": (first or ended) - sent, "tokens": tokens}


async def run_load(url: str, work: list[tuple[float, list[int]]], concurrency: int, args) -> tuple[dict, list]:
    """Sends every request of `work` from `concurrency` clients; returns the row and the per-request results."""
    pending = list(enumerate(work))
    results = [None] * len(work)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:
        begin = time.perf_counter()

        async def client_loop() -> None:
            while pending:
                i, (arrival, prompt) = pending.pop(0)
                await asyncio.sleep(max(0.0, begin + arrival - time.perf_counter()))
                results[i] = await one_request(client, url, prompt, args)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - begin
    latency = np.array([r["latency"] for r in results])
    first = np.array([r["first_block"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    row = {"concurrency": concurrency, "requests": len(work), "req_s": len(work) / seconds, "tok_s": tokens / seconds,
           "first_block_p50_ms": np.percentile(first, 50) * 1e3, "first_block_p99_ms": np.percentile(first, 99) * 1e3,
           "latency_p50_ms": np.percentile(latency, 50) * 1e3, "latency_p99_ms": np.percentile(latency, 99) * 1e3,
           "tokens": tokens, "seconds": seconds}
    return row, results


def engine_times(work: list[tuple[float, list[int]]], args) -> list[tuple[float, int]]:
    """(seconds, output tokens) of each request run alone on an in-process Engine with the server's settings,
    its loop in a background thread as in the server, so that both run the same ops on the same kind of thread."""
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = llada_engine.load_model("default", dtype=dtype, device=args.device)
    engine = llada_engine.Engine(model, max_running=max(args.concurrency), block_length=args.block_length)
    kwargs = dict(gen_length=args.gen_length, threshold=args.threshold)
    engine.start()
    try:
        for _, prompt in work[:2]:                                    # warm-up
            engine.submit(prompt, **kwargs).result(REQUEST_TIMEOUT)
        out = []
        for _, prompt in work:
            begin = time.perf_counter()
            tokens = engine.submit(prompt, **kwargs).result(REQUEST_TIMEOUT)
            out.append((time.perf_counter() - begin, len(tokens)))
    finally:
        engine.stop()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--arrival-gap", type=float, default=0.02, help="mean seconds between arrivals")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few short requests at C = 1 and 2 (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.gen_length, args.concurrency = 4, 16, [1, 2]
    work = workload(args.requests, args.min_prompt, args.max_prompt, args.arrival_gap, args.seed)

    proc, url = start_server(args)
    try:
        rows, by_concurrency = [], {}
        for concurrency in args.concurrency:
            asyncio.run(run_load(url, work[:max(2, concurrency)], concurrency, args))      # warm-up
            row, results = asyncio.run(run_load(url, work, concurrency, args))
            rows.append(row)
            by_concurrency[concurrency] = results
    finally:
        stop_server(proc)
    for row in rows:
        row["vs_c1"] = row["tok_s"] / rows[0]["tok_s"]

    alone = engine_times(work, args)
    served = by_concurrency[args.concurrency[0]]
    engine_s = sum(s for s, _ in alone)
    http_s = sum(r["latency"] for r in served)
    overhead = {"concurrency": args.concurrency[0], "engine_ms_mean": engine_s / len(alone) * 1e3,
                "http_ms_mean": http_s / len(served) * 1e3, "overhead": http_s / engine_s - 1,
                "same_token_counts": [t for _, t in alone] == [r["tokens"] for r in served]}
    cuda = (args.device or "").startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    print(f"serve on {device}, default model, {args.dtype}, {args.requests} requests, prompts {args.min_prompt}-"
          f"{args.max_prompt} tokens, gen {args.gen_length}, block {args.block_length}, "
          f"arrival gap {args.arrival_gap} s")
    print_table(rows)
    print_table([overhead])
    print_json({"benchmark": "serve", "device": device, "model": "default", "dtype": args.dtype, "quick": args.quick,
                "rows": rows, "overhead": overhead})


if __name__ == "__main__":
    main()
