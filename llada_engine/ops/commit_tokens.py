"""Parallel token commit (DESIGN.md §3.3): propose a token per position of the current block and
commit the confident ones, as the official LLaDA2.0 `generate()` does in one denoising step.

    commit_tokens(tokens, logits, *, mask_id, threshold, min_commit, temperature=0.0, top_k=0, top_p=1.0,
                  seed=0, offset=0) -> CommitResult(tokens, committed, confidence, candidates)
    commit_tokens_(...)       # the same, writing the commits into `tokens` in place
    commit_tokens_ref(...)    # the pure-PyTorch reference (the oracle and the benchmark baseline)

Shapes: tokens int64 [B, L], logits [B, L, V] (fp32, bf16 or fp16), min_commit int or int32 [B].
Proposal: temperature 0 with no top-k/top-p is greedy (x0 = first argmax, confidence = softmax(logits)[x0]
in fp32); otherwise logits / temperature, then top-k (ties with the k-th value kept), then top-p (a token
is kept when the probability mass strictly above it is <= top_p), then x0 drawn by inverse CDF in
vocabulary order with the Philox uniform of (seed, offset, row = b * L + l), or the argmax when
temperature is 0; confidence = the probability of x0 after filtering.
Commit per sequence: every masked position with confidence > threshold; if fewer than min_commit[b] pass,
the min(min_commit[b], masked) most confident instead (ties to the lower position). Positions that are
not masked never change and get confidence -inf.
"""
from typing import NamedTuple, Union

import torch

from .._extension import kernels_available, require_kernels
from .checks import INT32_MAX, check_int_values, check_same_device, check_tensors
from .philox import commit_uniform


class CommitResult(NamedTuple):
    tokens: torch.Tensor      # int64 [B, L]: tokens with the commits applied
    committed: torch.Tensor   # bool [B, L]: positions committed by this call
    confidence: torch.Tensor  # fp32 [B, L]: confidence of x0 at masked positions, -inf elsewhere
    candidates: torch.Tensor  # int64 [B, L]: proposed token x0 at every position


def _min_commit_tensor(min_commit: Union[int, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """min_commit as the int32 [B] tensor the kernels take, on the device of tokens (checked first, so that an
    error names the argument at fault). int64 values are never wrapped: on the CPU a value outside
    [0, 2^31 - 1] is an error; on CUDA (no host read) it is clamped there, which commits the same."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"commit_tokens: tokens must be an int64 tensor [B, L], got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"commit_tokens: tokens must be [B, L], got shape {list(tokens.shape)}")
    if isinstance(min_commit, torch.Tensor):
        check_same_device("commit_tokens", tokens=tokens, min_commit=min_commit)
        if min_commit.dim() != 1 or min_commit.shape[0] != tokens.shape[0]:
            raise ValueError(f"commit_tokens: min_commit must be an int or a tensor of shape [B] = "
                             f"[{tokens.shape[0]}], got shape {list(min_commit.shape)}")
        if min_commit.dtype == torch.int64:
            if min_commit.device.type == "cpu":
                check_int_values("commit_tokens", "min_commit", min_commit, 0, INT32_MAX, "[0, 2^31 - 1]")
            else:
                min_commit = min_commit.clamp(0, INT32_MAX)
            min_commit = min_commit.int()
        return min_commit.contiguous()
    if isinstance(min_commit, bool) or not isinstance(min_commit, int):
        raise TypeError(f"commit_tokens: min_commit must be an int or an int32 tensor, got "
                        f"{type(min_commit).__name__}")
    if not 0 <= min_commit <= INT32_MAX:
        raise ValueError(f"commit_tokens: min_commit must be in [0, 2^31 - 1], got {min_commit}")
    return torch.full((tokens.shape[0],), min_commit, dtype=torch.int32, device=tokens.device)


def _philox_word(name: str, value: int) -> int:
    """seed or offset as the int64 the op takes. Both are 64-bit Philox words: any int in [-2^63, 2^64)
    names one (a negative value by its two's complement, as the reference takes it modulo 2^64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"commit_tokens: {name} must be an int, got {type(value).__name__}")
    if not -2**63 <= value < 2**64:
        raise ValueError(f"commit_tokens: {name} must be in [-2^63, 2^64) (a 64-bit Philox word), got {value}")
    return value - 2**64 if value >= 2**63 else value


def _non_finite_error(logits: torch.Tensor, temperature: float) -> ValueError:
    """The error of a row nothing can be proposed from: NaN logits, a row whose maximum is not finite, or
    else a temperature so small that logits / temperature overflows float32."""
    if torch.isnan(logits).any():
        return ValueError("commit_tokens: logits contain NaN")
    bad = ~torch.isfinite(logits.amax(-1))
    if bad.any():
        b, l = (int(i) for i in bad.nonzero()[0])
        return ValueError(f"commit_tokens: logits[{b}, {l}] has no finite maximum (a +inf logit, or every logit -inf)")
    return ValueError(f"commit_tokens: temperature = {temperature} is too small for these logits: logits / "
                      f"temperature overflows float32 (temperature 0 decodes greedily)")


def _raise_if_nan(confidence: torch.Tensor, logits: torch.Tensor, temperature: float) -> None:
    # The CPU kernel raises itself; a CUDA kernel marks NaN rows with a NaN confidence instead of
    # synchronising, so the check costs one sync here and is skipped while a CUDA graph is captured.
    if confidence.is_cuda and not torch.cuda.is_current_stream_capturing():
        if torch.isnan(confidence).any():
            raise _non_finite_error(logits, temperature)


def commit_tokens(tokens: torch.Tensor, logits: torch.Tensor, *, mask_id: int, threshold: float,
                  min_commit: Union[int, torch.Tensor], temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, offset: int = 0) -> CommitResult:
    """One denoising step's commit on the current block; returns new tensors (see the module doc)."""
    require_kernels("commit_tokens")
    result = CommitResult(*torch.ops.llada.commit_tokens(
        tokens, logits, _min_commit_tensor(min_commit, tokens), mask_id=mask_id, threshold=threshold,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=_philox_word("seed", seed),
        offset=_philox_word("offset", offset)))
    _raise_if_nan(result.confidence, logits, temperature)
    return result


def commit_tokens_(tokens: torch.Tensor, logits: torch.Tensor, *, mask_id: int, threshold: float,
                   min_commit: Union[int, torch.Tensor], temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int = 0, offset: int = 0) -> CommitResult:
    """As commit_tokens, writing the commits into `tokens` in place; result.tokens is `tokens`."""
    require_kernels("commit_tokens_")
    committed, confidence, candidates = torch.ops.llada.commit_tokens_(
        tokens, logits, _min_commit_tensor(min_commit, tokens), mask_id=mask_id, threshold=threshold,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=_philox_word("seed", seed),
        offset=_philox_word("offset", offset))
    _raise_if_nan(confidence, logits, temperature)
    return CommitResult(tokens, committed, confidence, candidates)


def _filter_top_p(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sets to -inf every entry of z [..., V] whose strictly-greater probability mass exceeds top_p."""
    probs = torch.softmax(z, dim=-1)
    sorted_z, order = torch.sort(z, dim=-1, descending=True)
    cum = probs.gather(-1, order).double().cumsum(-1)                    # [..., V] inclusive, descending
    ascending = sorted_z.flip(-1).contiguous()
    n_greater = z.shape[-1] - torch.searchsorted(ascending, sorted_z.contiguous(), right=True)
    above = torch.where(n_greater > 0, cum.gather(-1, (n_greater - 1).clamp(min=0)), torch.zeros_like(cum))
    keep = torch.zeros_like(z, dtype=torch.bool).scatter(-1, order, above <= top_p)
    return z.masked_fill(~keep, float("-inf"))


def _propose_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int,
                 offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, V = logits.shape
    z = logits.float()                                                   # [B, L, V]
    if temperature > 0:
        z = z / temperature
    if torch.isnan(z).any() or not torch.isfinite(z.amax(-1)).all():
        raise _non_finite_error(logits, temperature)
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        z = _filter_top_p(z, top_p)
    probs = torch.softmax(z, dim=-1)                                     # [B, L, V]
    x0 = z.argmax(-1)                                                    # [B, L]
    if temperature > 0:
        u = commit_uniform(seed, offset, torch.arange(B * L, device=logits.device)).view(B, L)
        cum = probs.double().cumsum(-1)
        drawn = (cum <= u.double().unsqueeze(-1)).sum(-1)
        last_kept = V - 1 - (probs > 0).flip(-1).int().argmax(-1)
        x0 = torch.where(drawn >= V, last_kept, drawn)
    return x0, probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)


def commit_tokens_ref(tokens: torch.Tensor, logits: torch.Tensor, *, mask_id: int, threshold: float,
                      min_commit: Union[int, torch.Tensor], temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0, offset: int = 0) -> CommitResult:
    """Pure-PyTorch reference of commit_tokens: composed torch ops, fp32 (float64 cumulative sums)."""
    B, L = tokens.shape
    min_commit = _min_commit_tensor(min_commit, tokens).long()          # [B]
    candidates, prop_conf = _propose_ref(logits, temperature, top_k, top_p, seed, offset)
    masked = tokens == mask_id                                          # [B, L]
    confidence = torch.where(masked, prop_conf, torch.full_like(prop_conf, float("-inf")))
    passing = masked & (confidence > threshold)
    take = torch.minimum(min_commit, masked.sum(1))                     # [B]
    order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=tokens.device).expand(B, L))
    top = masked & (rank < take.unsqueeze(1))
    committed = torch.where((passing.sum(1) >= min_commit).unsqueeze(1), passing, top)
    return CommitResult(torch.where(committed, candidates, tokens), committed, confidence, candidates)


if kernels_available():
    @torch.library.register_fake("llada::commit_tokens")
    def _commit_tokens_fake(tokens, logits, min_commit, *, mask_id, threshold, temperature, top_k, top_p,
                            seed, offset):
        check_tensors("commit_tokens", tokens=tokens, logits=logits, min_commit=min_commit)
        check_same_device("commit_tokens", tokens=tokens, logits=logits, min_commit=min_commit)
        return (torch.empty_like(tokens), torch.empty_like(tokens, dtype=torch.bool),
                torch.empty_like(tokens, dtype=torch.float32), torch.empty_like(tokens))

    @torch.library.register_fake("llada::commit_tokens_")
    def _commit_tokens_inplace_fake(tokens, logits, min_commit, *, mask_id, threshold, temperature, top_k,
                                    top_p, seed, offset):
        check_tensors("commit_tokens", tokens=tokens, logits=logits, min_commit=min_commit)
        check_same_device("commit_tokens", tokens=tokens, logits=logits, min_commit=min_commit)
        return (torch.empty_like(tokens, dtype=torch.bool), torch.empty_like(tokens, dtype=torch.float32),
                torch.empty_like(tokens))
