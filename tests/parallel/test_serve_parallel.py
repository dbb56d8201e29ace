"""`torchrun -m llada_engine serve --parallel tp` with 2 gloo processes on the CPU: rank 0 alone listens, and
concurrent requests (greedy and sampled, streamed and not, one whose client leaves mid-stream) get the text that
one process's `generate` gives; SIGTERM to torchrun stops both ranks cleanly (rank 1 ends its loop because rank
0's engine stopped, not by a kill) in bounded time.

torchrun is stopped whatever happens (and stops its workers); every HTTP call has a timeout.
"""
import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import llada_engine
from model_testing import tiny_checkpoint

Lb = 4
TIMEOUT = 60            # seconds, every HTTP call
START_TIMEOUT = 180     # seconds for both ranks to load and rank 0 to listen
STOP_TIMEOUT = 25       # seconds from SIGTERM to every process gone (torchrun kills its workers after 30 s)

REQUESTS = [            # prompt, request arguments
    ("to be", dict(max_tokens=9)),
    ("or not", dict(max_tokens=14, extra_body=dict(steps=4, threshold=0.5))),
    ("that is", dict(max_tokens=7, temperature=0.8, top_p=0.9, seed=5, extra_body=dict(top_k=20))),
    ("the question", dict(max_tokens=12, extra_body=dict(threshold=0.7))),
]


def expected_text(model, tokenizer, prompt: str, kw: dict) -> str:
    extra = kw.get("extra_body", {})
    sampling = {k: kw[k] for k in ("temperature", "top_p", "seed") if k in kw}
    out = llada_engine.generate(model, [tokenizer.encode(prompt).ids], gen_length=kw["max_tokens"], block_length=Lb,
                                **sampling, **extra)
    return tokenizer.decode(out.sequences[0], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.kernels
def test_serve_under_torchrun_equals_one_process(tmp_path):
    ckpt, _, _ = tiny_checkpoint(tmp_path / "tiny")
    model = llada_engine.load_model(ckpt, dtype=torch.float32)
    tokenizer = llada_engine.load_tokenizer(ckpt)
    expected = [expected_text(model, tokenizer, p, kw) for p, kw in REQUESTS]

    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llada_engine",
         "serve", "--model", str(ckpt), "--parallel", "tp", "--host", "127.0.0.1", "--port", "0", "--block-length",
         str(Lb), "--dtype", "float32", "--max-running", "4", "--served-model-name", "tiny", "--shutdown-timeout", "1",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, start_new_session=True)

    def server_log() -> str:
        log.seek(0)
        return log.read()[-4000:]

    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        found = None
        while found is None:
            line = lines.get(timeout=START_TIMEOUT)
            assert line is not None, f"the server exited with {proc.wait()}:\n{server_log()}"
            found = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
        url = found.group(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)

        with httpx.stream("POST", f"{url}/v1/completions", timeout=TIMEOUT,     # a client that leaves mid-stream
                          json=dict(model="tiny", prompt="leaving", max_tokens=400, stream=True)) as r:
            next(r.iter_lines())

        def complete(i: int) -> str:
            prompt, kw = REQUESTS[i]
            if i % 2:
                chunks = client.completions.create(model="tiny", prompt=prompt, stream=True, **kw)
                return "".join(c.choices[0].text for c in chunks if c.choices)
            return client.completions.create(model="tiny", prompt=prompt, **kw).choices[0].text

        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            texts = list(pool.map(complete, range(len(REQUESTS)), timeout=4 * TIMEOUT))
        assert texts == expected
        assert complete(0) == expected[0]                                    # and again, alone
        health = httpx.get(f"{url}/health", timeout=TIMEOUT).json()
        assert (health["running"], health["waiting"]) == (0, 0)

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(STOP_TIMEOUT)
        assert time.monotonic() - started < STOP_TIMEOUT
        text = server_log()
        assert "llada-engine serve: stopped" in text and "llada-engine serve: rank 1 stopped" in text, text
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """Ends torchrun and its workers whatever state they are in. Its workers are not in its process group: it
    must end them itself (SIGTERM, then SIGKILL after 30 s), so it is killed only if it does not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
