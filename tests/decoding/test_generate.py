"""generate() against an independent statement of the official uncached generate(), and against itself:
cached equals uncached, a batch equals each prompt alone, for greedy and seeded sampling, over random prompts
and settings; EOS, early stop, streaming and the official edge cases; on a GPU, cached and full block logits
against fp32 and a batch decoded with and without the cache."""
import random

import pytest
import torch

import llada_engine
from llada_engine.decoding import min_commit_schedule
from llada_engine.decoding.paged_cache import PagedBatch, PagedKVCache
from model_testing import tiny_checkpoint
from official_llada2 import official_generate

pytestmark = pytest.mark.kernels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, cfg, sd = tiny_checkpoint(tmp_path_factory.mktemp("gen"), seed=11)
    return llada_engine.load_model(path), cfg, sd


def random_prompts(n, cfg, seed, max_len=40):
    rng = random.Random(seed)
    return [[rng.randrange(cfg["vocab_size"] - 2) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def test_schedule_is_the_official_one():
    assert min_commit_schedule(32, 32) == [1] * 32
    assert min_commit_schedule(32, 5) == [7, 7, 6, 6, 6]
    assert min_commit_schedule(4, 8) == [1, 1, 1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("block_length,steps,threshold", [(4, 4, 0.9), (8, 3, 0.5), (32, 32, 0.95), (8, 8, 0.99)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_official(tiny, block_length, steps, threshold, use_cache):
    model, cfg, sd = tiny
    for prompt in random_prompts(3, cfg, seed=block_length * 7 + steps):
        kw = dict(gen_length=21, block_length=block_length, steps=steps, threshold=threshold)
        want = official_generate(sd, cfg, prompt, mask_id=cfg["mask_token_id"], eos_id=cfg["eos_token_id"], **kw)
        got = llada_engine.generate(model, prompt, use_cache=use_cache, **kw)
        assert got.sequences == [want]


SETTINGS = [dict(block_length=4, steps=4, threshold=0.5), dict(block_length=8, steps=5, threshold=0.9),
            dict(block_length=32, steps=16, threshold=0.99), dict(block_length=8, steps=8, threshold=0.7,
                                                                  temperature=0.9, top_k=20, seed=3),
            dict(block_length=4, steps=2, threshold=0.8, temperature=1.0, top_p=0.9, seed=5)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_cached_equals_uncached_and_batch_equals_single(tiny, settings):
    model, cfg, _ = tiny
    prompts = random_prompts(5, cfg, seed=hash(tuple(settings.items())) % 1000)
    cached = llada_engine.generate(model, prompts, gen_length=30, use_cache=True, **settings)
    uncached = llada_engine.generate(model, prompts, gen_length=30, use_cache=False, **settings)
    assert cached.sequences == uncached.sequences
    for i, prompt in enumerate(prompts):
        alone_settings = dict(settings, seed=settings.get("seed", 0) + i)   # prompt i samples with seed + i
        alone = llada_engine.generate(model, prompt, gen_length=30, use_cache=True, **alone_settings)
        assert alone.sequences[0] == cached.sequences[i]
    assert cached.stats.denoise_steps == uncached.stats.denoise_steps
    assert cached.stats.tokens == sum(len(s) for s in cached.sequences)


def test_eos_cuts_and_stops(tiny):
    model, cfg, sd = tiny
    prompt = random_prompts(1, cfg, seed=21)[0]
    free = llada_engine.generate(model, prompt, gen_length=40, block_length=8, steps=8, eos_id=cfg["vocab_size"] - 2)
    eos = free.sequences[0][13]   # a token the model produces in the third block: make it EOS
    kw = dict(gen_length=40, block_length=8, steps=8, threshold=0.95)
    out = llada_engine.generate(model, prompt, eos_id=eos, **kw).sequences[0]
    assert out[-1] == eos and eos not in out[:-1]
    assert out == official_generate(sd, cfg, prompt, mask_id=cfg["mask_token_id"], eos_id=eos, **kw)
    early = llada_engine.generate(model, prompt, eos_id=eos, eos_early_stop=True, **kw)
    assert early.sequences[0][-1] == eos and early.stats.denoise_steps <= llada_engine.generate(
        model, prompt, eos_id=eos, **kw).stats.denoise_steps


def test_proposed_mask_token_stays_masked(tiny):
    model, cfg, sd = tiny
    prompt = random_prompts(1, cfg, seed=22)[0]
    free = llada_engine.generate(model, prompt, gen_length=16, block_length=8, steps=8).sequences[0]
    mask_id = free[3]   # a token the model proposes: as MASK it is written back and the position stays masked
    kw = dict(gen_length=16, block_length=8, steps=8, threshold=0.95)
    want = official_generate(sd, cfg, prompt, mask_id=mask_id, eos_id=cfg["eos_token_id"], **kw)
    for use_cache in (True, False):
        assert llada_engine.generate(model, prompt, mask_id=mask_id, use_cache=use_cache, **kw).sequences == [want]


def test_prompt_edge_cases(tiny):
    model, cfg, sd = tiny
    for prompt_len, gen_length in ((8, 5), (16, 16), (3, 1), (13, 70)):
        prompt = list(range(1, prompt_len + 1))
        kw = dict(gen_length=gen_length, block_length=8, steps=64, threshold=0.9)
        want = official_generate(sd, cfg, prompt, mask_id=cfg["mask_token_id"], eos_id=cfg["eos_token_id"], **kw)
        got = llada_engine.generate(model, [prompt, prompt[:2]], **kw)
        assert got.sequences[0] == want
        assert len(got.sequences[0]) <= gen_length


def test_streaming_delivers_the_output_block_by_block(tiny):
    model, cfg, _ = tiny
    prompts = random_prompts(3, cfg, seed=23)
    chunks = {i: [] for i in range(3)}
    out = llada_engine.generate(model, prompts, gen_length=20, block_length=8, steps=4,
                                stream=lambda i, toks: chunks[i].append(list(toks)))
    for i in range(3):
        assert sum(chunks[i], []) == out.sequences[i]
        assert all(len(c) <= 8 + 7 for c in chunks[i])


def test_stats(tiny):
    model, cfg, _ = tiny
    out = llada_engine.generate(model, random_prompts(2, cfg, seed=24), gen_length=16, block_length=8, steps=8)
    s = out.stats
    assert s.tokens == sum(map(len, out.sequences)) and s.denoise_steps >= 2 and s.forward_passes >= 2
    assert s.tokens_per_forward == s.tokens / s.denoise_steps and s.tokens_per_second > 0
    assert "TPF" in str(s)


def test_bad_arguments(tiny):
    model, cfg, _ = tiny
    with pytest.raises(ValueError, match="prompts is empty"):
        llada_engine.generate(model, [])
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        llada_engine.generate(model, [[1], []])
    with pytest.raises(ValueError, match=r"prompts\[0\] has token ids outside"):
        llada_engine.generate(model, [[1, 500]])
    with pytest.raises(ValueError, match="gen_length must be a positive int"):
        llada_engine.generate(model, [1, 2], gen_length=0)
    with pytest.raises(ValueError, match="mask_id"):
        llada_engine.generate(model, [1, 2], mask_id=1000)


def last_block_logits(model, seqs, Lb, *, cached):
    """Logits [B, Lb, V] (fp32, on the CPU) of each sequence's last block: the full forward, or the block
    against a paged KV cache that prefill filled with the sequence's earlier blocks."""
    device, cfg = model.device, model.config
    if not cached:
        ids = torch.cat(seqs).to(device)
        cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32).to(device)
        logits = model(ids, cu, block_size=Lb)                                                  # [T, V]
        return torch.stack([logits[int(end) - Lb:int(end)] for end in cu[1:]]).float().cpu()
    pages = sum(len(s) // Lb for s in seqs)
    cache = PagedKVCache(cfg.num_hidden_layers, pages, Lb, cfg.num_key_value_heads, cfg.head_dim, model.dtype,
                         device, max_slots=len(seqs), max_pages=max(len(s) for s in seqs) // Lb)
    for slot, s in enumerate(seqs):
        cache.allocate(slot, len(s) // Lb)
    earlier = [(slot, s[:-Lb]) for slot, s in enumerate(seqs) if len(s) > Lb]
    ids = torch.cat([s for _, s in earlier]).to(device)
    cu = torch.tensor([0] + [len(s) for _, s in earlier]).cumsum(0).to(torch.int32).to(device)
    positions = torch.cat([torch.arange(len(s)) for _, s in earlier]).to(device)
    slots = torch.cat([cache.prefill_slots(slot, len(s)) for slot, s in earlier]).to(device)
    model.prefill(ids, cu, positions, max(len(s) for _, s in earlier), Lb, cache, slots)
    view = cache.decode_view(list(range(len(seqs))), [False] * len(seqs), Lb)
    batch = PagedBatch(view.block_table.to(device), view.seqlens.to(device), view.write_slots.to(device))
    positions = (view.seqlens.long()[:, None] + torch.arange(Lb)).reshape(-1).to(device)
    return model.forward_paged(torch.stack([s[-Lb:] for s in seqs]).to(device), positions, cache,
                               batch).float().cpu()


@pytest.mark.gpu
def test_cuda_cached_and_full_block_logits_track_fp32(tmp_path):
    # head_dim 64 for the CUDA attention kernels; top-8 of 8 experts so that bf16 noise flips no routing.
    path, cfg, _ = tiny_checkpoint(tmp_path, seed=14, head_dim=64, num_experts_per_tok=8, topk_group=4)
    Lb, g = 8, torch.Generator().manual_seed(15)
    seqs = [torch.randint(0, cfg["vocab_size"] - 2, ((n + 1) * Lb,), generator=g) for n in (0, 1, 4)]
    want = last_block_logits(llada_engine.load_model(path), seqs, Lb, cached=False)
    bf16_cpu = last_block_logits(llada_engine.load_model(path, dtype=torch.bfloat16), seqs, Lb, cached=False)
    bound = 3 * ((bf16_cpu - want).norm() / want.norm()).item() + 1e-3
    gpu = llada_engine.load_model(path, dtype=torch.bfloat16, device="cuda")
    for cached in (False, True):
        got = last_block_logits(gpu, seqs, Lb, cached=cached)
        assert ((got - want).norm() / want.norm()).item() <= bound, cached


@pytest.mark.gpu
def test_cuda_generate_runs_a_batch_with_and_without_the_cache(tmp_path):
    path, cfg, _ = tiny_checkpoint(tmp_path, seed=16, head_dim=64)
    model = llada_engine.load_model(path, dtype=torch.bfloat16, device="cuda")
    prompts = random_prompts(3, cfg, seed=17)
    for use_cache in (True, False):
        out = llada_engine.generate(model, prompts, gen_length=24, block_length=8, steps=8, use_cache=use_cache)
        assert len(out.sequences) == 3
        assert all(len(s) <= 24 and all(0 <= t < cfg["vocab_size"] for t in s) for s in out.sequences)
        assert out.stats.forward_passes > 0
