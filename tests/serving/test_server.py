"""`llada-engine serve` end to end: the server runs in a subprocess on a free port of 127.0.0.1 with the embedded
default model and is called with the official `openai` client (raw HTTP where a client cannot send the request):
greedy completions and chat completions, streamed and not, equal `tokenizer.decode` of what `generate` gives;
32 concurrent streams with mixed lengths and parameters each equal their own `generate` result, and /metrics
counts them; every bad request gets its 4xx naming the field and the server keeps serving; stop strings; a
client that disconnects mid-request (streamed or not) frees its pages; the API key; SIGTERM mid-stream stops a
server cleanly, and SIGINT stops the shared one at the end.

The servers run in fp32, where a request's tokens do not depend on what else is in the batch (in bf16 they
can, by rounding). Every HTTP call has a timeout; the servers die with the test process (PR_SET_PDEATHSIG) and
are stopped by their fixture or test; the model's text is never compared with fixed strings (it is computed
here).
"""
import contextlib
import ctypes
import functools
import json
import queue
import random
import re
import signal
import socket
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
from llada_engine.decoding.chat import chat_prompt

pytestmark = pytest.mark.kernels

Lb = 8                 # the servers' block length: several blocks per short response
KEY = "test-key"
TIMEOUT = 60           # seconds, every HTTP call
START_TIMEOUT = 180    # seconds for a server to load the model and listen
STOP_TIMEOUT = 30      # seconds for a server to exit after SIGTERM


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG


class Server:
    """`llada-engine serve` in a subprocess; `url` once it listens."""

    def __init__(self, log_dir, *args: str):
        self.stderr = open(log_dir / "server.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llada_engine.cli", "serve", "--model", "default", "--host", "127.0.0.1",
             "--port", "0", "--block-length", str(Lb), "--dtype", "float32", "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL, text=True,
            preexec_fn=_die_with_parent)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"the server did not listen within {START_TIMEOUT} s:\n{self.log()}")
            if line is None:
                raise RuntimeError(f"the server exited with {self.proc.wait()}:\n{self.log()}")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)$", line.strip())
            if found:
                self.url = found.group(1)
                return

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode

    def client(self, api_key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)

    def post(self, path: str, *, key: str = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=TIMEOUT, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=TIMEOUT).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def wait_metrics(self, until, what: str, timeout: float = 30) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if until(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"/metrics never showed {what}: {m}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"), "--api-key", KEY, "--max-running", "16")
    yield s
    assert s.stop(signal.SIGINT) == 0, s.log()
    assert "llada-engine serve: stopped" in s.log()


@pytest.fixture(scope="module")
def model():
    return llada_engine.load_model("default", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return llada_engine.load_tokenizer("default")


def generate(model, prompts: list[list[int]], **kw) -> list[list[int]]:
    return llada_engine.generate(model, prompts, block_length=Lb, **kw).sequences


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def finish_of(model, tokens: list[int]) -> str:
    return "stop" if tokens[-1:] == [model.config.eos_token_id] else "length"


def requests_total(m: dict, endpoint: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(f'llada_requests_total{{endpoint="{endpoint}"'))


def test_the_package_imports_without_the_server():
    code = ("import sys, llada_engine, llada_engine.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


PROMPTS = ("KING LEAR:\n", "First Citizen:\n", "ROMEO:\n", "JULIET:\nO Romeo, Romeo!", "MACBETH:\n")
QUESTIONS = ("Who art thou?", "Speak, my lord.", "What news from Rome?")
MAX_TOKENS = 4 * Lb


@pytest.fixture(scope="module")
def longest(model, tokenizer):
    """pick(texts, chat=False) -> (text, prompt ids, greedy tokens) of the one whose answer is longest (the
    model's answers vary in length: the tests need one that spans blocks)."""
    @functools.cache
    def pick(texts: tuple[str, ...], chat: bool = False):
        ids = [tokenizer.encode(chat_prompt(t) if chat else t).ids for t in texts]
        outputs = generate(model, ids, gen_length=MAX_TOKENS)
        i = max(range(len(texts)), key=lambda i: len(outputs[i]))
        assert len(outputs[i]) > Lb, f"the model's answers are all one block or less: {outputs}"
        return texts[i], ids[i], outputs[i]
    return pick


def test_greedy_completions_and_chat_equal_generate(server, model, tokenizer, longest):
    client = server.client()
    prompt, ids, reference = longest(PROMPTS)
    question, chat_ids, chat_reference = longest(QUESTIONS, chat=True)
    text, chat_text = text_of(tokenizer, reference), text_of(tokenizer, chat_reference)

    for p in (prompt, ids):
        r = client.completions.create(model="default", prompt=p, max_tokens=MAX_TOKENS)
        assert r.choices[0].text == text and r.choices[0].finish_reason == finish_of(model, reference)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(reference))
    chunks = list(client.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(pieces) == text and 2 <= len(pieces) <= -(-len(reference) // Lb)   # text as blocks commit
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish_of(model, reference)
    assert chunks[-1].usage.completion_tokens == len(reference)

    messages = [{"role": "user", "content": question}]
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == chat_text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish_of(model, chat_reference)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(chat_ids), len(chat_reference))
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_completion_tokens=MAX_TOKENS,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == chat_text and len(pieces) >= 2
    assert chunks[-1].choices[0].finish_reason == finish_of(model, chat_reference)


GROUPS = [   # per group: max_tokens and what else it sets (the extras through extra_body)
    dict(max_tokens=5, extra=dict(threshold=0.9)),
    dict(max_tokens=12, extra=dict(steps=4, threshold=0.5)),
    dict(max_tokens=19, temperature=0.8, top_p=0.9, seed=100, extra=dict(top_k=40)),
    dict(max_tokens=30, extra=dict(threshold=0.6, eos_early_stop=True)),
]


def test_32_concurrent_streams_each_equal_generate_alone(server, model, tokenizer):
    rng = random.Random(0)
    work = []                 # (prompt ids, request arguments, expected tokens)
    for group in GROUPS:
        prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(8)]
        extra, sampling = group["extra"], {k: group[k] for k in ("temperature", "top_p") if k in group}
        seed = group.get("seed", 0)
        expected = generate(model, prompts, gen_length=group["max_tokens"], seed=seed, **sampling, **extra)
        for i, (prompt, tokens) in enumerate(zip(prompts, expected)):   # generate gives prompt i seed + i
            work.append((prompt, dict(max_tokens=group["max_tokens"], seed=seed + i, extra_body=extra, **sampling),
                         tokens))
    rng.shuffle(work)
    client = server.client()
    before = server.metrics()

    def stream(prompt, kw):
        chunks = list(client.completions.create(model="default", prompt=prompt, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        return ("".join(c.choices[0].text for c in chunks if c.choices),
                [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage)

    with ThreadPoolExecutor(len(work)) as pool:
        results = list(pool.map(lambda w: stream(w[0], w[1]), work, timeout=4 * TIMEOUT))
    assert len(results) == 32
    for (prompt, kw, tokens), (text, finish, usage) in zip(work, results):
        assert text == text_of(tokenizer, tokens), (prompt, kw)
        assert finish == finish_of(model, tokens) and usage.completion_tokens == len(tokens)
        assert usage.prompt_tokens == len(prompt)
    after = server.wait_metrics(lambda m: m["llada_requests_running"] == 0, "no request running")
    assert requests_total(after, "completions") - requests_total(before, "completions") == 32
    assert after["llada_generated_tokens_total"] - before["llada_generated_tokens_total"] == sum(
        len(t) for _, _, t in work)
    assert after["llada_prompt_tokens_total"] - before["llada_prompt_tokens_total"] == sum(len(p) for p, _, _ in work)
    assert after["llada_time_to_first_block_seconds_count"] - before["llada_time_to_first_block_seconds_count"] == 32
    assert after["llada_kv_pages_used"] == 0 and after["llada_requests_waiting"] == 0
    assert after["llada_tokens_per_second"] > 0 and after["llada_tokens_per_forward"] >= 1


def test_stop_strings_end_the_response_across_blocks(server, tokenizer, longest):
    prompt, _, tokens = longest(PROMPTS)
    text = text_of(tokenizer, tokens)
    boundary = len(text_of(tokenizer, tokens[:Lb]))          # where the first block's text ends
    assert 0 < boundary < len(text)
    # the shortest string across the block boundary whose first occurrence is there
    stop = next(text[boundary - 1:boundary + k] for k in range(1, len(text) - boundary + 1)
                if text.find(text[boundary - 1:boundary + k]) == boundary - 1)
    client = server.client()
    for stream in (False, True):
        r = client.completions.create(model="default", prompt=prompt, max_tokens=MAX_TOKENS,
                                      stop=["\x00never", stop], stream=stream)
        if stream:
            chunks = list(r)
            got, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert got == text[:boundary - 1] and finish == "stop", (stop, stream)
    server.wait_metrics(lambda m: m["llada_kv_pages_used"] == 0, "the stopped requests' pages freed")


BAD = [   # (path, body, status, the field named)
    ("/v1/completions", b'{"model": "default", "prompt": ', 400, None),
    ("/v1/completions", b'["not", "an", "object"]', 400, None),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"model": "default", "prompt": [5] * 5000, "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"model": "default", "prompt": "", "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"model": "default", "prompt": [10**6], "max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"model": "default", "prompt": {"x": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": "default", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "default", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "default", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "default", "prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"model": "default", "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "default", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "default", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "default", "prompt": "x", "steps": 0}, 400, "steps"),
    ("/v1/completions", {"model": "default", "prompt": "x", "threshold": 1.5}, 400, "threshold"),
    ("/v1/completions", {"model": "default", "prompt": "x", "block_length": 32}, 400, "block_length"),
    ("/v1/completions", {"model": "default", "prompt": "x", "eos_early_stop": "yes"}, 400, "eos_early_stop"),
    ("/v1/completions", {"model": "default", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "default", "prompt": "x", "treshold": 0.5}, 400, "treshold"),
    ("/v1/completions", {"model": "default", "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/chat/completions", {"model": "default", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -2}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
     400, "tools"),
    ("/v1/nowhere", {"model": "default"}, 404, None),
]


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(server):
    good = {"model": "default", "prompt": "x", "max_tokens": 2}
    before = server.metrics()
    for path, body, status, param in BAD:
        r = server.post(path, content=body) if isinstance(body, bytes) else server.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error", body
        assert server.post("/v1/completions", json=good).status_code == 200
    after = server.metrics()
    assert sum(after.get(f'llada_request_errors_total{{status="{s}"}}', 0) - before.get(
        f'llada_request_errors_total{{status="{s}"}}', 0) for s in (400, 404)) == len(BAD)
    client = server.client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="default", prompt="x", max_tokens=2, extra_body={"threshold": -0.1})
    assert raised.value.param == "threshold"
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert raised.value.code == "model_not_found"
    assert [m.id for m in client.models.list()] == ["default"]


def test_the_api_key_is_required_on_v1_only(server):
    for key in (None, "wrong"):
        r = server.post("/v1/completions", key=key, json={"model": "default", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()["status"] == "ok"


def long_request(max_tokens: int) -> dict:
    """A request that runs for a while whatever the model says: a long prompt to prefill, then blocks."""
    rng = random.Random(3)
    return {"model": "default", "prompt": [rng.randrange(3, 4096) for _ in range(3000)], "max_tokens": max_tokens,
            "stream": True}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_mid_request_frees_its_pages(server, stream):
    before = server.metrics()
    body = json.dumps({**long_request(512), "stream": stream}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (host.encode(), KEY.encode(), len(body), body))
        server.wait_metrics(lambda m: m["llada_kv_pages_used"] > 0, "the request's pages")
    after = server.wait_metrics(lambda m: m["llada_kv_pages_used"] == 0 and m["llada_requests_running"] == 0,
                                "the pages freed")
    cancelled = 'llada_requests_total{endpoint="completions",finish_reason="cancelled"}'
    assert after[cancelled] - before.get(cancelled, 0) == 1


def test_sigterm_mid_stream_stops_the_server_cleanly(tmp_path):
    server = Server(tmp_path, "--shutdown-timeout", "0.5")
    try:
        def read_stream() -> str:
            with contextlib.suppress(httpx.HTTPError):
                with httpx.stream("POST", f"{server.url}/v1/completions", json=long_request(1024),
                                  timeout=TIMEOUT) as r:
                    return "".join(r.iter_text())
            return "(cut)"

        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(read_stream)
            server.wait_metrics(lambda m: m["llada_kv_pages_used"] > 0, "the request running")
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(STOP_TIMEOUT) == 0, server.log()
            assert time.monotonic() - started < 15
            reading.result(timeout=TIMEOUT)                        # the stream has ended too
        assert "llada-engine serve: stopped" in server.log()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=5)
    finally:
        server.stop(signal.SIGKILL)
