"""PagedKVCache: pages are reserved and returned whole, a sequence's rows land where its block table says,
rows that store nothing go to the scratch page, and bad requests of the cache are refused by name."""
import pytest
import torch

from llada_engine.decoding.paged_cache import SCRATCH_PAGE, PagedKVCache


def make(num_pages=6, page_size=8, max_slots=3, max_pages=4):
    return PagedKVCache(2, num_pages, page_size, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu",
                        max_slots=max_slots, max_pages=max_pages)


def test_pages_are_reserved_and_returned():
    cache = make()
    cache.allocate(0, 3)
    cache.allocate(2, 2)
    assert cache.free_pages == 1 and cache.used_pages == 5
    with pytest.raises(ValueError, match="2 pages asked, 1 free"):
        cache.allocate(1, 2)
    with pytest.raises(ValueError, match="slot 0 is in use"):
        cache.allocate(0, 1)
    cache.free(0)
    assert cache.free_pages == 4
    cache.allocate(1, 4)
    assert cache.free_pages == 0
    view = cache.decode_view([1, 2], [False, False], 8)
    pages_1, pages_2 = view.block_table.tolist()
    assert len(set(pages_1) | set(pages_2[:2])) == 6 and SCRATCH_PAGE not in pages_1 + pages_2[:2]
    assert pages_2[2:] == [SCRATCH_PAGE] * 2


def test_rows_land_where_the_block_table_says():
    cache = make(page_size=8)
    cache.allocate(1, 3)
    slots = cache.prefill_slots(1, 16)                                 # two pages of prompt
    k = torch.randn(16, 2, 4)
    v = torch.randn(16, 2, 4)
    cache.update(0, k, v, slots)
    table = cache.decode_view([1], [False], 8).block_table[0]
    for r in range(16):
        assert torch.equal(cache.k_pages[0][table[r // 8], r % 8], k[r])
        assert torch.equal(cache.v_pages[0][table[r // 8], r % 8], v[r])
    assert cache.length(1) == 16
    view = cache.decode_view([1, -1], [True, False], 8)                # a writing sequence and a padding row
    assert view.seqlens.tolist() == [16, 0]
    assert view.write_slots[:8].tolist() == (table[2] * 8 + torch.arange(8)).tolist()
    assert view.write_slots[8:].tolist() == (SCRATCH_PAGE * 8 + torch.arange(8)).tolist()
    assert view.block_table[1].tolist() == [SCRATCH_PAGE] * 4
    cache.advance(1, 8)
    assert cache.length(1) == 24
    with pytest.raises(ValueError, match="cannot advance past its pages"):
        cache.advance(1, 8)


def test_page_holding_several_blocks():
    cache = make(page_size=8)
    cache.allocate(0, 2)
    cache.prefill_slots(0, 4)
    view = cache.decode_view([0], [True], 4)
    page = view.block_table[0, 0].item()
    assert view.write_slots.tolist() == [page * 8 + 4 + i for i in range(4)]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="page_size must be a positive multiple of 8"):
        make(page_size=12)
    with pytest.raises(ValueError, match="max_pages"):
        make(max_pages=0)
    cache = make()
    with pytest.raises(ValueError, match="at most 4 per sequence"):
        cache.allocate(0, 5)
    with pytest.raises(ValueError, match=r"slot 3 outside \[0, 3\)"):
        cache.allocate(3, 1)
    cache.allocate(0, 1)
    cache.prefill_slots(0, 8)
    with pytest.raises(ValueError, match="prefill writes an empty sequence"):
        cache.prefill_slots(0, 8)
    assert PagedKVCache.bytes_per_token(4, 2, 64, torch.bfloat16) == 2 * 4 * 2 * 64 * 2
