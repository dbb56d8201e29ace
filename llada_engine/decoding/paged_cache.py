"""The paged KV cache of block-diffusion decoding: the one owner of every cached key and value.

    cache = PagedKVCache(num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype, device,
                         max_slots=16, max_pages=128)
    cache.allocate(slot, num_pages)      # reserve every page a sequence can ever need (admission)
    cache.prefill_slots(slot, n)         # flat cache slots of the sequence's first n rows (prefill writes)
    cache.decode_view(slots, writing, block_length)   # what one decode forward reads and writes (host tensors)
    cache.update(layer, k, v, slots)     # called by attention: store rows of K/V at flat cache slots
    cache.advance(slot, n); cache.free(slot)

Layout: per layer a pool `k_pages[layer]`, `v_pages[layer]` [num_pages + 1, page_size, Hkv, D]; page 0 is a
scratch page that is never handed out (rows that store nothing this step write there, so that a step's shapes
never depend on which sequences finish a block). A sequence lives in a slot (a row of the block table): its
cached row r is at page `table[slot, r // page_size]`, row `r % page_size`, for r < its length. The Engine
makes a page one block (page_size = block_length), so a finished block fills exactly one page: nothing is ever
copied or compacted. The block table and the lengths live on the host (the scheduler's bookkeeping, where
every value check happens); a step uploads the rows of its batch with the rest of its inputs.
"""
import dataclasses
from typing import Sequence

import torch

SCRATCH_PAGE = 0


@dataclasses.dataclass
class PagedBatch:
    """What one decode forward of B sequences (the current block of Lb rows each) needs from the cache:
    built on the host by `decode_view`, uploaded by the step."""
    block_table: torch.Tensor   # int32 [B, max_pages]: the pages of each sequence
    seqlens: torch.Tensor       # int32 [B]: cached rows of each sequence
    write_slots: torch.Tensor   # int64 [B * Lb]: flat cache slot each row's K/V is stored at (scratch if none)


class PagedKVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, *, max_slots: int, max_pages: int):
        if num_pages < 0 or page_size < 1 or page_size % 8 or max_slots < 1 or max_pages < 1:
            raise ValueError(f"PagedKVCache: page_size must be a positive multiple of 8, num_pages >= 0, "
                             f"max_slots and max_pages >= 1, got page_size={page_size}, num_pages={num_pages}, "
                             f"max_slots={max_slots}, max_pages={max_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        self.device = torch.device(device)
        shape = (num_pages + 1, page_size, num_kv_heads, head_dim)
        self.k_pages = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pages = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_pages = max_pages                                  # block table width: pages of one sequence
        self._free = list(range(num_pages, 0, -1))                  # a stack: pages 1..num_pages
        self._pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._max_slots = max_slots
        self._table = torch.full((max_slots, max_pages), SCRATCH_PAGE, dtype=torch.int32)   # host

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of cache one token takes: K and V of every layer."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def allocate(self, slot: int, num_pages: int) -> None:
        """Reserves `num_pages` pages for the sequence in `slot` (which must be free) and writes its row of
        the block table."""
        if slot in self._pages:
            raise ValueError(f"PagedKVCache: slot {slot} is in use")
        if not 0 <= slot < self._max_slots:
            raise ValueError(f"PagedKVCache: slot {slot} outside [0, {self._max_slots})")
        if num_pages > min(len(self._free), self.max_pages):
            raise ValueError(f"PagedKVCache: {num_pages} pages asked, {len(self._free)} free, at most "
                             f"{self.max_pages} per sequence")
        pages = [self._free.pop() for _ in range(num_pages)]
        self._pages[slot] = pages
        self._lengths[slot] = 0
        self._table[slot] = SCRATCH_PAGE
        self._table[slot, :num_pages] = torch.tensor(pages, dtype=torch.int32)

    def free(self, slot: int) -> None:
        """Returns the sequence's pages to the pool; its slot can be allocated again."""
        pages = self._pages.pop(slot)
        del self._lengths[slot]
        self._table[slot] = SCRATCH_PAGE
        self._free.extend(reversed(pages))

    def _slots_of(self, slot: int, start: int, count: int) -> torch.Tensor:
        """Flat cache slots (page * page_size + row) of rows [start, start + count) of a sequence."""
        pages = self._pages[slot]
        if start + count > len(pages) * self.page_size:
            raise ValueError(f"PagedKVCache: rows [{start}, {start + count}) of slot {slot} exceed its "
                             f"{len(pages)} pages")
        rows = torch.arange(start, start + count)
        return torch.tensor(pages, dtype=torch.int64)[rows // self.page_size] * self.page_size + rows % self.page_size

    def prefill_slots(self, slot: int, count: int) -> torch.Tensor:
        """Flat cache slots int64 [count] (host) of the first `count` rows of a fresh sequence; its length
        becomes `count`."""
        if self._lengths[slot] != 0:
            raise ValueError(f"PagedKVCache: prefill writes an empty sequence, slot {slot} has length "
                             f"{self._lengths[slot]}")
        slots = self._slots_of(slot, 0, count)
        self._lengths[slot] = count
        return slots

    def decode_view(self, slots: Sequence[int], writing: Sequence[bool], block_length: int) -> PagedBatch:
        """The cache as a decode forward over `slots` sees it. A sequence that is `writing` stores its block's
        K/V at its next rows (the caller advances it after the forward); the others store theirs in the
        scratch page. A slot of -1 is padding: no pages, no cached rows."""
        seqlens = torch.tensor([self._lengths[s] if s >= 0 else 0 for s in slots], dtype=torch.int32)
        scratch = torch.arange(block_length, dtype=torch.int64) % self.page_size + SCRATCH_PAGE * self.page_size
        write = [self._slots_of(s, self._lengths[s], block_length) if s >= 0 and w else scratch
                 for s, w in zip(slots, writing)]
        table = torch.stack([self._table[s] if s >= 0 else torch.full_like(self._table[0], SCRATCH_PAGE)
                             for s in slots])
        return PagedBatch(table, seqlens, torch.cat(write))

    def advance(self, slot: int, count: int) -> None:
        """The sequence's next `count` rows now hold finished tokens (written by the last forward)."""
        if self._lengths[slot] + count > len(self._pages[slot]) * self.page_size:
            raise ValueError(f"PagedKVCache: slot {slot} cannot advance past its pages")
        self._lengths[slot] += count

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Stores k, v [N, Hkv, D] at the flat cache slots `slots` int64 [N] of layer `layer`."""
        self.k_pages[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v_pages[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)
