"""KVCache: block writes land at each slot's length, and the CPU copy of the lengths (what every layer's
decode attention reads without a device synchronisation) follows every change."""
import torch

from llada_engine.decoding.kv_cache import KVCache


def test_host_lengths_follow_every_change():
    cache = KVCache(num_layers=2, batch=3, max_len=16, num_kv_heads=2, head_dim=4, dtype=torch.float32,
                    device="cpu")
    assert cache.host_seqlens().tolist() == [0, 0, 0]
    cache.set_lengths(torch.tensor([0, 2]), torch.tensor([8, 4]))
    assert cache.host_seqlens().tolist() == [8, 0, 4]
    k = torch.randn(2, 4, 2, 4)
    v = torch.randn(2, 4, 2, 4)
    cache.write_block(1, torch.tensor([1, 2]), k, v)
    assert torch.equal(cache.k[1][1, :4], k[0]) and torch.equal(cache.v[1][2, 4:8], v[1])
    cache.advance(torch.tensor([1, 2]), 4)
    assert cache.host_seqlens().tolist() == [8, 4, 8]
    cache.keep(torch.tensor([2, 0]))
    assert cache.host_seqlens().tolist() == [8, 8] and cache.batch == 2
    assert torch.equal(cache.v[1][0, 4:8], v[1])
    lengths = cache.host_seqlens()
    cache.advance(torch.tensor([0]), 4)
    assert lengths.tolist() == [8, 8], "a copy handed out earlier is not changed behind its holder's back"
    assert cache.host_seqlens().tolist() == [12, 8]
