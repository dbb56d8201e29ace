"""One rank of the tensor-parallel tests, started by torchrun (gloo, CPU) from test_tensor_parallel.py.

    torchrun --nproc_per_node N tests/parallel/tp_worker.py OUT.json CHECKPOINT...

For each checkpoint it loads the single-process model and this rank's tensor-parallel part, and measures
how far apart they are: packed logits (block_causal and bd3, a few rows only), the prefill and paged block
logits (and the KV heads a page pool holds), greedy and sampled generate with and without the cache on a
batch, an Engine serving staggered requests, the backend switch to the references, and each rank's parameter
bytes. Rank 0 writes the measurements; the test judges them.
"""
import json
import random
import sys

import torch
import torch.distributed as dist

import llada_engine
from llada_engine.decoding import Engine
from llada_engine.decoding.paged_cache import PagedKVCache
from llada_engine.parallel import loading, parameter_bytes


class CountingFile:
    """A safetensors file handle that counts the bytes of every tensor read through it."""
    read = 0

    def __init__(self, handle):
        self.handle = handle

    def get_slice(self, name):
        return CountingSlice(self.handle.get_slice(name))

    def get_tensor(self, name):
        tensor = self.handle.get_tensor(name)
        CountingFile.read += tensor.numel() * tensor.element_size()
        return tensor


class CountingSlice:
    def __init__(self, part):
        self.part = part

    def get_shape(self):
        return self.part.get_shape()

    def get_dtype(self):
        return self.part.get_dtype()

    def __getitem__(self, selection):
        tensor = self.part[selection]
        CountingFile.read += tensor.numel() * tensor.element_size()
        return tensor


def counting_open(real_open):
    return lambda *args, **kwargs: CountingFile(real_open(*args, **kwargs))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def packed(vocab: int, lengths, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 2, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
    return ids, cu


def cached_logits(model, ids, cu, blocks: torch.Tensor, Lb: int) -> tuple[torch.Tensor, list]:
    """Prefill of the packed prompts (whole blocks of Lb) into a paged cache, then one paged step that also
    stores the block, then one more step against it: logits [2B, Lb, V], and the shape of a page pool."""
    cfg = model.config
    lengths = (cu[1:] - cu[:-1]).tolist()
    B = len(lengths)
    cache = PagedKVCache(cfg.num_hidden_layers, sum(lengths) // Lb + B, Lb, cfg.num_key_value_heads, cfg.head_dim,
                         model.dtype, model.device, max_slots=B, max_pages=max(lengths) // Lb + 1)
    for slot, n in enumerate(lengths):
        cache.allocate(slot, n // Lb + 1)
    slots = torch.cat([cache.prefill_slots(slot, n) for slot, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    model.prefill(ids, cu, positions, max(lengths), Lb, cache, slots)
    out = []
    for block, writing in ((blocks, True), (blocks.flip(1), False)):
        view = cache.decode_view(list(range(B)), [writing] * B, Lb)
        positions = (view.seqlens.long()[:, None] + torch.arange(Lb)).reshape(-1)
        out.append(model.forward_paged(block, positions, cache, view))
        if writing:
            for slot in range(B):
                cache.advance(slot, Lb)
    return torch.cat(out), list(cache.k_pages[0].shape)


def staggered(model, cfg, seed: int) -> list[list[int]]:
    """The tokens of 24 requests with random prompts and parameters (greedy and sampled) submitted to one
    Engine a few at a time while it steps, in submission order."""
    rng = random.Random(seed)
    engine = Engine(model, max_running=4, cache_tokens=24 * 8, block_length=8)
    pending = []
    for _ in range(24):
        prompt = [rng.randrange(cfg.vocab_size - 2) for _ in range(rng.randint(1, 20))]
        kw = dict(gen_length=rng.randint(1, 20), steps=rng.choice([1, 2, 4, 8]), threshold=rng.choice([0.3, 0.9]))
        if rng.random() < 0.5:
            kw |= dict(temperature=rng.choice([0.7, 1.3]), top_k=rng.choice([0, 5]), seed=rng.randrange(1 << 32))
        pending.append((prompt, kw))
    requests = []
    while pending or engine.running or engine.waiting:
        for _ in range(rng.choice([0, 1, 1, 3])):
            if pending:
                prompt, kw = pending.pop()
                requests.append(engine.submit(prompt, **kw))
        engine.step()
    return [r.result() for r in requests]


def compare(path: str) -> dict:
    full = llada_engine.load_model(path)
    CountingFile.read = 0
    tp = llada_engine.load_model(path, parallel="tp")
    read = CountingFile.read
    cfg = full.config
    vocab = cfg.vocab_size
    out = {"local_heads": [tp.config.num_attention_heads, tp.config.num_key_value_heads]}
    with torch.no_grad():
        ids, cu = packed(vocab, [12, 6, 8], seed=1)
        rows = torch.tensor([0, 3, 11, 12, 17, 25])
        out["logits"] = max(max_diff(full(ids, cu, block_size=4), tp(ids, cu, block_size=4)),
                            max_diff(full(ids, cu, block_size=4, mask="bd3"), tp(ids, cu, block_size=4, mask="bd3")),
                            max_diff(full(ids, cu, block_size=4, logits_at=rows),
                                     tp(ids, cu, block_size=4, logits_at=rows)))
        out["logits_scale"] = full(ids, cu, block_size=4).abs().max().item()
        prompts, pcu = packed(vocab, [8, 16, 24], seed=2)
        blocks = packed(vocab, [24], seed=3)[0].view(3, 8)
        (want, full_pool), (got, tp_pool) = (cached_logits(m, prompts, pcu, blocks, 8) for m in (full, tp))
        out["cached_logits"] = max_diff(want, got)
        out["pool_kv_heads"] = [full_pool[2], tp_pool[2]]
        tp.backend = full.backend = "reference"
        out["reference_logits"] = max_diff(full(ids, cu, block_size=4), tp(ids, cu, block_size=4))
        tp.backend = full.backend = "kernels"

    batch = [packed(vocab, [n], seed=10 + n)[0].tolist() for n in (3, 9, 6)]
    tokens = {}
    for use_cache in (True, False):
        for temperature in (0.0, 0.8):
            kw = dict(gen_length=12, block_length=4, steps=4, threshold=0.5, temperature=temperature,
                      use_cache=use_cache, seed=5)
            streamed = [[] for _ in batch]
            want = llada_engine.generate(full, batch, **kw).sequences
            got = llada_engine.generate(tp, batch, stream=lambda i, t: streamed[i].extend(t), **kw).sequences
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, got)
            key = f"{'cached' if use_cache else 'uncached'}_t{temperature}"
            tokens[key] = {"same_as_one_process": got == want, "same_on_every_rank": all(e == got for e in everyone),
                           "streamed_all": streamed == got, "tokens": sum(len(s) for s in got)}
    out["generate"] = tokens
    got = staggered(tp, cfg, seed=7)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, got)
    out["engine"] = {"same_as_one_process": got == staggered(full, cfg, seed=7),
                     "same_on_every_rank": all(e == got for e in everyone), "tokens": sum(len(s) for s in got)}

    params = dict(tp.named_parameters())
    zeros = sum(params[n].numel() * params[n].element_size() for n, s in tp.parallel.plan.items() if s.zero)
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, parameter_bytes(tp) | {"read": read, "zeros": zeros})
    out["rank_bytes"] = [s["bytes"] for s in sizes]
    out["rank_read_bytes"] = [s["read"] for s in sizes]
    out["rank_zero_bytes"] = [s["zeros"] for s in sizes]
    out["replicated_bytes"] = sizes[0]["replicated_bytes"]
    out["full_bytes"] = parameter_bytes(full)["bytes"]
    out["least"] = tp.parallel.least(10 + (tp.parallel.rank + 1) % tp.parallel.world, tp.device)
    try:
        tp.save_pretrained("unused")
        out["save_refused"] = False
    except RuntimeError:
        out["save_refused"] = True
    return out


def main():
    dist.init_process_group("gloo")
    loading.safe_open = counting_open(loading.safe_open)
    torch.set_num_threads(1)
    out_path, checkpoints = sys.argv[1], sys.argv[2:]
    results = {path: compare(path) for path in checkpoints}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": dist.get_world_size(), "checkpoints": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
