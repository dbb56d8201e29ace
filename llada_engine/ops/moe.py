"""Mixture of experts (docs/ARCHITECTURE.md, Mixture of experts): a LLaDA2 MoE layer's routed part, as ops.

    moe_route(router_logits, expert_bias, *, top_k, n_group, topk_group, routed_scaling_factor,
              norm_topk_prob=True) -> (topk_ids int32 [T, k], topk_weights fp32 [T, k])
    moe_permute(x, topk_ids, num_experts) -> (x_sorted [T*k, H], offsets int32 [E+1], inverse int32 [T*k])
    moe_grouped_gemm(a, b, offsets, *, batch_invariant=True) -> [M, N]   # a [M, K], b [E, N, K] (nn.Linear layout)
    moe_unpermute(y, inverse, topk_weights) -> [T, H]
    moe_experts(x, topk_ids, topk_weights, w13, w2, *, batch_invariant=True) -> [T, H]
                                                       # w13 [E, 2I, H] = [gate; up], w2 [E, H, I]
    *_ref: the pure-PyTorch references (the oracle of the tests, the baseline of the benchmarks)

Routing is the official LLaDA2 gate: sigmoid of the fp32 logits; `expert_bias` added for the selection
only; a group's score is the sum of its top-2 biased scores; the `topk_group` best of `n_group` groups are
kept and the `top_k` best experts among them chosen. Ties go to the lower group / expert index, and the
k experts of a token are listed by descending biased score. Weights are the unbiased scores of the chosen
experts, divided by (their sum + 1e-20) when norm_topk_prob, times routed_scaling_factor.
NaN is not an error (a NaN in one sequence of a batch must fail that sequence only): as in the reference's
torch.topk and stable torch.sort, a NaN logit ranks above every number, so its group and expert come first;
the token's weights then hold NaN (all of them with norm_topk_prob, else the NaN expert's) while its ids stay
valid experts, and the NaN reaches that token's rows of moe_experts and no other.
Permutation: rows grouped by expert, stable in the flattened (token, slot) index t * k + s;
x_sorted[inverse[t * k + s]] = x[t], and expert e owns rows offsets[e]:offsets[e + 1].
moe_grouped_gemm, moe_unpermute and moe_experts are differentiable in their activations, weights and
topk_weights: the backward of the grouped GEMM is the same op with b transposed (activations) and a
grouped GEMM over a ragged K (weights, zero for experts that got no row).

batch_invariant (the default): the grouped GEMM computes every row by one kernel and one reduction order
whatever the rows per expert, so a token's expert outputs are the same alone or in any batch (on the CPU
the tiles of the linear op, AMX for bf16 where the CPU has it; on sm_90 always the ping-pong kernel).
batch_invariant=False lets the CPU pick by rows per group (the llada kernels or ATen's GEMM, by a rule set
from measured speeds; LLADA_MOE_CPU_GEMM=kernel|aten forces one) and sm_90 pick its tile shape.
The backward's GEMMs are never batch-invariant.

Devices: the C++ CPU kernels take fp32 and bf16 of any size (the grouped GEMM fp16 too). On CUDA, routing
and (un)permutation take fp32/bf16/fp16; the grouped GEMMs take bf16 with N and K multiples of 8 (CUTLASS
3.x pointer-array kernels on sm_90, 2.x GemmGrouped on sm_80) or fp32 of any size (CUTLASS 2.x SIMT). Offsets never leave the device there, so
index checks that need their values (offsets, ids, inverse) run on the CPU only: on CUDA an id outside
[0, E) is counted nowhere and its slot contributes nothing.
"""
import torch
import torch.nn.functional as F

from .._extension import kernels_available, require_kernels
from .checks import check_dims, check_int32_range, check_int_values, check_same_device, check_tensors


def moe_route(router_logits: torch.Tensor, expert_bias: torch.Tensor, *, top_k: int, n_group: int,
              topk_group: int, routed_scaling_factor: float,
              norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen experts int32 [T, k] and their weights fp32 [T, k] (see the module doc)."""
    require_kernels("moe_route")
    check_tensors("moe_route", router_logits=router_logits)
    return torch.ops.llada.moe_route(router_logits, expert_bias, top_k=top_k, n_group=n_group,
                                     topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                                     norm_topk_prob=norm_topk_prob)


def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor,
                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of x [T, H] in expert order: (x_sorted [T*k, H], offsets int32 [E+1], inverse int32 [T*k])."""
    require_kernels("moe_permute")
    check_tensors("moe_permute", x=x, topk_ids=topk_ids)
    return torch.ops.llada.moe_permute(x, _int32_ids(topk_ids, num_experts), num_experts)


def moe_grouped_gemm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, *,
                     batch_invariant: bool = True) -> torch.Tensor:
    """[M, N]: rows offsets[g]:offsets[g+1] of a [M, K] times b[g]^T, b [E, N, K]."""
    require_kernels("moe_grouped_gemm")
    check_tensors("moe_grouped_gemm", a=a, b=b, offsets=offsets)
    return torch.ops.llada.moe_grouped_gemm(a, b, offsets, batch_invariant=batch_invariant)


def moe_unpermute(y: torch.Tensor, inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """[T, H]: out[t] = sum_s topk_weights[t, s] * y[inverse[t * k + s]], accumulated in fp32."""
    require_kernels("moe_unpermute")
    check_tensors("moe_unpermute", y=y, inverse=inverse, topk_weights=topk_weights)
    return torch.ops.llada.moe_unpermute(y, inverse, topk_weights)


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, *, batch_invariant: bool = True) -> torch.Tensor:
    """The routed experts of a MoE layer, [T, H]: permute, x @ w13^T, SiLU(gate) * up, @ w2^T, unpermute."""
    num_experts, intermediate = _check_expert_weights(x, w13, w2)
    _check_routing(x, topk_ids, topk_weights)
    x_sorted, offsets, inverse = moe_permute(x, topk_ids, num_experts)
    h = moe_grouped_gemm(x_sorted, w13, offsets, batch_invariant=batch_invariant)   # [T*k, 2I]
    act = F.silu(h[:, :intermediate]) * h[:, intermediate:]             # [T*k, I]
    y = moe_grouped_gemm(act, w2, offsets, batch_invariant=batch_invariant)         # [T*k, H]
    return moe_unpermute(y, inverse, topk_weights)


def _int32_ids(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 expert ids as the int32 ids the kernels take, never wrapped: on the CPU an id outside
    [0, num_experts) is an error, as it is in int32; on CUDA, where ids are not read on the host, it becomes
    -1, which (like every id outside [0, num_experts) there) is counted nowhere."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"moe_permute: num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"moe_permute: num_experts must be >= 1, got {num_experts}")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype != torch.int64:
        return topk_ids
    if topk_ids.device.type == "cpu":
        check_int_values("moe_permute", "topk_ids", topk_ids, 0, num_experts - 1,
                         f"[0, num_experts) = [0, {num_experts})")
        return topk_ids.int()
    return torch.where((topk_ids >= 0) & (topk_ids < num_experts), topk_ids, -1).int()


def _check_expert_weights(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int]:
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"moe_experts: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be [T, H], got shape {list(x.shape)}")
    H = x.shape[1]
    if w13.dim() != 3 or w13.shape[0] < 1 or w13.shape[2] != H or w13.shape[1] % 2:
        raise ValueError(f"moe_experts: w13 must be [E, 2I, H] with E >= 1 and H = {H}, got shape "
                         f"{list(w13.shape)}")
    E, I = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (E, H, I):
        raise ValueError(f"moe_experts: w2 must be [E, H, I] = [{E}, {H}, {I}], got shape {list(w2.shape)}")
    check_same_device("moe_experts", x=x, w13=w13, w2=w2)
    for name, w in (("w13", w13), ("w2", w2)):
        if w.dtype != x.dtype:
            raise TypeError(f"moe_experts: {name} must have the dtype of x ({x.dtype}), got {w.dtype}")
    return E, I


def _check_routing(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"moe_experts: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] != x.shape[0] or t.shape[1] < 1:
            raise ValueError(f"moe_experts: {name} must be [T, k] with T = {x.shape[0]} and k >= 1, got shape "
                             f"{list(t.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"moe_experts: topk_weights must have the shape of topk_ids {list(topk_ids.shape)}, got "
                         f"{list(topk_weights.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_experts: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"moe_experts: topk_weights must be float32, got {topk_weights.dtype}")
    check_same_device("moe_experts", x=x, topk_ids=topk_ids, topk_weights=topk_weights)


# ---- references --------------------------------------------------------------------------------------

def moe_route_ref(router_logits: torch.Tensor, expert_bias: torch.Tensor, *, top_k: int, n_group: int,
                  topk_group: int, routed_scaling_factor: float,
                  norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The official LLaDA2 gate after the router projection, with stable sorts for the tie order."""
    T, E = router_logits.shape
    group_size = E // n_group
    scores = torch.sigmoid(router_logits.float())                       # [T, E]
    biased = scores + expert_bias if expert_bias is not None else scores
    group_scores = biased.view(T, n_group, group_size).topk(min(2, group_size), dim=-1).values.sum(-1)
    group_idx = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=biased.device).scatter_(1, group_idx, True)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, group_size).reshape(T, E)
    masked = biased.masked_fill(~score_mask, float("-inf"))
    topk_idx = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :top_k]   # [T, k]
    weights = scores.gather(1, topk_idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx.int(), weights * routed_scaling_factor


def moe_permute_ref(x: torch.Tensor, topk_ids: torch.Tensor,
                    num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()                                  # [T*k]
    order = torch.sort(flat, stable=True).indices                       # flat index of each sorted row
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return x[order // k], offsets, inverse.int()


def moe_grouped_gemm_ref(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The loop over groups (every group, empty ones too, so each b[g] is in the autograd graph)."""
    bounds = offsets.tolist()
    return torch.cat([a[bounds[g]:bounds[g + 1]] @ b[g].t() for g in range(b.shape[0])])


def moe_unpermute_ref(y: torch.Tensor, inverse: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    T, k = topk_weights.shape
    rows = y[inverse.long()].view(T, k, y.shape[1]).float()             # [T, k, H]
    return (rows * topk_weights.unsqueeze(-1)).sum(1).to(y.dtype)


def moe_experts_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    """The official loop over experts: each expert's SwiGLU MLP on its tokens, weighted sum in fp32."""
    _, I = _check_expert_weights(x, w13, w2)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)        # [T, H]
    # One weight tensor per expert, as the official nn.ModuleList of experts holds them.
    for e, (w13_e, w2_e) in enumerate(zip(w13.unbind(0), w2.unbind(0))):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        xe = x[token]                                                   # [n, H]
        gate, up = F.linear(xe, w13_e[:I]), F.linear(xe, w13_e[I:])     # gate_proj, up_proj: [n, I]
        y = F.linear(F.silu(gate) * up, w2_e)                           # down_proj: [n, H]
        out = out.index_add(0, token, y.to(acc_dtype) * topk_weights[token, slot].unsqueeze(-1))
    return out.to(x.dtype)


# ---- fake implementations and autograd ---------------------------------------------------------------

if kernels_available():
    @torch.library.register_fake("llada::moe_route")
    def _moe_route_fake(router_logits, expert_bias, *, top_k, n_group, topk_group, routed_scaling_factor,
                        norm_topk_prob=True):
        check_dims("moe_route", router_logits=(router_logits, "[T, E]"))
        check_same_device("moe_route", router_logits=router_logits, expert_bias=expert_bias)
        if not 1 <= top_k <= router_logits.shape[1]:
            raise ValueError(f"moe_route: top_k must be in [1, E] = [1, {router_logits.shape[1]}], got {top_k}")
        T = router_logits.shape[0]
        return (router_logits.new_empty((T, top_k), dtype=torch.int32),
                router_logits.new_empty((T, top_k), dtype=torch.float32))

    @torch.library.register_fake("llada::moe_permute")
    def _moe_permute_fake(x, topk_ids, num_experts):
        check_dims("moe_permute", x=(x, "[T, H]"), topk_ids=(topk_ids, "[T, k]"))
        check_same_device("moe_permute", x=x, topk_ids=topk_ids)
        check_int32_range("moe_permute", "num_experts", num_experts, 1)
        rows = topk_ids.shape[0] * topk_ids.shape[1]
        return (x.new_empty((rows, x.shape[1])), topk_ids.new_empty((num_experts + 1,)),
                topk_ids.new_empty((rows,)))

    @torch.library.register_fake("llada::moe_unpermute")
    def _moe_unpermute_fake(y, inverse, topk_weights):
        check_dims("moe_unpermute", y=(y, "[T * k, H]"), inverse=(inverse, "[T * k]"),
                   topk_weights=(topk_weights, "[T, k]"))
        check_same_device("moe_unpermute", y=y, inverse=inverse, topk_weights=topk_weights)
        return y.new_empty((topk_weights.shape[0], y.shape[1]))

    @torch.library.register_fake("llada::moe_unpermute_backward")
    def _moe_unpermute_backward_fake(grad_out, y, inverse, topk_weights):
        check_dims("moe_unpermute_backward", grad_out=(grad_out, "[T, H]"), y=(y, "[T * k, H]"),
                   inverse=(inverse, "[T * k]"), topk_weights=(topk_weights, "[T, k]"))
        check_same_device("moe_unpermute_backward", y=y, inverse=inverse, topk_weights=topk_weights, grad_out=grad_out)
        return torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(topk_weights)

    @torch.library.register_fake("llada::moe_grouped_gemm")
    def _moe_grouped_gemm_fake(a, b, offsets, *, batch_invariant=True):
        check_dims("moe_grouped_gemm", a=(a, "[M, K]"), b=(b, "[E, N, K]"), offsets=(offsets, "[E + 1]"))
        check_same_device("moe_grouped_gemm", a=a, b=b, offsets=offsets)
        return a.new_empty((a.shape[0], b.shape[1]))

    @torch.library.register_fake("llada::moe_grouped_gemm_wgrad")
    def _moe_grouped_gemm_wgrad_fake(grad_out, a, offsets):
        check_dims("moe_grouped_gemm_wgrad", grad_out=(grad_out, "[M, N]"), a=(a, "[M, K]"),
                   offsets=(offsets, "[E + 1]"))
        check_same_device("moe_grouped_gemm_wgrad", a=a, grad_out=grad_out, offsets=offsets)
        return a.new_empty((offsets.shape[0] - 1, grad_out.shape[1], a.shape[1]))

    def _permute_setup(ctx, inputs, output):
        _, topk_ids, _ = inputs
        ctx.save_for_backward(output[2])
        ctx.topk_shape = topk_ids.shape

    def _permute_backward(ctx, grad_x_sorted, grad_offsets, grad_inverse):
        (inverse,) = ctx.saved_tensors
        ones = torch.ones(ctx.topk_shape, dtype=torch.float32, device=inverse.device)
        return torch.ops.llada.moe_unpermute(grad_x_sorted, inverse, ones), None, None

    torch.library.register_autograd("llada::moe_permute", _permute_backward, setup_context=_permute_setup)

    def _grouped_gemm_setup(ctx, inputs, keyword_only_inputs, output):
        ctx.save_for_backward(*inputs)

    def _grouped_gemm_backward(ctx, grad):
        a, b, offsets = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.ops.llada.moe_grouped_gemm(grad, b.transpose(1, 2), offsets, batch_invariant=False)
        if ctx.needs_input_grad[1]:
            grad_b = torch.ops.llada.moe_grouped_gemm_wgrad(grad, a, offsets)
        return grad_a, grad_b, None

    torch.library.register_autograd("llada::moe_grouped_gemm", _grouped_gemm_backward,
                                    setup_context=_grouped_gemm_setup)

    def _unpermute_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _unpermute_backward(ctx, grad):
        y, inverse, topk_weights = ctx.saved_tensors
        grad_y, grad_w = torch.ops.llada.moe_unpermute_backward(grad, y, inverse, topk_weights)
        return (grad_y if ctx.needs_input_grad[0] else None, None,
                grad_w if ctx.needs_input_grad[2] else None)

    torch.library.register_autograd("llada::moe_unpermute", _unpermute_backward, setup_context=_unpermute_setup)

    def _route_setup(ctx, inputs, keyword_only_inputs, output):
        ctx.save_for_backward(inputs[0], output[0])
        ctx.norm_topk_prob = keyword_only_inputs.get("norm_topk_prob", True)
        ctx.scale = keyword_only_inputs["routed_scaling_factor"]

    def _route_backward(ctx, grad_ids, grad_weights):
        # The choice of experts is piecewise constant: the gradient flows through the chosen weights only.
        router_logits, topk_ids = ctx.saved_tensors
        with torch.enable_grad():
            logits = router_logits.detach().requires_grad_()
            scores = torch.sigmoid(logits.float()).gather(1, topk_ids.long())          # [T, k]
            if ctx.norm_topk_prob:
                scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
            (grad_logits,) = torch.autograd.grad(scores * ctx.scale, logits, grad_weights)
        return grad_logits, None

    torch.library.register_autograd("llada::moe_route", _route_backward, setup_context=_route_setup)
