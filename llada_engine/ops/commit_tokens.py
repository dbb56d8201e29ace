"""Parallel token commit (docs/ARCHITECTURE.md, Token commit): propose a token per position of the current block and
commit the confident ones, as the official LLaDA2.0 `generate()` does in one denoising step.

    commit_tokens(tokens, logits, *, mask_id, threshold, min_commit, temperature=0.0, top_k=0, top_p=1.0,
                  seed=0, offset=0, check_finite=True)
        -> CommitResult(tokens, committed, confidence, candidates, invalid)
    commit_tokens_(...)       # the same, writing the commits into `tokens` in place
    commit_tokens_ref(...)    # the pure-PyTorch reference (the oracle and the benchmark baseline)
    commit_tokens_per_seq_ref(...)   # the reference of the op llada::commit_tokens_per_seq itself

Shapes: tokens int64 [B, L], logits [B, L, V] (fp32, bf16 or fp16), min_commit int or int32 [B].
Proposal: temperature 0 with no top-k/top-p is greedy (x0 = first argmax, confidence = softmax(logits)[x0]
in fp32); otherwise logits / temperature, then top-k (ties with the k-th value kept), then top-p (a token
is kept when the probability mass strictly above it is <= top_p), then x0 drawn by inverse CDF in
vocabulary order with the Philox uniform of (seed, offset, row), or the argmax when temperature is 0;
confidence = the probability of x0 after filtering.
Commit per sequence: every masked position with confidence > threshold; if fewer than min_commit[b] pass,
the min(min_commit[b], masked) most confident instead (ties to the lower position). Positions that are
not masked never change and get confidence -inf.

Per-sequence parameters: threshold, temperature, top_k, top_p, seed and offset each take a number (the same
for every sequence) or a 1-D tensor [B] with one value per sequence (float32 threshold / temperature / top_p,
int32 top_k, int64 seed / offset; other dtypes are converted, seed / offset from integer ones only), on the
tokens' device or on the CPU (there its values are checked, then uploaded without waiting for the device).
A sequence with temperature 0 and no top-k/top-p is greedy, the others sample, all in one call. Which Philox
row a position draws:
  - every parameter a number: one stream over the batch, row = b * L + l (position l of sequence b);
  - any parameter a tensor: each sequence its own stream (seed[b], offset[b]), row = l. Sequence b then gets
    bit for bit what the call on sequence b alone (B = 1, its values as numbers) gives, whatever else is in
    the batch and wherever it sits. (A call with B = 1 draws row = l either way.)
Numbers, and tensors on the CPU, are checked: threshold in [0, 1], temperature finite and >= 0 (in float32, and
a number not so small that float32 holds it as 0), top_k >= 0, top_p in (0, 1]. seed and offset are 64-bit Philox
words: an int in [-2^63, 2^64) (a negative one by its two's complement) or an integer tensor (int64 holds every
word). Tensors on a GPU are trusted, not read: a value outside those ranges gives unspecified tokens (top_k <= 0
or >= V and top_p >= 1 mean off), never an out-of-bounds read.

NaN: a position whose logits hold a NaN, or have no finite maximum (after temperature), proposes token 0
with confidence NaN where masked and is never committed; the other positions commit as usual, and
invalid[b] (bool [B], on the tokens' device, filled by the kernel) says whether sequence b had such a
position. check_finite=True raises ValueError when any sequence had one, after the call (commit_tokens_ has
then written the others' commits), saying why: logits that contain NaN, the position whose logits have no
finite maximum, or else a temperature so small that logits / temperature overflows float32; on a GPU that
check is one host synchronisation, skipped while a CUDA graph is captured. A hot path passes
check_finite=False, which never synchronises (and does not break a torch.compile graph), and reads
result.invalid with its own single readback.
"""
import math
import struct
from typing import NamedTuple, Union

import torch

from .._extension import kernels_available, require_kernels
from .checks import INT32_MAX, check_dims, check_int_values, check_same_device, check_tensors
from .philox import commit_uniform

Number = Union[int, float]
PerSequence = Union[Number, torch.Tensor]  # one value for every sequence, or a tensor [B]


class CommitResult(NamedTuple):
    tokens: torch.Tensor      # int64 [B, L]: tokens with the commits applied
    committed: torch.Tensor   # bool [B, L]: positions committed by this call
    confidence: torch.Tensor  # fp32 [B, L]: confidence of x0 at masked positions, -inf elsewhere (NaN: invalid)
    candidates: torch.Tensor  # int64 [B, L]: proposed token x0 at every position
    invalid: torch.Tensor     # bool [B]: the sequence's logits held a NaN (or a row with no finite maximum)


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
        raise TypeError(f"commit_tokens: {name} must be an int or a tensor [B], got {type(value).__name__}")
    if not -2**63 <= value < 2**64:
        raise ValueError(f"commit_tokens: {name} must be in [-2^63, 2^64) (a 64-bit Philox word), got {value}")
    return value - 2**64 if value >= 2**63 else value


def _float32(value: float) -> float:
    """value rounded to float32 (inf beyond its range), as the kernels hold it."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _temperature_too_small(temperature: float) -> str:
    return (f"commit_tokens: temperature = {temperature} is too small for these logits: logits / temperature "
            f"overflows float32 (temperature 0 decodes greedily)")


def _check_temperature(value: float) -> None:
    """A temperature number, as the kernels hold it in float32: finite there, and not rounded to 0."""
    if not math.isfinite(_float32(value)):
        raise ValueError(f"commit_tokens: temperature must be finite and >= 0 (in float32), got {value}")
    if value != 0 and _float32(value) == 0:
        raise ValueError(_temperature_too_small(value))


def _check_temperature_tensor(value: torch.Tensor) -> None:
    """A temperature tensor on the CPU of another floating dtype than float32: no value rounded to 0 there."""
    if value.device.type == "cpu" and value.is_floating_point() and value.dtype != torch.float32:
        lost = (value != 0) & (value.float() == 0)
        if lost.any():
            b = int(lost.nonzero()[0])
            raise ValueError(_temperature_too_small(float(value[b])).replace("temperature =", f"temperature[{b}] =", 1))


def _non_finite_error(logits: torch.Tensor, invalid: torch.Tensor, temperature: PerSequence) -> ValueError:
    """The error of sequences nothing can be proposed from at some position (invalid [B]): NaN logits, a row
    whose maximum is not finite, or else a temperature so small that logits / temperature overflows float32."""
    if torch.isnan(logits).any():
        return ValueError("commit_tokens: logits contain NaN")
    bad = ~torch.isfinite(logits.amax(-1))
    if bad.any():
        b, l = (int(i) for i in bad.nonzero()[0])
        return ValueError(f"commit_tokens: logits[{b}, {l}] has no finite maximum (a +inf logit, or every logit -inf)")
    if isinstance(temperature, torch.Tensor):
        b = int(invalid.nonzero()[0])
        return ValueError(_temperature_too_small(float(temperature[b])).replace("temperature =",
                                                                                f"temperature[{b}] =", 1))
    return ValueError(_temperature_too_small(temperature))


# The per-sequence parameters: name, dtype of its tensor form, and the check of a number.
_PER_SEQUENCE = (
    ("threshold", torch.float32, lambda x: 0.0 <= x <= 1.0, "in [0, 1]"),
    ("temperature", torch.float32, lambda x: x >= 0.0 and x != float("inf"), "finite and >= 0"),
    ("top_k", torch.int32, lambda x: x >= 0, ">= 0"),
    ("top_p", torch.float32, lambda x: 0.0 < x <= 1.0, "in (0, 1]"),
    ("seed", torch.int64, lambda x: True, ""),
    ("offset", torch.int64, lambda x: True, ""),
)
_PHILOX_WORDS = ("seed", "offset")


def _per_sequence(tokens: torch.Tensor, logits: torch.Tensor, values: dict) -> tuple[list[torch.Tensor], bool]:
    """The six sampling parameters as [B] tensors for the op, and whether each sequence has its own stream."""
    check_tensors("commit_tokens", logits=logits)   # (tokens: by _min_commit_tensor)
    own_streams = any(isinstance(values[name], torch.Tensor) for name, *_ in _PER_SEQUENCE)
    B = tokens.shape[0]
    tensors = []
    for name, dtype, ok, rule in _PER_SEQUENCE:
        value = values[name]
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.shape[0] != B:
                raise ValueError(f"commit_tokens: {name} must be a number or a tensor of shape [B] = [{B}], "
                                 f"got shape {list(value.shape)}")
            if name in _PHILOX_WORDS and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
                raise TypeError(f"commit_tokens: {name} must be an int or an integer tensor [B] (64-bit Philox "
                                f"words), got a {value.dtype} tensor")
            if name == "temperature":
                _check_temperature_tensor(value)
            tensors.append(value.to(dtype))
            continue
        if name in _PHILOX_WORDS:
            tensors.append(torch.full((B,), _philox_word(name, value), dtype=dtype, device=tokens.device))
            continue
        integral = dtype != torch.float32
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            raise TypeError(f"commit_tokens: {name} must be {'an int' if integral else 'a number'} or a tensor [B], "
                            f"got {type(value).__name__}")
        if not ok(value):  # NaN fails every comparison
            raise ValueError(f"commit_tokens: {name} must be {rule}, got {value}")
        if name == "temperature":
            _check_temperature(value)
        if name == "top_k":
            value = min(value, INT32_MAX)  # any top_k >= V keeps every token: int32 holds them all
        tensors.append(torch.full((B,), value, dtype=dtype, device=tokens.device))
    return tensors, own_streams


def _raise_if_invalid(invalid: torch.Tensor, logits: torch.Tensor, temperature: PerSequence) -> None:
    # One host synchronisation on a GPU; skipped while a CUDA graph is captured, and on meta (no values).
    if invalid.is_meta or (invalid.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if bool(invalid.any()):
        raise _non_finite_error(logits, invalid, temperature)


def commit_tokens(tokens: torch.Tensor, logits: torch.Tensor, *, mask_id: int, threshold: PerSequence,
                  min_commit: Union[int, torch.Tensor], temperature: PerSequence = 0.0, top_k: PerSequence = 0,
                  top_p: PerSequence = 1.0, seed: PerSequence = 0, offset: PerSequence = 0,
                  check_finite: bool = True) -> CommitResult:
    """One denoising step's commit on the current block; returns new tensors (see the module doc)."""
    require_kernels("commit_tokens")
    min_commit = _min_commit_tensor(min_commit, tokens)
    params, own_streams = _per_sequence(tokens, logits, dict(threshold=threshold, temperature=temperature,
                                                             top_k=top_k, top_p=top_p, seed=seed, offset=offset))
    result = CommitResult(*torch.ops.llada.commit_tokens_per_seq(
        tokens, logits, min_commit, *params, mask_id=mask_id, own_streams=own_streams))
    if check_finite:
        _raise_if_invalid(result.invalid, logits, temperature)
    return result


def commit_tokens_(tokens: torch.Tensor, logits: torch.Tensor, *, mask_id: int, threshold: PerSequence,
                   min_commit: Union[int, torch.Tensor], temperature: PerSequence = 0.0, top_k: PerSequence = 0,
                   top_p: PerSequence = 1.0, seed: PerSequence = 0, offset: PerSequence = 0,
                   check_finite: bool = True) -> CommitResult:
    """As commit_tokens, writing the commits into `tokens` in place; result.tokens is `tokens`."""
    require_kernels("commit_tokens_")
    min_commit = _min_commit_tensor(min_commit, tokens)
    params, own_streams = _per_sequence(tokens, logits, dict(threshold=threshold, temperature=temperature,
                                                             top_k=top_k, top_p=top_p, seed=seed, offset=offset))
    committed, confidence, candidates, invalid = torch.ops.llada.commit_tokens_per_seq_(
        tokens, logits, min_commit, *params, mask_id=mask_id, own_streams=own_streams)
    if check_finite:
        _raise_if_invalid(invalid, logits, temperature)
    return CommitResult(tokens, committed, confidence, candidates, invalid)


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


def _propose_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, offset: int,
                 rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, confidence and invalid [n, L] for logits [n, L, V] of sequences sharing these parameters; rows
    int64 [n, L] are the Philox rows the positions draw."""
    V = logits.shape[-1]
    z = logits.float()                                                   # [n, L, V]
    if temperature > 0:
        z = z / temperature
    invalid = torch.isnan(z).any(-1) | ~torch.isfinite(z.amax(-1))       # [n, L]
    z = torch.where(invalid.unsqueeze(-1), torch.zeros_like(z), z)
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        z = _filter_top_p(z, top_p)
    probs = torch.softmax(z, dim=-1)                                     # [n, L, V]
    x0 = z.argmax(-1)                                                    # [n, L]
    if temperature > 0:
        u = commit_uniform(seed, offset, rows)
        cum = probs.double().cumsum(-1)
        drawn = (cum <= u.double().unsqueeze(-1)).sum(-1)
        last_kept = V - 1 - (probs > 0).flip(-1).int().argmax(-1)
        x0 = torch.where(drawn >= V, last_kept, drawn)
    confidence = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    x0 = torch.where(invalid, torch.zeros_like(x0), x0)
    return x0, confidence.masked_fill(invalid, float("nan")), invalid


def commit_tokens_ref(tokens: torch.Tensor, logits: torch.Tensor, *, mask_id: int, threshold: PerSequence,
                      min_commit: Union[int, torch.Tensor], temperature: PerSequence = 0.0, top_k: PerSequence = 0,
                      top_p: PerSequence = 1.0, seed: PerSequence = 0, offset: PerSequence = 0,
                      check_finite: bool = True) -> CommitResult:
    """Pure-PyTorch reference of commit_tokens: composed torch ops, fp32 (float64 cumulative sums); with
    per-sequence parameters, each sequence on its own with its own values."""
    given = dict(threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=offset)
    values = {name: given[name].to(dtype) if isinstance(given[name], torch.Tensor) else given[name]
              for name, dtype, *_ in _PER_SEQUENCE}                 # tensors in the dtypes commit_tokens takes
    own_streams = any(isinstance(v, torch.Tensor) for v in values.values())
    result = _commit_ref(tokens, logits, _min_commit_tensor(min_commit, tokens), values, mask_id, own_streams)
    if check_finite and result.invalid.any():
        raise _non_finite_error(logits, result.invalid, temperature)
    return result


def commit_tokens_per_seq_ref(tokens: torch.Tensor, logits: torch.Tensor, min_commit: torch.Tensor,
                              threshold: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                              top_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, *, mask_id: int,
                              own_streams: bool = True) -> CommitResult:
    """Reference of the op llada::commit_tokens_per_seq: its [B] parameter tensors, each sequence its own
    Philox stream (own_streams) or one stream over the batch; never raises for non-finite logits."""
    values = dict(threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=offset)
    return _commit_ref(tokens, logits, min_commit, values, mask_id, own_streams)


def _commit_ref(tokens: torch.Tensor, logits: torch.Tensor, min_commit: torch.Tensor, values: dict, mask_id: int,
                own_streams: bool) -> CommitResult:
    """The reference on min_commit [B] and the six parameters (numbers or [B] tensors)."""
    B, L = tokens.shape
    min_commit = min_commit.long()                                       # [B]
    if any(isinstance(v, torch.Tensor) for v in values.values()):
        per_seq = [{k: (v[b].item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()} for b in range(B)]
        positions = torch.arange(L, device=tokens.device).unsqueeze(0)  # [1, L]
        # each sequence its own stream (row = l), or one stream over the batch (row = b * L + l)
        parts = [_propose_ref(logits[b:b + 1], s["temperature"], s["top_k"], s["top_p"], s["seed"], s["offset"],
                              positions if own_streams else positions + b * L)
                 for b, s in enumerate(per_seq)]
        candidates, prop_conf, invalid_rows = (torch.cat(t) for t in zip(*parts))
        thresholds = torch.tensor([s["threshold"] for s in per_seq], dtype=torch.float32, device=tokens.device)
    else:
        rows = torch.arange(B * L, device=tokens.device).view(B, L)    # one stream over the batch
        candidates, prop_conf, invalid_rows = _propose_ref(logits, values["temperature"], values["top_k"],
                                                           values["top_p"], values["seed"], values["offset"], rows)
        thresholds = torch.full((B,), float(values["threshold"]), dtype=torch.float32, device=tokens.device)
    invalid = invalid_rows.any(1)                                        # [B]
    masked = tokens == mask_id                                          # [B, L]
    confidence = torch.where(masked, prop_conf, torch.full_like(prop_conf, float("-inf")))
    eligible = masked & ~invalid_rows
    passing = eligible & (confidence > thresholds.unsqueeze(1))
    take = torch.minimum(min_commit, eligible.sum(1))                   # [B]
    ranked = confidence.masked_fill(~eligible, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=tokens.device).expand(B, L))
    top = eligible & (rank < take.unsqueeze(1))
    committed = torch.where((passing.sum(1) >= min_commit).unsqueeze(1), passing, top)
    return CommitResult(torch.where(committed, candidates, tokens), committed, confidence, candidates, invalid)


if kernels_available():
    @torch.library.register_fake("llada::commit_tokens")
    def _commit_tokens_fake(tokens, logits, min_commit, *, mask_id, threshold, temperature, top_k, top_p,
                            seed, offset):
        check_dims("commit_tokens", tokens=(tokens, "[B, L]"), logits=(logits, "[B, L, V]"),
                   min_commit=(min_commit, "[B]"))
        check_same_device("commit_tokens", tokens=tokens, logits=logits, min_commit=min_commit)
        return (torch.empty_like(tokens), torch.empty_like(tokens, dtype=torch.bool),
                torch.empty_like(tokens, dtype=torch.float32), torch.empty_like(tokens))

    @torch.library.register_fake("llada::commit_tokens_")
    def _commit_tokens_inplace_fake(tokens, logits, min_commit, *, mask_id, threshold, temperature, top_k,
                                    top_p, seed, offset):
        check_dims("commit_tokens", tokens=(tokens, "[B, L]"), logits=(logits, "[B, L, V]"),
                   min_commit=(min_commit, "[B]"))
        check_same_device("commit_tokens", tokens=tokens, logits=logits, min_commit=min_commit)
        return (torch.empty_like(tokens, dtype=torch.bool), torch.empty_like(tokens, dtype=torch.float32),
                torch.empty_like(tokens))

    def _check_per_seq_fake(tokens, logits, min_commit, params):
        """What the per-sequence ops check of their tensors, without their values (the parameters may be on
        the CPU with the rest on a GPU)."""
        op = "commit_tokens"
        check_dims(op, tokens=(tokens, "[B, L]"), logits=(logits, "[B, L, V]"), min_commit=(min_commit, "[B]"),
                   **{name: (t, "[B]") for (name, *_), t in zip(_PER_SEQUENCE, params)})
        check_same_device(op, tokens=tokens, logits=logits, min_commit=min_commit)
        for (name, *_), t in zip(_PER_SEQUENCE, params):
            if t.device.type != "cpu" and t.device != tokens.device:
                raise ValueError(f"{op}: {name} is on {t.device} but tokens is on {tokens.device} "
                                 f"(it may also be on the CPU)")

    @torch.library.register_fake("llada::commit_tokens_per_seq")
    def _commit_tokens_per_seq_fake(tokens, logits, min_commit, threshold, temperature, top_k, top_p, seed, offset,
                                    *, mask_id, own_streams=True):
        _check_per_seq_fake(tokens, logits, min_commit, (threshold, temperature, top_k, top_p, seed, offset))
        return (torch.empty_like(tokens), torch.empty_like(tokens, dtype=torch.bool),
                torch.empty_like(tokens, dtype=torch.float32), torch.empty_like(tokens),
                tokens.new_empty(tokens.shape[:1], dtype=torch.bool))

    @torch.library.register_fake("llada::commit_tokens_per_seq_")
    def _commit_tokens_per_seq_inplace_fake(tokens, logits, min_commit, threshold, temperature, top_k, top_p, seed,
                                            offset, *, mask_id, own_streams=True):
        _check_per_seq_fake(tokens, logits, min_commit, (threshold, temperature, top_k, top_p, seed, offset))
        return (torch.empty_like(tokens, dtype=torch.bool), torch.empty_like(tokens, dtype=torch.float32),
                torch.empty_like(tokens), tokens.new_empty(tokens.shape[:1], dtype=torch.bool))
