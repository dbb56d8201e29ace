"""Block-diffusion decoding (docs/ARCHITECTURE.md, Decoding): the official `generate()`, batched, with a KV cache.

    generate(model, prompts, *, gen_length=256, block_length=32, steps=32, threshold=0.95, temperature=0.0,
             top_k=0, top_p=1.0, eos_early_stop=False, mask_id=None, eos_id=None, use_cache=True, seed=0,
             stream=None) -> GenerateOutput(sequences, stats)

Each prompt gets MASK tokens up to a whole number of blocks; blocks are decoded left to right, each in up to
`steps` steps that commit tokens with `commit_tokens` under the official minimum schedule; a sequence stops
after a block that contains EOS and its output is cut just after the first EOS. Blocks wholly inside the
prompt are never denoised; the block holding the prompt's tail is, with the prompt tokens fixed.

use_cache=False recomputes each sequence's whole prefix at every step (the official way). use_cache=True
prefills the prompt's whole blocks once, runs only the current block of each sequence against its KV cache,
and writes a finished block into the cache with one more forward of that block (batched with the other
sequences' steps). Prompts are packed without padding; a finished sequence leaves the batch. Greedy decoding
gives every prompt the same tokens alone or in any batch, cached or not. Sampling draws prompt i's tokens from
the Philox stream of seed + i, step by step, so prompt i in a batch gets what it gets alone with seed + i,
with or without the cache.
"""
import dataclasses
import time
from typing import Callable, Optional, Sequence, Union

import torch

from .. import ops
from .kv_cache import KVCache
from .schedule import min_commit_schedule
from .validation import check_generate, stream_seed

StreamCallback = Callable[[int, list[int]], None]


@dataclasses.dataclass
class GenerateStats:
    forward_passes: int = 0    # model calls (prefill, denoising steps and cache writes; a batch counts once)
    denoise_steps: int = 0     # denoising steps summed over sequences
    tokens: int = 0            # tokens generated (outputs' lengths)
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens committed per denoising step of a sequence (TPF)."""
        return self.tokens / self.denoise_steps if self.denoise_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"{self.tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tokens/s), "
                f"{self.denoise_steps} steps, TPF {self.tokens_per_forward:.2f}, {self.forward_passes} forward passes")


@dataclasses.dataclass
class GenerateOutput:
    sequences: list[list[int]]   # per prompt: its generated tokens, through the first EOS if one was produced
    stats: GenerateStats


@dataclasses.dataclass
class _Sequence:
    index: int                   # position in the prompts list
    prompt_len: int
    x: torch.Tensor              # int64 [num_blocks * Lb]: prompt, then MASK, decoded in place
    block: int                   # block being decoded
    num_blocks: int
    step: int = 0                # denoising steps taken in the current block
    draws: int = 0               # commit calls so far (the sampling counter)
    emitted: int = 0             # output tokens already streamed
    done: bool = False
    writing: bool = False        # the current block is final and must be written into the cache

    def window_end(self, Lb: int) -> int:
        return (self.block + 1) * Lb

    def current(self, Lb: int) -> torch.Tensor:
        return self.x[self.block * Lb:(self.block + 1) * Lb]


def generate(model, prompts: Union[Sequence[int], Sequence[Sequence[int]]], *, gen_length: int = 256,
             block_length: int = 32, steps: int = 32, threshold: float = 0.95, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_early_stop: bool = False, mask_id: Optional[int] = None,
             eos_id: Optional[int] = None, use_cache: bool = True, seed: int = 0,
             stream: Optional[StreamCallback] = None) -> GenerateOutput:
    """Decodes every prompt by block diffusion; see the module docstring."""
    prompts, params = check_generate(
        model.config, prompts, use_cache=use_cache, stream=stream, gen_length=gen_length, block_length=block_length,
        steps=steps, threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eos_early_stop=eos_early_stop, mask_id=mask_id, eos_id=eos_id)
    (gen_length, block_length, steps, threshold, temperature, top_k, top_p, seed, eos_early_stop, mask_id,
     eos_id) = dataclasses.astuple(params)
    schedule = min_commit_schedule(block_length, steps)
    commit = ops.commit_tokens if model.backend == "kernels" else ops.commit_tokens_ref
    sampling = dict(threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p)
    device = model.device

    seqs = []
    for i, prompt in enumerate(prompts):
        num_blocks = (len(prompt) + gen_length + block_length - 1) // block_length
        x = torch.full((num_blocks * block_length,), mask_id, dtype=torch.int64, device=device)
        x[:len(prompt)] = torch.tensor(prompt, dtype=torch.int64, device=device)
        seqs.append(_Sequence(i, len(prompt), x, len(prompt) // block_length, num_blocks))
    stats = GenerateStats()
    run = _Run(model, seqs, block_length, steps, schedule, mask_id, eos_id, eos_early_stop, gen_length, commit,
               sampling, seed, stream, stats)
    started = time.perf_counter()
    with torch.no_grad():
        run.cached() if use_cache else run.uncached()
    stats.seconds = time.perf_counter() - started
    outputs = [run.output(s) for s in seqs]
    stats.tokens = sum(len(o) for o in outputs)
    return GenerateOutput(outputs, stats)


class _Run:
    """The decoding loop over a batch of sequences (state shared by the cached and uncached paths)."""

    def __init__(self, model, seqs, Lb, steps, schedule, mask_id, eos_id, eos_early_stop, gen_length, commit,
                 sampling, seed, stream, stats):
        self.model, self.seqs, self.Lb, self.steps, self.schedule = model, seqs, Lb, steps, schedule
        self.mask_id, self.eos_id, self.eos_early_stop, self.gen_length = mask_id, eos_id, eos_early_stop, gen_length
        self.commit_fn, self.sampling, self.seed, self.stream, self.stats = commit, sampling, seed, stream, stats

    def active(self) -> list[_Sequence]:
        return [s for s in self.seqs if not s.done]

    def uncached(self) -> None:
        while active := self.active():
            ends = [s.window_end(self.Lb) for s in active]
            ids = torch.cat([s.x[:end] for s, end in zip(active, ends)])                 # [T]
            cu = torch.tensor([0] + ends, dtype=torch.int64).cumsum(0).to(torch.int32).to(ids.device)
            logits = self.model(ids, cu, block_size=self.Lb, mask="block_causal")         # [T, V]
            self.stats.forward_passes += 1
            last = torch.cat([torch.arange(c - self.Lb, c) for c in cu[1:].tolist()]).to(ids.device)
            self.denoise(active, logits[last].view(len(active), self.Lb, -1))
            for s, finished in zip(active, self.blocks_finished(active)):
                if finished:
                    self.next_block(s)

    def cached(self) -> None:
        model, Lb = self.model, self.Lb
        active = self.active()
        if not active:
            return
        cfg = model.config
        longest = max(s.num_blocks for s in active) * Lb
        cache = KVCache(cfg.num_hidden_layers, len(active), longest, cfg.num_key_value_heads, cfg.head_dim,
                        model.dtype, model.device)
        prefill = [(row, s) for row, s in enumerate(active) if s.block > 0]
        if prefill:
            ids = torch.cat([s.x[:s.block * Lb] for _, s in prefill])
            cu = torch.tensor([0] + [s.block * Lb for _, s in prefill]).cumsum(0).to(torch.int32).to(ids.device)
            rows = torch.tensor([row for row, _ in prefill], device=ids.device)
            model.prefill(ids, cu, cache, rows, Lb)
            self.stats.forward_passes += 1
        slots = active
        while slots:
            writing = [row for row, s in enumerate(slots) if s.writing]
            ids = torch.stack([s.current(Lb) for s in slots])                                # [B, Lb]
            write_rows = torch.tensor(writing, dtype=torch.int64, device=ids.device) if writing else None
            logits = model.forward_cached(ids, cache, write_rows)                             # [B, Lb, V]
            self.stats.forward_passes += 1
            denoising = [row for row, s in enumerate(slots) if not s.writing]
            if denoising:
                self.denoise([slots[r] for r in denoising], logits[denoising])
            for s, finished in zip(slots, self.blocks_finished(slots)):
                if s.writing:
                    s.writing = False
                    s.block += 1
                elif finished:
                    self.next_block(s, writes_cache=True)
            keep = [row for row, s in enumerate(slots) if not s.done]
            if len(keep) < len(slots):
                cache.keep(torch.tensor(keep, dtype=torch.int64, device=ids.device))
                slots = [slots[r] for r in keep]

    def denoise(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """One commit step for each sequence from its block's logits [B, Lb, V]."""
        Lb = self.Lb
        tokens = torch.stack([s.current(Lb) for s in seqs])                                  # [B, Lb]
        min_commit = torch.tensor([self.schedule[s.step] for s in seqs], dtype=torch.int32, device=tokens.device)
        if self.sampling["temperature"] == 0.0:
            new = self.commit_fn(tokens, logits, mask_id=self.mask_id, min_commit=min_commit, **self.sampling)
            new_tokens, committed = new.tokens, new.committed
        else:
            # One call per sequence, so that each draws from its own stream: seed + prompt index, offset = step.
            parts = [self.commit_fn(tokens[i:i + 1], logits[i:i + 1].contiguous(), mask_id=self.mask_id,
                                    min_commit=min_commit[i:i + 1], seed=stream_seed(self.seed, s.index),
                                    offset=s.draws, **self.sampling) for i, s in enumerate(seqs)]
            new_tokens = torch.cat([p.tokens for p in parts])
            committed = torch.cat([p.committed for p in parts])
        eos_committed = [False] * len(seqs)
        if self.eos_early_stop and self.eos_id is not None:
            eos_committed = ((new_tokens == self.eos_id) & committed).any(1).tolist()      # one sync for the batch
        for i, s in enumerate(seqs):
            s.current(Lb).copy_(new_tokens[i])
            s.step += 1
            s.draws += 1
            self.stats.denoise_steps += 1
            if eos_committed[i]:
                self.early_stop(s)

    def early_stop(self, s: _Sequence) -> None:
        generated = s.x[s.prompt_len:]
        eos = (generated == self.eos_id).nonzero()
        if len(eos) and not bool((generated[:int(eos[0])] == self.mask_id).any()):
            self.finish(s)

    def blocks_finished(self, seqs: list[_Sequence]) -> list[bool]:
        """Per sequence: its block is done (no MASK left, or out of steps) and it is still running."""
        masked = (torch.stack([s.current(self.Lb) for s in seqs]) == self.mask_id).any(1).tolist()  # one sync
        return [not s.done and (s.step >= self.steps or not m) for s, m in zip(seqs, masked)]

    def next_block(self, s: _Sequence, writes_cache: bool = False) -> None:
        """After a finished block: stop on EOS or at the last block, else move on (through a cache write)."""
        end = s.window_end(self.Lb)
        has_eos = self.eos_id is not None and bool((s.x[s.prompt_len:end] == self.eos_id).any())
        self.emit(s, end)
        s.step = 0
        if has_eos or s.block + 1 >= s.num_blocks:
            self.finish(s)
        elif writes_cache:
            s.writing = True
        else:
            s.block += 1

    def finish(self, s: _Sequence) -> None:
        s.done = True
        self.emit(s, len(s.x))

    def output(self, s: _Sequence) -> list[int]:
        return self._decoded(s, len(s.x))

    def _decoded(self, s: _Sequence, end: int) -> list[int]:
        out = s.x[s.prompt_len:min(end, s.prompt_len + self.gen_length)].tolist()
        if self.eos_id is not None and self.eos_id in out:
            out = out[:out.index(self.eos_id) + 1]
        return out

    def emit(self, s: _Sequence, end: int) -> None:
        if self.stream is None:
            return
        out = self._decoded(s, end)
        if len(out) > s.emitted:
            self.stream(s.index, out[s.emitted:])
            s.emitted = len(out)
