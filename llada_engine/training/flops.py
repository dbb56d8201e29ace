"""Model FLOPs of a training step, for tokens/s and model FLOP utilisation (MFU) in metrics.jsonl.

    forward_flops(config, lengths, block_size, mask, logits_rows) -> FLOPs of one model call
    peak_flops(run_peak_tflops, device) -> the peak one process is measured against (FLOP/s), or None

A call's FLOPs are 2 x the multiply-adds of its matrix products: per token the attention projections, the
dense MLP or the MoE layer as a token uses it (router, its k routed experts, the shared expert), the lm_head
at the `logits_rows` tokens whose logits are taken, and per attended (query, key) pair 4 x heads x head_dim
(QK^T and PV), the pairs counted exactly for the block_causal / bd3 masks. A training step counts 3 x the
forward (forward + backward) of the trained model and 1 x the forward of a DPO reference; recomputation
(activation checkpointing) and CAP's counting pass are not model FLOPs. Without run.peak_tflops the peak is
the dense bf16 rate of known GPUs (H100 / H200 989 TFLOP/s, A100 312); otherwise MFU is not logged.
"""
from typing import Optional

import numpy as np
import torch

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def attended_pairs(n: int, block: int, mask: str) -> int:
    """(query, key) pairs of one sequence: block_causal over n tokens, or bd3 over [x_t | x_0] of n each."""
    j = np.arange(-(-n // block), dtype=np.int64)                # blocks
    size = np.minimum(block, n - j * block)
    pairs = size * np.minimum(n, (j + 1) * block)               # block_causal rows (x_0 under bd3)
    if mask == "bd3":
        pairs = pairs + size * (size + j * block)               # x_t rows: their block, the clean blocks before
    return int(pairs.sum())


def forward_flops(config, lengths: list[int], block_size: int, mask: str, logits_rows: int) -> float:
    """FLOPs of one call on sequences of `lengths` tokens (under bd3: the length of x_t, the call has twice)."""
    H, D, Hq, Hkv = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
    per_token = 0
    for layer in range(config.num_hidden_layers):
        per_token += H * (Hq + 2 * Hkv) * D + Hq * D * H
        if config.is_moe_layer(layer):
            I = config.moe_intermediate_size
            per_token += H * config.num_experts + 3 * H * I * (config.num_experts_per_tok + config.num_shared_experts)
        else:
            per_token += 3 * H * config.intermediate_size
    tokens = sum(lengths) * (2 if mask == "bd3" else 1)
    pairs = sum(attended_pairs(n, block_size, mask) for n in lengths)
    return 2.0 * (per_token * tokens + H * config.vocab_size * logits_rows
                  + 2 * Hq * D * pairs * config.num_hidden_layers)


def peak_flops(peak_tflops: float, device: torch.device) -> Optional[float]:
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None
