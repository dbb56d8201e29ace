"""Philox4x32-10 in torch integer ops: the reference twin of csrc/common/philox.h.

The references use it to draw exactly the uniforms the kernels draw, so that sampled tokens can be
compared one for one. Values are uint32 held in int64 tensors; 32x32-bit products are split into
16-bit halves so that nothing overflows int64.
"""
import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low_product = a * (b & 0xFFFF)   # < 2^48
    high_product = a * (b >> 16)     # < 2^48
    hi = (high_product + (low_product >> 16)) >> 16
    lo = (((high_product & 0xFFFF) << 16) + low_product) & _MASK32
    return hi, lo


def philox4x32_10(counter: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """counter int64 [..., 4] of uint32 words -> int64 [..., 4], as Random123's philox4x32_10."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key0 & _MASK32, key1 & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def commit_uniform(seed: int, offset: int, rows: torch.Tensor) -> torch.Tensor:
    """The uniform in [0, 1) that commit_tokens draws for each row index in `rows` (int64)."""
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    rows = rows.to(torch.int64)
    counter = torch.stack([rows & _MASK32, (rows >> 32) & _MASK32,
                           torch.full_like(rows, offset & _MASK32), torch.full_like(rows, offset >> 32)], dim=-1)
    word = philox4x32_10(counter, seed & _MASK32, seed >> 32)[..., 0]
    return (word >> 8).to(torch.float32) * (1.0 / 16777216.0)
