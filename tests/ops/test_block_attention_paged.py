"""The paged form of block_attention_decode (block_table into page pools) against the contiguous form: the same
logical cache rows laid out in shuffled pages of a shared pool, with pages nobody owns, a page two sequences
share, unused table entries of -1 and NaN everywhere the op must not read; ragged lengths with empty caches,
page sizes 8 to 64, GQA, fp32 and bf16. On the CPU the two forms give the same bits, and every sequence gets
the same bits alone as in the batch; both match the reference. Bad tables are rejected by name, values on a
GPU are trusted (clamped, never read out of bounds), and the op compiles with fullgraph=True."""
import pytest
import torch

from llada_engine.ops import block_attention_decode, block_attention_decode_ref
from op_testing import assert_close_to_reference

pytestmark = pytest.mark.kernels

PAGE_SIZES = [8, 16, 32, 64]
CASES = [("cpu", torch.float32), ("cpu", torch.bfloat16),
         pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
         pytest.param("cuda", torch.float16, marks=pytest.mark.gpu)]


def paged_case(lens, *, page_size, Lb=5, heads=(8, 2), D=16, max_pages=None, spare_pages=3, share=True,
               device="cpu", dtype=torch.float32, seed=0):
    """Random decode inputs with the cache both contiguous and paged. Returns (q, k_new, v_new, lens,
    contiguous (k, v) [B, Smax, Hkv, D], paged (k_pool, v_pool) [num_pages, page_size, Hkv, D], block_table).
    Rows past a length, pages nobody owns and the tail of a last page hold NaN; unused table entries are -1.
    With `share`, the last sequence's first page is the first sequence's (their first page_size rows agree)."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    B = len(lens)
    pages_of = [-(-n // page_size) for n in lens]
    max_pages = max_pages or max(max(pages_of), 1)
    smax = max_pages * page_size
    nan = float("nan")
    k = torch.full((B, smax, hkv, D), nan)
    v = torch.full((B, smax, hkv, D), nan)
    for b, n in enumerate(lens):
        k[b, :n] = torch.randn(n, hkv, D, generator=g)
        v[b, :n] = torch.randn(n, hkv, D, generator=g)
    shared = share and B > 1 and lens[0] >= page_size and lens[-1] >= page_size
    if shared:
        k[-1, :page_size] = k[0, :page_size]
        v[-1, :page_size] = v[0, :page_size]
    owned = sum(pages_of) - (1 if shared else 0)
    num_pages = owned + spare_pages
    ids = torch.randperm(num_pages, generator=g)
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    k_pool = torch.full((num_pages, page_size, hkv, D), nan)
    v_pool = torch.full((num_pages, page_size, hkv, D), nan)
    next_id = 0
    for b, n in enumerate(lens):
        for i in range(pages_of[b]):
            if shared and b == B - 1 and i == 0:
                table[b, 0] = table[0, 0]
                continue
            page = int(ids[next_id])
            next_id += 1
            table[b, i] = page
            rows = slice(i * page_size, min((i + 1) * page_size, n))
            k_pool[page, :rows.stop - rows.start] = k[b, rows]
            v_pool[page, :rows.stop - rows.start] = v[b, rows]
    q = torch.randn(B, Lb, hq, D, generator=g)
    k_new = torch.randn(B, Lb, hkv, D, generator=g)
    v_new = torch.randn(B, Lb, hkv, D, generator=g)
    to = dict(device=device, dtype=dtype)
    return (q.to(**to), k_new.to(**to), v_new.to(**to), torch.tensor(lens, dtype=torch.int32),
            (k.to(**to), v.to(**to)), (k_pool.to(**to), v_pool.to(**to)), table)


LENGTHS = [[0, 37, 64, 1, 100], [0], [130, 0, 0, 9]]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("lens", LENGTHS, ids=lambda lens: "-".join(map(str, lens)))
def test_paged_equals_contiguous(device, dtype, page_size, lens):
    D = 16 if device == "cpu" else 64
    q, k_new, v_new, seqlens, (k, v), (k_pool, v_pool), table = paged_case(
        lens, page_size=page_size, D=D, device=device, dtype=dtype, seed=page_size + len(lens))
    out, lse = block_attention_decode(q, k, v, seqlens.to(device), k_new, v_new, return_lse=True)
    paged, paged_lse = block_attention_decode(q, k_pool, v_pool, seqlens.to(device), k_new, v_new,
                                              return_lse=True, block_table=table.to(device))
    assert torch.equal(paged, out) and torch.equal(paged_lse, lse), "the paged and contiguous forms differ"
    assert torch.isfinite(paged.float()).all(), "a NaN row that must not be read was read"
    ref, ref_lse = block_attention_decode_ref(q.float(), k_pool.float(), v_pool.float(), seqlens, k_new.float(),
                                              v_new.float(), return_lse=True, block_table=table)
    ref_lowp = block_attention_decode_ref(q, k_pool, v_pool, seqlens, k_new, v_new, block_table=table)
    assert_close_to_reference(paged, ref, ref_lowp if dtype != torch.float32 else None, atol=1e-5)
    assert_close_to_reference(paged_lse, ref_lse, atol=1e-4, name="lse")


@pytest.mark.parametrize("device,dtype", CASES)
def test_each_sequence_alone_equals_its_row_in_the_batch(device, dtype):
    D = 16 if device == "cpu" else 64
    q, k_new, v_new, seqlens, _, (k_pool, v_pool), table = paged_case(
        [70, 0, 700, 16, 1500], page_size=16, D=D, device=device, dtype=dtype, seed=3)
    batch = block_attention_decode(q, k_pool, v_pool, seqlens, k_new, v_new, block_table=table)
    for b in range(len(seqlens)):
        pages = max(1, -(-int(seqlens[b]) // 16))  # its own table only as wide as it needs
        alone = block_attention_decode(q[b:b + 1], k_pool, v_pool, seqlens[b:b + 1], k_new[b:b + 1],
                                       v_new[b:b + 1], block_table=table[b:b + 1, :pages])
        assert torch.equal(alone[0], batch[b]), f"sequence {b} alone differs from its row in the batch"


def test_paged_reference_equals_contiguous_reference():
    q, k_new, v_new, seqlens, (k, v), (k_pool, v_pool), table = paged_case([5, 0, 40], page_size=8, seed=4)
    assert torch.equal(block_attention_decode_ref(q, k_pool, v_pool, seqlens, k_new, v_new, block_table=table),
                       block_attention_decode_ref(q, k, v, seqlens, k_new, v_new))


def test_table_wider_than_needed_and_length_one_block():
    q, k_new, v_new, seqlens, (k, v), (k_pool, v_pool), table = paged_case(
        [9, 24, 1], page_size=8, Lb=1, heads=(4, 4), max_pages=7, seed=5)
    out = block_attention_decode(q, k, v, seqlens, k_new, v_new)
    assert torch.equal(block_attention_decode(q, k_pool, v_pool, seqlens, k_new, v_new, block_table=table), out)


def _bad_call(change):
    q, k_new, v_new, seqlens, _, (k_pool, v_pool), table = paged_case([10, 3], page_size=8, spare_pages=1, seed=6)
    kw = dict(q=q, k_cache=k_pool, v_cache=v_pool, cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
              block_table=table)
    for key, value in change.items():
        kw[key] = value(kw[key]) if callable(value) else value
    return kw


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize("change,match", [
    (dict(block_table=lambda t: _set(t, (0, 1), 4)), r"block_table\[0, 1\] = 4 is not a page of k_cache \(num_pages = 4\)"),
    (dict(block_table=lambda t: _set(t, (1, 0), -1)), r"block_table\[1, 0\] = -1 is not a page of k_cache"),
    (dict(cache_seqlens=torch.tensor([10, 17], dtype=torch.int32)),
     r"cache_seqlens\[1\] = 17 is outside \[0, max_pages \* page_size = 16\]"),
    (dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), r"cache_seqlens\[0\] = -1 is outside"),
    (dict(block_table=lambda t: t.long()), "block_table must be int32"),
    (dict(block_table=lambda t: t[:1]), r"block_table must be \[B, max_pages\] with B = 2"),
    (dict(block_table=lambda t: t[0]), r"block_table must be \[B, max_pages\]"),
    (dict(k_cache=lambda t: t[:, :4], v_cache=lambda t: t[:, :4]), "page size .* must be a positive multiple of 8, got 4"),
    (dict(k_cache=lambda t: torch.cat([t, t[:, :4]], 1), v_cache=lambda t: torch.cat([t, t[:, :4]], 1)),
     "multiple of 8, got 12"),
    (dict(v_cache=lambda t: t[:2]), "v_cache must have the shape of k_cache"),
    (dict(k_cache=lambda t: t[..., :8], v_cache=lambda t: t[..., :8]),
     r"k_cache must be \[num_pages, page_size, Hkv, D\] with D = 16"),
])
def test_bad_tables_are_named(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        block_attention_decode(**_bad_call(change))


def test_entries_past_a_sequence_pages_are_never_checked():
    kw = _bad_call(dict(block_table=lambda t: _set(t, (1, 1), 12345)))  # sequence 1 has 3 rows: one page
    block_attention_decode(**kw)


def test_compiles_without_graph_break():
    q, k_new, v_new, seqlens, (k, v), (k_pool, v_pool), table = paged_case([20, 0, 9], page_size=8, seed=7)

    def step(q, k_pool, v_pool, seqlens, k_new, v_new, table):
        out, lse = block_attention_decode(q, k_pool, v_pool, seqlens, k_new, v_new, block_table=table,
                                          return_lse=True)
        return out * 2.0, lse

    # aot_eager: dynamo (no graph break) and the fake implementation under functionalisation, without the
    # inductor code generation that would cost ~15 s here and adds nothing about this op.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k_pool, v_pool, seqlens, k_new, v_new, table)
    want, want_lse = block_attention_decode(q, k, v, seqlens, k_new, v_new, return_lse=True)
    assert torch.equal(out, want * 2.0) and torch.equal(lse, want_lse)


@pytest.mark.gpu
def test_cuda_index_tensors_on_the_device_are_trusted_and_clamped():
    q, k_new, v_new, seqlens, (k, v), (k_pool, v_pool), table = paged_case(
        [40, 0, 17], page_size=8, D=64, device="cuda", dtype=torch.bfloat16, seed=8)
    want = block_attention_decode(q, k_pool, v_pool, seqlens, k_new, v_new, block_table=table)
    on_device = block_attention_decode(q, k_pool, v_pool, seqlens.cuda(), k_new, v_new, block_table=table.cuda())
    assert torch.equal(on_device, want)
    # Host lengths with a device table: the lengths are checked, the table trusted.
    assert torch.equal(block_attention_decode(q, k_pool, v_pool, seqlens, k_new, v_new, block_table=table.cuda()),
                       want)
    # Out-of-range device values are not detected, but nothing outside the pools is read.
    bad_table = _set(table, (0, 0), 10_000).cuda()
    bad_lens = torch.tensor([10_000, -3, 17], dtype=torch.int32, device="cuda")
    block_attention_decode(q, k_pool, v_pool, bad_lens, k_new, v_new, block_table=bad_table)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[3000], [2900, 0, 64, 511, 512, 513]])
def test_cuda_split_keys_paged_and_batch_invariant(lens):
    # Keys past 512 are split into runs of 512: a sequence alone and in a batch with longer ones (more runs in
    # the grid) gets the same bits; the paged form equals the contiguous one.
    q, k_new, v_new, seqlens, (k, v), (k_pool, v_pool), table = paged_case(
        lens, page_size=32, Lb=32, heads=(16, 4), D=128, device="cuda", dtype=torch.bfloat16, seed=9)
    out, lse = block_attention_decode(q, k_pool, v_pool, seqlens, k_new, v_new, block_table=table, return_lse=True)
    cont, cont_lse = block_attention_decode(q, k, v, seqlens, k_new, v_new, return_lse=True)
    assert torch.equal(out, cont) and torch.equal(lse, cont_lse)
    ref, ref_lse = block_attention_decode_ref(q.float(), k.float(), v.float(), seqlens, k_new.float(),
                                              v_new.float(), return_lse=True)
    assert_close_to_reference(out, ref, block_attention_decode_ref(q, k, v, seqlens, k_new, v_new), name="out")
    assert_close_to_reference(lse, ref_lse, atol=1e-3, name="lse")
    for b in range(len(lens)):
        alone = block_attention_decode(q[b:b + 1], k_pool, v_pool, seqlens[b:b + 1], k_new[b:b + 1],
                                       v_new[b:b + 1], block_table=table[b:b + 1])
        assert torch.equal(alone[0], out[b]), f"sequence {b} alone differs from its row in the batch"
