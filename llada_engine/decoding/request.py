"""A request to the continuous-batching Engine, as the caller holds it.

    req = engine.submit(prompt_ids, gen_length=..., ...)
    req.done, req.tokens, req.finish_reason     # state so far ("stop": EOS, "length", "cancelled", "error")
    for tokens in req.stream(): ...             # committed tokens, block by block, until the request ends
    req.result(timeout=None) -> list[int]       # waits for the end; raises the request's error if it failed
    req.cancel()                                # leaves the batch at the next step, freeing its pages
    req.add_done_callback(fn)                   # fn(req) once it has ended (at once if it already has)

The engine's loop (one thread) writes a request's state through `_emit` and `_finish`; any thread may read it.
"""
import queue
import threading
from typing import Callable, Iterator, Optional

from .validation import DecodeParams

TokensCallback = Callable[[list[int]], None]


class RequestError(RuntimeError):
    """A request that the engine could not finish (non-finite logits, or the engine's loop failed)."""


class Request:
    def __init__(self, request_id: int, prompt: list[int], params: DecodeParams,
                 callback: Optional[TokensCallback] = None):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.tokens: list[int] = []                 # output tokens committed so far (through the first EOS)
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.denoise_steps = 0                      # denoising steps taken (TPF = len(tokens) / denoise_steps)
        self._callback = callback
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = threading.Event()
        self._cancelled = threading.Event()
        self._done_lock = threading.Lock()
        self._done_callbacks: list[Callable[["Request"], None]] = []

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Asks the engine to drop the request at its next step (a no-op once it has ended)."""
        self._cancelled.set()

    def add_done_callback(self, fn: Callable[["Request"], None]) -> None:
        """Calls `fn(request)` once the request has ended: from the engine's loop, or at once if it already has
        (for servers that wait on many requests in one event loop)."""
        with self._done_lock:
            if not self._ended.is_set():
                self._done_callbacks.append(fn)
                return
        fn(self)

    def stream(self) -> Iterator[list[int]]:
        """Committed tokens as they come (one list per finished block); ends when the request ends."""
        while True:
            chunk = self._chunks.get()
            if chunk is None:
                return
            yield chunk

    def result(self, timeout: Optional[float] = None) -> list[int]:
        """The output tokens once the request has ended; raises TimeoutError, or the request's error."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"request {self.id} not done after {timeout} s")
        if self.error is not None:
            raise RequestError(f"request {self.id} failed: {self.error}") from self.error
        return self.tokens

    def _emit(self, tokens: list[int]) -> None:
        if not tokens:
            return
        self.tokens += tokens
        self._chunks.put(tokens)
        if self._callback is not None:
            self._callback(tokens)

    def _finish(self, reason: str, error: Optional[BaseException] = None) -> None:
        with self._done_lock:
            if self._ended.is_set():
                return
            self.finish_reason, self.error = reason, error
            self._ended.set()
            callbacks, self._done_callbacks = self._done_callbacks, []
        self._chunks.put(None)
        for fn in callbacks:
            fn(self)
