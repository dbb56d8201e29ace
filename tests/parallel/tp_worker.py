"""One rank of the tensor-parallel tests, started by torchrun (gloo, CPU) from test_tensor_parallel.py.

    torchrun --nproc_per_node N tests/parallel/tp_worker.py OUT.json CHECKPOINT...

For each checkpoint it loads the single-process model and this rank's tensor-parallel part, and measures
how far apart they are: packed logits (block_causal and bd3, a few rows only), the prefill and cached block
logits, greedy and sampled generate with and without the cache on a batch, the backend switch to the
references, and each rank's parameter bytes. Rank 0 writes the measurements; the test judges them.
"""
import json
import sys

import torch
import torch.distributed as dist

import llada_engine
from llada_engine.decoding.kv_cache import KVCache
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


def cached_logits(model, ids, cu, block: torch.Tensor, block_size: int) -> torch.Tensor:
    """Prefill of the packed prompts, then one cached step that also writes the block, then one more."""
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, len(cu) - 1, 64, cfg.num_key_value_heads, cfg.head_dim, model.dtype,
                    model.device)
    model.prefill(ids, cu, cache, torch.arange(len(cu) - 1), block_size)
    first = model.forward_cached(block, cache, torch.arange(len(cu) - 1))
    second = model.forward_cached(block.flip(1), cache)
    return torch.cat([first, second])


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
        prompts, pcu = packed(vocab, [8, 4, 12], seed=2)
        block = packed(vocab, [12], seed=3)[0].view(3, 4)
        out["cached_logits"] = max_diff(cached_logits(full, prompts, pcu, block, 4),
                                        cached_logits(tp, prompts, pcu, block, 4))
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

    params = dict(tp.named_parameters())
    zeros = sum(params[n].numel() * params[n].element_size() for n, s in tp.parallel.plan.items() if s.zero)
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, parameter_bytes(tp) | {"read": read, "zeros": zeros})
    out["rank_bytes"] = [s["bytes"] for s in sizes]
    out["rank_read_bytes"] = [s["read"] for s in sizes]
    out["rank_zero_bytes"] = [s["zeros"] for s in sizes]
    out["replicated_bytes"] = sizes[0]["replicated_bytes"]
    out["full_bytes"] = parameter_bytes(full)["bytes"]
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
