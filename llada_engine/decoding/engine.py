"""The continuous-batching engine: requests join and leave a running batch at every step, over one paged
KV cache, each decoded exactly as `generate` decodes it alone.

    engine = Engine(model, max_running=16, cache_tokens=None, block_length=32, compile=False)
    req = engine.submit(prompt_ids, gen_length=256, steps=32, threshold=0.95, temperature=0.0, top_k=0,
                        top_p=1.0, seed=0, eos_early_stop=False, mask_id=None, eos_id=None)   # -> Request
    engine.step() -> int           # admit waiting requests, one denoising step for all running; running count
    engine.run_until_idle()
    engine.start(); engine.stop()  # the same loop in a background thread, for servers
    engine.follow()                # a tensor-parallel rank other than 0: rank 0's steps, until it stops

A step begins with what changed in the queue since the last one (requests submitted, requests cancelled),
taken at once under the engine's lock, so that a step never sees half a change. With `lockstep` (a
tensor-parallel model's Lockstep, llada_engine/parallel/lockstep.py) rank 0 sends those changes to the other
ranks, whose engines apply the same ones and so admit, step and free exactly as rank 0's does.

A step: admit waiting requests in order while a slot and every page they can ever need are free (their
prompt's whole blocks are prefilled into fresh pages by one packed forward), then one forward of the current
block of every running request against its pages (a request whose block finished last step runs that block
once more, to store its K/V in the cache; its logits are not used), then one batched commit. A page holds
one block (page_size = block_length; the least multiple of 8 that is a multiple of block_length when
block_length is not itself a multiple of 8), so a finished block fills one page and nothing is ever copied. The step's
inputs are built on the host (the scheduler's bookkeeping, where every value check happens) and uploaded in
one transfer; its outputs (each request's block tokens and a non-finite flag) come back in one readback, the
only point at which a step waits for the device. Everything a request does next (finish its block, stop on
EOS, stream) is decided from that readback on the host.
A request's tokens depend only on its own prompt and arguments: greedy, or drawn from its own Philox stream
(seed, offset = its count of commit calls), with batch-invariant kernels underneath.
"""
import collections
import dataclasses
import itertools
import math
import threading
from typing import Optional, Sequence

import torch

from .. import ops
from .paged_cache import PagedBatch, PagedKVCache
from .request import Request, RequestError, TokensCallback
from .schedule import min_commit_schedule
from .stats import GenerateStats
from .validation import DecodeParams, check_positions, check_prompts, decode_params

CPU_CACHE_TOKENS = 1 << 16      # default cache size on the CPU, in tokens
CUDA_CACHE_FRACTION = 0.8       # default cache size on a GPU: this fraction of the free device memory


@dataclasses.dataclass
class QueueChanges:
    """What a step starts from: requests submitted since the last step (in order), the ids of requests
    cancelled, and whether the engine stops (a follower's only way to learn that rank 0 has stopped)."""
    submitted: list[Request]
    cancelled: set[int]
    stop: bool = False


@dataclasses.dataclass
class _Sequence:
    """The engine's bookkeeping of one running request (host only)."""
    request: Request
    slot: int
    x: list[int]                 # prompt, then MASK to whole blocks; decoded in place
    num_blocks: int
    block: int                   # block being decoded
    schedule: list[int]          # min_commit of each step of a block
    step: int = 0                # denoising steps taken in the current block
    draws: int = 0               # commit calls so far: the sampling offset
    writing: bool = False        # the current block is final: this step stores its K/V in the cache
    emitted: int = 0             # output tokens already handed to the request

    @property
    def params(self) -> DecodeParams:
        return self.request.params

    def block_tokens(self, block_length: int) -> list[int]:
        return self.x[self.block * block_length:(self.block + 1) * block_length]


def default_cache_tokens(model) -> int:
    """CPU_CACHE_TOKENS on the CPU; on a GPU what fits in CUDA_CACHE_FRACTION of the free device memory (of
    the rank with the least, for a tensor-parallel model)."""
    if model.device.type != "cuda":
        return CPU_CACHE_TOKENS
    cfg = model.config
    free, _ = torch.cuda.mem_get_info(model.device)
    per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, model.dtype)
    tokens = int(free * CUDA_CACHE_FRACTION) // per_token
    parallel = getattr(model, "parallel", None)      # tensor-parallel ranks must schedule alike: one size
    return tokens if parallel is None else parallel.least(tokens, model.device)


def upload(parts: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Host tensors copied to `device` in one transfer (from pinned memory, without waiting, on a GPU),
    returned in their shapes."""
    flat = torch.cat([p.reshape(-1).to(dtype) for p in parts])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    pieces = flat.split([p.numel() for p in parts])
    return [piece.view(p.shape) for piece, p in zip(pieces, parts)]


def page_size(block_length: int) -> int:
    """Rows of a cache page: one block, or the least multiple of 8 that holds whole blocks."""
    return math.lcm(block_length, 8)


def pages_needed(prompt_length: int, gen_length: int, block_length: int) -> int:
    """Cache pages a request holds: every block but its last is written into the cache."""
    cached_rows = (-(-(prompt_length + gen_length) // block_length) - 1) * block_length
    return -(-cached_rows // page_size(block_length))


def readback(values: torch.Tensor) -> torch.Tensor:
    """`values` on the host: on a GPU an asynchronous copy into pinned memory and a wait on its event, the
    step's only wait for the device."""
    if values.device.type != "cuda":
        return values
    host = values.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()
    return host


def _int64(seed: int) -> int:
    """A 64-bit seed as the int64 with its bits."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def batch_bucket(batch: int, max_running: int) -> int:
    """The padded batch size of a compiled step: the next power of two, at most max_running."""
    return min(1 << (batch - 1).bit_length(), max_running)


class Engine:
    def __init__(self, model, *, max_running: int = 16, cache_tokens: Optional[int] = None, block_length: int = 32,
                 compile: bool = False, lockstep=None):
        for name, value in (("max_running", max_running), ("block_length", block_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Engine: {name} must be a positive int, got {value!r}")
        if cache_tokens is None:
            cache_tokens = default_cache_tokens(model)
        if not isinstance(cache_tokens, int) or isinstance(cache_tokens, bool) or cache_tokens < 0:
            raise ValueError(f"Engine: cache_tokens must be an int >= 0, got {cache_tokens!r}")
        cfg = model.config
        self.model = model
        self.block_length = block_length
        self.max_running = max_running
        rows = page_size(block_length)
        num_pages = cache_tokens // rows
        max_pages = max(1, min(num_pages, -(-cfg.max_position_embeddings // rows)))
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_pages, rows, cfg.num_key_value_heads,
                                  cfg.head_dim, model.dtype, model.device, max_slots=max_running,
                                  max_pages=max_pages)
        self.stats = GenerateStats()
        self._commit = ops.commit_tokens if model.backend == "kernels" else ops.commit_tokens_ref
        self._compiled = compile
        self._forward = _compile_forward(model, self.cache) if compile else model.forward_paged
        self._ids = itertools.count()
        self._inbox: list[Request] = []                  # submitted, not yet seen by a step (under _lock)
        self._waiting: collections.deque[Request] = collections.deque()
        self._lockstep = lockstep
        self._running: list[_Sequence] = []
        self._free_slots = list(range(max_running - 1, -1, -1))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # ---- the caller's side ------------------------------------------------------------------------------

    def submit(self, prompt_ids, *, gen_length: int = 256, steps: int = 32, threshold: float = 0.95,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               eos_early_stop: bool = False, mask_id: Optional[int] = None, eos_id: Optional[int] = None,
               block_length: Optional[int] = None, callback: Optional[TokensCallback] = None) -> Request:
        """Queues a request (see the module doc); it joins the batch at the next step that has room for it.
        `callback(tokens)` is called from the engine's loop as tokens commit. Raises ValueError for bad
        arguments and for a request that can never fit the cache."""
        block_length = self.block_length if block_length is None else block_length
        if block_length != self.block_length:
            raise ValueError(f"block_length must equal the engine's block_length {self.block_length}, "
                             f"got {block_length!r}")
        params = decode_params(self.model.config, gen_length=gen_length, block_length=block_length, steps=steps,
                               threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               eos_early_stop=eos_early_stop, mask_id=mask_id, eos_id=eos_id)
        (prompt,) = check_prompts([prompt_ids], self.model.config.vocab_size)
        check_positions(len(prompt), params, self.model.config.max_position_embeddings)
        pages = self.pages_needed(len(prompt), params.gen_length)
        if pages > min(self.cache.num_pages, self.cache.max_pages):
            raise ValueError(f"prompt of {len(prompt)} tokens with gen_length {params.gen_length} needs {pages} "
                             f"cache pages of {self.cache.page_size} tokens, but the engine has "
                             f"{self.cache.num_pages} (cache_tokens) and allows {self.cache.max_pages} per "
                             f"request: it can never fit")
        request = Request(next(self._ids), prompt, params, callback)
        with self._lock:
            if self._stopping:
                raise RuntimeError("Engine: stopped, no new requests")
            self._inbox.append(request)
            self._wake.notify()
        return request

    def pages_needed(self, prompt_length: int, gen_length: int) -> int:
        """Cache pages a request holds (see pages_needed)."""
        return pages_needed(prompt_length, gen_length, self.block_length)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._inbox)

    def run_until_idle(self) -> None:
        """Steps until no request is running or waiting."""
        while self.step() or self.waiting:
            pass

    def start(self) -> None:
        """Runs the loop in a background thread until stop()."""
        if self._lockstep is not None and not self._lockstep.leads:
            raise RuntimeError("Engine: a rank other than 0 follows rank 0's loop: call follow(), not start()")
        if self._thread is not None:
            raise RuntimeError("Engine: already started")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llada-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the background loop: running and waiting requests end as cancelled."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._lockstep is not None:
                self._lockstep.exchange(QueueChanges([], set(), stop=True))
        self._cancel_all()

    def follow(self) -> None:
        """A follower rank's loop (see the module doc): rank 0's steps until rank 0 stops, then everything
        still here ends as cancelled."""
        if self._lockstep is None or self._lockstep.leads:
            raise RuntimeError("Engine: follow() is for the ranks other than 0 of an engine with a lockstep")
        while not self._stopping:
            self._step_safely()
        self._cancel_all()

    def _cancel_all(self) -> None:
        for s in list(self._running):
            self._end(s, "cancelled")
        with self._lock:
            waiting, self._waiting = list(self._waiting) + self._inbox, collections.deque()
            self._inbox = []
        for request in waiting:
            request._finish("cancelled")

    def _loop(self) -> None:
        # In lockstep an idle rank 0 still steps every HEARTBEAT_S: the followers wait in a collective, which
        # would otherwise time out.
        idle_wait = None if self._lockstep is None else self._lockstep.heartbeat_s
        while True:
            with self._lock:
                if not self._stopping and not self._inbox and not self._waiting and not self._running:
                    self._wake.wait(idle_wait)
                if self._stopping:
                    return
            self._step_safely()

    def _step_safely(self) -> None:
        try:
            self.step()
        except Exception as error:  # a failed step fails the requests in it, never the loop
            for s in list(self._running):
                self._end(s, "error", error)

    # ---- one step ---------------------------------------------------------------------------------------

    def step(self) -> int:
        """Admits waiting requests, then one denoising step of every running one; returns how many run."""
        with torch.no_grad():
            changes = self._changes()
            if self._lockstep is not None:
                changes = self._lockstep.exchange(changes)
            self._apply(changes)
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            if self._running:
                self._denoise()
        return len(self._running)

    def _changes(self) -> QueueChanges:
        """The queue's changes since the last step, taken under the lock (see the module doc)."""
        with self._lock:
            submitted, self._inbox = self._inbox, []
            cancelled = {r.id for r in itertools.chain((s.request for s in self._running), self._waiting, submitted)
                         if r.cancelled}
            return QueueChanges(submitted, cancelled)

    def _apply(self, changes: QueueChanges) -> None:
        """The step's queue: the new requests join the waiting ones, the cancelled ones leave (freeing their
        pages); on a follower, a stop from rank 0 ends its loop after this step."""
        self._waiting.extend(changes.submitted)
        if changes.cancelled:
            for s in [s for s in self._running if s.request.id in changes.cancelled]:
                self._end(s, "cancelled")
            for request in [r for r in self._waiting if r.id in changes.cancelled]:
                self._waiting.remove(request)
                request._finish("cancelled")
        if changes.stop and self._lockstep is not None and not self._lockstep.leads:
            self._stopping = True

    def _admit(self) -> list[_Sequence]:
        Lb = self.block_length
        admitted = []
        while self._waiting and self._free_slots:
            request = self._waiting[0]
            params, P = request.params, len(request.prompt)
            pages = self.pages_needed(P, params.gen_length)
            if pages > self.cache.free_pages:
                break
            self._waiting.popleft()
            slot = self._free_slots.pop()
            self.cache.allocate(slot, pages)
            num_blocks = -(-(P + params.gen_length) // Lb)
            x = request.prompt + [params.mask_id] * (num_blocks * Lb - P)
            admitted.append(_Sequence(request, slot, x, num_blocks, P // Lb,
                                      min_commit_schedule(Lb, params.steps)))
        self._running += admitted
        return admitted

    def _prefill(self, admitted: list[_Sequence]) -> None:
        """One packed forward over the whole prompt blocks of the admitted requests, into their pages."""
        Lb = self.block_length
        prefill = [s for s in admitted if s.block > 0]
        if not prefill:
            return
        lengths = [s.block * Lb for s in prefill]
        ids = torch.tensor([t for s in prefill for t in s.x[:s.block * Lb]], dtype=torch.int64)
        positions = torch.cat([torch.arange(n) for n in lengths])
        cu = torch.tensor([0] + lengths).cumsum(0)
        slots = torch.cat([self.cache.prefill_slots(s.slot, n) for s, n in zip(prefill, lengths)])
        ids, positions, slots = upload([ids, positions, slots], torch.int64, self.model.device)
        (cu,) = upload([cu], torch.int32, self.model.device)
        self.model.prefill(ids, cu, positions, max(lengths), Lb, self.cache, slots)
        self.stats.forward_passes += 1

    def _denoise(self) -> None:
        Lb, running, device = self.block_length, self._running, self.model.device
        B = len(running)
        padded = batch_bucket(B, self.max_running) if self._compiled else B
        slots = [s.slot for s in running] + [-1] * (padded - B)
        view = self.cache.decode_view(slots, [s.writing for s in running] + [False] * (padded - B), Lb)
        pad_token = running[0].params.mask_id
        ids = torch.tensor([s.block_tokens(Lb) for s in running] + [[pad_token] * Lb] * (padded - B),
                           dtype=torch.int64)                                                # [Bp, Lb]
        positions = view.seqlens.long()[:, None] + torch.arange(Lb)                          # [Bp, Lb]
        ids, positions, write_slots = upload([ids, positions.reshape(-1), view.write_slots], torch.int64, device)
        block_table, seqlens = upload([view.block_table, view.seqlens], torch.int32, device)
        logits = self._forward(ids, positions, self.cache, PagedBatch(block_table, seqlens, write_slots))[:B]
        self.stats.forward_passes += 1
        tokens, invalid = self._commit_rows(ids[:B], logits, running)
        rows = readback(torch.cat([tokens, invalid[:, None].long()], 1))                     # [B, Lb + 1]
        for s, row in zip(list(running), rows.tolist()):
            self._advance(s, row[:Lb], bool(row[Lb]))

    def _commit_rows(self, ids: torch.Tensor, logits: torch.Tensor,
                     running: list[_Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """New block tokens [B, Lb] (writing rows unchanged) and a per-row non-finite flag [B]: one batched
        commit_tokens call with each request's own parameters (one call per mask id in the batch)."""
        device = ids.device
        denoise = torch.tensor([not s.writing for s in running])
        ints = torch.tensor([[0 if s.writing else s.schedule[s.step], s.params.top_k, _int64(s.params.seed), s.draws]
                             for s in running], dtype=torch.int64)                          # [B, 4]
        floats = torch.tensor([[s.params.threshold, s.params.temperature, s.params.top_p] for s in running],
                              dtype=torch.float32)                                          # [B, 3]
        denoise, ints = upload([denoise, ints], torch.int64, device)
        (floats,) = upload([floats], torch.float32, device)
        tokens, invalid = ids.clone(), torch.zeros(len(running), dtype=torch.bool, device=device)
        for mask_id in sorted({s.params.mask_id for s in running}):
            rows = [i for i, s in enumerate(running) if s.params.mask_id == mask_id]
            pick = slice(None) if len(rows) == len(running) else torch.tensor(rows, device=device)
            result = self._commit(ids[pick], logits[pick], mask_id=mask_id, min_commit=ints[pick, 0].int(),
                                  top_k=ints[pick, 1].int(), seed=ints[pick, 2], offset=ints[pick, 3],
                                  threshold=floats[pick, 0], temperature=floats[pick, 1], top_p=floats[pick, 2],
                                  check_finite=False)
            tokens[pick] = result.tokens
            invalid[pick] = result.invalid
        keep = denoise.bool()
        return torch.where(keep[:, None], tokens, ids), invalid & keep

    # ---- host bookkeeping after the readback ------------------------------------------------------------

    def _advance(self, s: _Sequence, tokens: list[int], invalid: bool) -> None:
        Lb, p = self.block_length, s.params
        if s.writing:
            s.writing = False
            self.cache.advance(s.slot, Lb)
            s.block += 1
            return
        if invalid:
            self._end(s, "error", RequestError("the model's logits are not finite (NaN, or no finite value)"))
            return
        start = s.block * Lb
        before = s.x[start:start + Lb]
        s.x[start:start + Lb] = tokens
        s.step += 1
        s.draws += 1
        s.request.denoise_steps += 1
        self.stats.denoise_steps += 1
        if p.eos_early_stop and p.eos_id is not None and any(
                b == p.mask_id and t == p.eos_id for b, t in zip(before, tokens)) and self._early_stop(s):
            return
        if s.step >= p.steps or p.mask_id not in tokens:
            self._next_block(s)

    def _early_stop(self, s: _Sequence) -> bool:
        """Ends the request if its output has an EOS with no MASK before it."""
        p = s.params
        generated = s.x[len(s.request.prompt):]
        if p.eos_id in generated and p.mask_id not in generated[:generated.index(p.eos_id)]:
            self._end(s, "finished")
            return True
        return False

    def _next_block(self, s: _Sequence) -> None:
        """After a finished block: stop on EOS or at the last block, else store the block and move on."""
        end = (s.block + 1) * self.block_length
        p = s.params
        has_eos = p.eos_id is not None and p.eos_id in s.x[len(s.request.prompt):end]
        self._emit(s, end)
        s.step = 0
        if has_eos or s.block + 1 >= s.num_blocks:
            self._end(s, "finished")
        else:
            s.writing = True

    def _output(self, s: _Sequence, end: int) -> list[int]:
        p, P = s.params, len(s.request.prompt)
        out = s.x[P:min(end, P + p.gen_length)]
        if p.eos_id is not None and p.eos_id in out:
            out = out[:out.index(p.eos_id) + 1]
        return out

    def _emit(self, s: _Sequence, end: int) -> None:
        out = self._output(s, end)
        if len(out) > s.emitted:
            s.request._emit(out[s.emitted:])
            self.stats.tokens += len(out) - s.emitted
            s.emitted = len(out)

    def _end(self, s: _Sequence, reason: str, error: Optional[BaseException] = None) -> None:
        """Ends a request: "finished" (then "stop" if its output ends with EOS, else "length"), "cancelled"
        or "error"; its pages and slot are free at once."""
        if reason == "finished":
            self._emit(s, len(s.x))
            eos = s.params.eos_id
            reason = "stop" if eos is not None and s.request.tokens[-1:] == [eos] else "length"
        self._running.remove(s)
        self.cache.free(s.slot)
        self._free_slots.append(s.slot)
        s.request._finish(reason, error)


def _compile_forward(model, cache: PagedKVCache):
    """The step's forward under torch.compile(fullgraph=True); CUDA graphs on a GPU (batches are padded to a
    few sizes, see batch_bucket), with the page pools marked static: the graph writes them in place."""
    mode = None
    if model.device.type == "cuda":
        mode = "reduce-overhead"
        for pages in cache.k_pages + cache.v_pages:
            torch._dynamo.mark_static_address(pages)
    return torch.compile(model.forward_paged, fullgraph=True, dynamic=False, mode=mode)
