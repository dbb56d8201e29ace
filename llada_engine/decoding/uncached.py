"""The reference decoding loop: the official LLaDA2.0 `generate()`, recomputing every sequence's whole prefix
at every step (no KV cache), batched over sequences packed without padding. `generate(use_cache=False)`
runs it; the tests hold the Engine (the cached path) to it token for token.
"""
import dataclasses

import torch

from .schedule import min_commit_schedule
from .stats import GenerateStats
from .validation import DecodeParams, stream_seed


@dataclasses.dataclass
class _Sequence:
    index: int                   # position in the prompts list
    prompt_len: int
    x: torch.Tensor              # int64 [num_blocks * Lb]: prompt, then MASK, decoded in place
    block: int                   # block being decoded
    num_blocks: int
    step: int = 0                # denoising steps taken in the current block
    draws: int = 0               # commit calls so far (the sampling offset)
    emitted: int = 0             # output tokens already streamed
    done: bool = False

    def current(self, Lb: int) -> torch.Tensor:
        return self.x[self.block * Lb:(self.block + 1) * Lb]


def generate_uncached(model, prompts: list[list[int]], params: DecodeParams, commit, stream,
                      stats: GenerateStats) -> list[list[int]]:
    """Decodes every prompt (prompt i samples with seed params.seed + i); returns the outputs."""
    Lb, device, p = params.block_length, model.device, params
    schedule = min_commit_schedule(Lb, p.steps)
    seqs = []
    for i, prompt in enumerate(prompts):
        num_blocks = (len(prompt) + p.gen_length + Lb - 1) // Lb
        x = torch.full((num_blocks * Lb,), p.mask_id, dtype=torch.int64, device=device)
        x[:len(prompt)] = torch.tensor(prompt, dtype=torch.int64, device=device)
        seqs.append(_Sequence(i, len(prompt), x, len(prompt) // Lb, num_blocks))

    def output(s: _Sequence, end: int) -> list[int]:
        out = s.x[s.prompt_len:min(end, s.prompt_len + p.gen_length)].tolist()
        if p.eos_id is not None and p.eos_id in out:
            out = out[:out.index(p.eos_id) + 1]
        return out

    def emit(s: _Sequence, end: int) -> None:
        out = output(s, end)
        if stream is not None and len(out) > s.emitted:
            stream(s.index, out[s.emitted:])
        s.emitted = max(s.emitted, len(out))

    def finish(s: _Sequence) -> None:
        s.done = True
        emit(s, len(s.x))

    while active := [s for s in seqs if not s.done]:
        ends = [(s.block + 1) * Lb for s in active]
        ids = torch.cat([s.x[:end] for s, end in zip(active, ends)])                 # [T]
        cu = torch.tensor([0] + ends, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        logits = model(ids, cu, block_size=Lb, mask="block_causal")                   # [T, V]
        stats.forward_passes += 1
        for s, end in zip(active, cu[1:].tolist()):
            block_logits = logits[end - Lb:end].unsqueeze(0)                          # [1, Lb, V]
            before = s.current(Lb).clone()
            new = commit(before.unsqueeze(0), block_logits.contiguous(), mask_id=p.mask_id,
                         threshold=p.threshold, min_commit=schedule[s.step], temperature=p.temperature,
                         top_k=p.top_k, top_p=p.top_p, seed=stream_seed(p.seed, s.index), offset=s.draws).tokens[0]
            s.current(Lb).copy_(new)
            s.step += 1
            s.draws += 1
            stats.denoise_steps += 1
            if p.eos_early_stop and p.eos_id is not None and bool(((before == p.mask_id) & (new == p.eos_id)).any()):
                generated = s.x[s.prompt_len:].tolist()
                if p.mask_id not in generated[:generated.index(p.eos_id)]:
                    finish(s)
                    continue
            if s.step >= p.steps or not bool((new == p.mask_id).any()):
                end_of_block = (s.block + 1) * Lb
                has_eos = p.eos_id is not None and bool((s.x[s.prompt_len:end_of_block] == p.eos_id).any())
                emit(s, end_of_block)
                s.step = 0
                if has_eos or s.block + 1 >= s.num_blocks:
                    finish(s)
                else:
                    s.block += 1
    return [output(s, len(s.x)) for s in seqs]
