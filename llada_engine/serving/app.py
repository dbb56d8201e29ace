"""The OpenAI-compatible HTTP app (FastAPI) in front of a running Engine.

    app = create_app(engine, tokenizer, model_name="default", chat_checkpoint=folder, api_key=None)

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events, text as blocks commit)
    GET  /v1/models, /v1/models/{model}, /health, /metrics

Each request is submitted to the engine from the event loop; the engine's thread hands committed tokens back
with `loop.call_soon_threadsafe` (it never waits on the HTTP side). A request ends when the engine finishes it,
when its text reaches a stop string, or when its client goes away (then it is cancelled and its pages are
freed at the engine's next step). Errors are OpenAI error objects naming the field at fault; with an API key,
/v1/* wants `Authorization: Bearer KEY` (/health and /metrics are open).
"""
import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from typing import AsyncIterator, Optional

import anyio
from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..decoding.chat import chat_text
from .metrics import ServerMetrics
from .protocol import APIError, Job, chat_job, completion_job
from .text import ResponseText

DEFAULT_MAX_TOKENS = 256         # without max_tokens: this many, or as many as fit if fewer
ENGINE_ARGUMENTS = ("gen_length", "block_length", "steps", "threshold", "temperature", "top_k", "top_p", "seed",
                    "eos_early_stop", "mask_id", "eos_id", "prompt_ids", "prompts", "prompt")


class EventStream(StreamingResponse):
    """Server-sent events that end as soon as the client disconnects, closing their source and cancelling
    `generation`: Starlette's own StreamingResponse only notices a gone client at its next write."""
    media_type = "text/event-stream"

    def __init__(self, content, generation: "Generation"):
        super().__init__(content)
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):           # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            self.generation.close()                        # also when the body never started


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Service:
    """What the routes share: the engine, the tokenizer, the served model's name, the metrics."""

    def __init__(self, engine, tokenizer, model_name: str, chat_checkpoint, api_key: Optional[str], defaults: dict):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.defaults = {k: v for k, v in defaults.items() if v is not None}
        self.chat_checkpoint = chat_checkpoint
        self.api_key = api_key
        self.metrics = ServerMetrics(engine)
        self.created = int(time.time())

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            text = chat_text(messages, self.chat_checkpoint)
        except Exception as error:  # the checkpoint's own template may refuse a conversation (raise_exception)
            raise APIError(400, f"messages: the chat format refused them: {error}", param="messages") from error
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def gen_length(self, job: Job) -> int:
        """The request's gen_length: its max_tokens if the KV cache can ever hold it, else a 400."""
        engine, cache = self.engine, self.engine.cache
        P = len(job.prompt)
        if P == 0:                                            # the engine refuses it by name
            return job.max_tokens or DEFAULT_MAX_TOKENS
        capacity = min(cache.num_pages, cache.max_pages)
        Lb, positions = engine.block_length, engine.model.config.max_position_embeddings

        def fits(n: int) -> bool:   # in the cache, and within the model's positions (in whole blocks)
            return engine.pages_needed(P, n) <= capacity and -(-(P + n) // Lb) * Lb <= positions

        if not fits(1):
            raise APIError(400, f"the prompt has {P} tokens: no response fits beside it in this server's KV cache "
                                f"({capacity} pages of {cache.page_size} tokens per request) within the model's "
                                f"{positions} positions", param=job.prompt_field, code="context_length_exceeded")
        low, high = 1, positions + 1                                         # fits(low), not fits(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        if job.max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, low)
        if job.max_tokens > low:
            raise APIError(400, f"{job.max_tokens_field} {job.max_tokens} is beyond this server's KV cache or the "
                                f"model's {positions} positions: with a prompt of {P} tokens at most {low} fit",
                           param=job.max_tokens_field, code="context_length_exceeded")
        return job.max_tokens

    def authorize(self, http: HTTPRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: send the server's key as Authorization: Bearer KEY",
                           code="invalid_api_key")


def _param(error: ValueError, job: Job) -> Optional[str]:
    """The request field behind an Engine.submit ValueError: its `argument` if it names one, else the first
    argument its message names; gen_length is max_tokens and the prompt is the prompt's field."""
    name = getattr(error, "argument", None)
    if name is None:
        found = re.search(r"\b(" + "|".join(ENGINE_ARGUMENTS) + r")\b", str(error))
        name = found.group(1) if found else None
    if name == "gen_length":
        return job.max_tokens_field
    if name in ("prompt_ids", "prompts", "prompt"):
        return job.prompt_field
    return name


class Generation:
    """One request through the engine as the event loop sees it: committed tokens arrive on an asyncio queue
    and become text (`deltas`); the request is cancelled when that text reaches a stop string or its reader
    stops reading."""

    def __init__(self, service: Service, job: Job, endpoint: str, arrived: float):
        self.service, self.job, self.endpoint, self.arrived = service, job, endpoint, arrived
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

        def post(item) -> None:                                # from the engine's thread
            with contextlib.suppress(RuntimeError):            # the event loop has closed: nobody waits any more
                loop.call_soon_threadsafe(self._queue.put_nowait, item)

        gen_length = service.gen_length(job)
        try:
            self.request = service.engine.submit(job.prompt, gen_length=gen_length, callback=post,
                                                 **{**service.defaults, **job.engine_args})
        except ValueError as error:
            raise APIError(400, str(error), param=_param(error, job)) from error
        except RuntimeError as error:
            raise APIError(503, f"the server is shutting down: {error}", type="server_error") from error
        self.request.add_done_callback(lambda _: post(None))
        service.metrics.prompt_tokens.inc(len(job.prompt))
        self.text = ResponseText(service.decode, job.stop)
        self._closed = False

    def close(self, outcome: str = "cancelled") -> None:
        """Ends the request (cancelling it if it still runs) and counts it by `outcome`; once, later calls do
        nothing."""
        self.request.cancel()                                  # a no-op once it has ended
        if not self._closed:
            self._closed = True
            self.service.metrics.requests.labels(self.endpoint, outcome).inc()

    @property
    def finish_reason(self) -> str:
        return "stop" if self.text.stopped else self.request.finish_reason

    def usage(self) -> dict:
        prompt, completion = len(self.job.prompt), self.text.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def deltas(self) -> AsyncIterator[str]:
        """The response's text as it becomes final; raises APIError if the engine cancelled or failed it."""
        outcome, metrics = "cancelled", self.service.metrics
        try:
            while (tokens := await self._queue.get()) is not None:
                if not self.text.tokens:
                    metrics.first_block.observe(time.perf_counter() - self.arrived)
                delta = self.text.feed(tokens)
                if self.text.stopped:
                    self.request.cancel()
                if delta:
                    yield delta
                if self.text.stopped:
                    break
            else:
                if self.request.finish_reason == "cancelled":
                    raise APIError(503, "the request was cancelled: the server is shutting down", type="server_error")
                if self.request.finish_reason == "error":
                    outcome = "error"
                    raise APIError(500, f"the request failed: {self.request.error}", type="server_error")
                tail = self.text.finish()
                if tail:
                    yield tail
            outcome = self.finish_reason
            metrics.latency.observe(time.perf_counter() - self.arrived)
        finally:
            self.close(outcome)


async def _until_disconnected(http: HTTPRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _complete(generation: Generation, http: HTTPRequest) -> Optional[str]:
    """The whole text of a non-streamed response, or None if the client went away first (then the request is
    cancelled)."""
    async def read() -> str:
        async with contextlib.aclosing(generation.deltas()) as deltas:
            async for _ in deltas:
                pass
        return generation.text.text

    reader, watcher = asyncio.ensure_future(read()), asyncio.ensure_future(_until_disconnected(http))
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        generation.close()                                     # also when the reader never started
    return reader.result() if not reader.cancelled() else None


async def _events(generation: Generation, head: dict, first: Optional[dict], piece, last: dict) -> AsyncIterator[str]:
    """The SSE stream of a response: `first` (if any), `piece(delta)` per text delta, `last` with the finish
    reason, the usage chunk if asked for, then [DONE]; an error as an OpenAI error event."""
    try:
        if first is not None:
            yield sse({**head, "choices": [first]})
        async with contextlib.aclosing(generation.deltas()) as deltas:
            async for delta in deltas:
                yield sse({**head, "choices": [piece(delta)]})
        yield sse({**head, "choices": [{**last, "finish_reason": generation.finish_reason}]})
        if generation.job.include_usage:
            yield sse({**head, "choices": [], "usage": generation.usage()})
    except APIError as error:
        yield sse(error.body())
    yield "data: [DONE]\n\n"


def create_app(engine, tokenizer, *, model_name: str, chat_checkpoint=None, api_key: Optional[str] = None,
               defaults: Optional[dict] = None) -> FastAPI:
    """The app for an engine whose loop runs (engine.start()); see the module doc. `defaults` are Engine.submit
    arguments for requests that do not give them (e.g. the mask_id of a checkpoint whose config has none)."""
    service = Service(engine, tokenizer, model_name, chat_checkpoint, api_key, defaults or {})
    app = FastAPI(title="llada_engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    v1 = dict(dependencies=[Depends(service.authorize)])

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        service.metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return await api_error(_, APIError(error.status_code, str(error.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def server_error(_, error: Exception):
        return await api_error(_, APIError(500, f"internal error: {type(error).__name__}: {error}",
                                           type="server_error"))

    async def read_json(http: HTTPRequest):
        raw = await http.body()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise APIError(400, f"We could not parse the JSON body of your request: {error}") from error

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": service.created, "owned_by": "llada_engine",
                "max_model_len": engine.model.config.max_position_embeddings}

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", **v1)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", **v1)
    async def model(model: str):
        if model != model_name:
            raise APIError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", **v1)
    async def completions(http: HTTPRequest):
        arrived = time.perf_counter()
        job = completion_job(await read_json(http), model_name, service.encode)
        generation = Generation(service, job, "completions", arrived)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if job.stream:
            return EventStream(_events(generation, head, None,
                                       lambda delta: {"index": 0, "text": delta, "logprobs": None,
                                                      "finish_reason": None},
                                       {"index": 0, "text": "", "logprobs": None}), generation)
        text = await _complete(generation, http)
        if text is None:
            return Response(status_code=499)
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                     "finish_reason": generation.finish_reason}], "usage": generation.usage()}

    @app.post("/v1/chat/completions", **v1)
    async def chat_completions(http: HTTPRequest):
        arrived = time.perf_counter()
        job = chat_job(await read_json(http), model_name, service.encode_chat)
        generation = Generation(service, job, "chat", arrived)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model_name}
        if job.stream:
            return EventStream(_events(generation, head,
                                       {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None},
                                       lambda delta: {"index": 0, "delta": {"content": delta}, "logprobs": None,
                                                      "finish_reason": None},
                                       {"index": 0, "delta": {}, "logprobs": None}), generation)
        text = await _complete(generation, http)
        if text is None:
            return Response(status_code=499)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": generation.finish_reason}], "usage": generation.usage()}

    return app
