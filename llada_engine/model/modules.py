"""The LLaDA2.0 layers (docs/ARCHITECTURE.md, Model), numerically as the official modeling: fp32 RMSNorm, fused QKV,
per-head RMSNorm on q and k, NeoX rotary on the first `rope_dim` dims, SwiGLU MLPs, the sigmoid
group-limited router in fp32 and the routed experts through the grouped-GEMM op.

T = packed tokens, H = hidden, Hq/Hkv = heads, D = head dim, E = experts, k = experts per token.
Attention is told how to attend by a context (attention.py): packed varlen with a mask, or the current
block of each sequence against its KV cache.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .config import LLaDA2Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(positions: torch.Tensor, rope_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [T, rope_dim] for integer positions [T], computed in fp32 and cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / rope_dim))                                     # [rope_dim / 2]
    freqs = positions.float()[:, None] * inv_freq[None, :]                       # [T, rope_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)                                      # [T, rope_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotary on the first cos.shape[-1] dims of x [T, heads, D]; cos, sin [T, rope_dim]."""
    rope_dim = cos.shape[-1]
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    half = rope_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat((out, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                         bias=config.use_qkv_bias)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context, layer: int) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.query_key_value(x).view(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)  # [T, Hq|Hkv, D]
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = context.attend(q, k, v.contiguous(), layer, self.head_dim ** -0.5)     # [T, Hq, D]
        return self.dense(out.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The gate's parameters: weight [E, H] and the selection-only expert_bias [E]."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))


class MoE(nn.Module):
    """Routed experts (stacked for the grouped GEMM) plus the shared expert. With `keep_routing` set (the
    trainer's expert-load counting and balance loss), each forward leaves its router logits [T, E] fp32 and
    choices [T, k] in `last_routing`."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.gate = Router(config)
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, H))   # [E, 2I, H]: gate_proj rows, then up_proj rows
        self.w2 = nn.Parameter(torch.empty(E, H, I))        # [E, H, I]: down_proj
        self.shared_experts = MLP(H, I * config.num_shared_experts) if config.num_shared_experts else None
        self.keep_routing = False
        self.last_routing = None

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        router_logits = F.linear(x.float(), self.gate.weight.float())                  # [T, E] fp32
        topk_ids, topk_weights = ops.moe_route(
            router_logits, self.gate.expert_bias.float(), top_k=self.top_k, n_group=self.n_group,
            topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
            norm_topk_prob=self.top_k > 1)                                             # [T, k], [T, k]
        if self.keep_routing:
            self.last_routing = (router_logits, topk_ids)
        y = ops.moe_experts(x, topk_ids, topk_weights, self.w13, self.w2)              # [T, H]
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2Config, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, cos, sin, context, ops) -> torch.Tensor:
        h = h + self.attention(self.input_layernorm(h), cos, sin, context, self.layer)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, ops) if isinstance(self.mlp, MoE) else self.mlp(x))
