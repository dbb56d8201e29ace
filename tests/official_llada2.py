"""An independent re-statement of the official LLaDA2.0 forward and generate() in plain PyTorch, the oracle of
the model and decoding tests. It reads the release's tensor names from a state dict, works on [B, heads, T, D]
with an additive block mask and loops over experts, as the official modeling code does; it shares no code
with llada_engine.model.
"""
import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):
    rd = cos.shape[-1]
    r, p = x[..., :rd], x[..., rd:]
    rot = torch.cat((-r[..., rd // 2:], r[..., :rd // 2]), -1)
    return torch.cat((r * cos + rot * sin, p), -1)


def _mlp(x, sd, prefix):
    return F.linear(F.silu(F.linear(x, sd[f"{prefix}.gate_proj.weight"])) * F.linear(x, sd[f"{prefix}.up_proj.weight"]),
                    sd[f"{prefix}.down_proj.weight"])


def _moe(x, sd, prefix, cfg):
    T, E, k = x.shape[0], cfg["num_experts"], cfg["num_experts_per_tok"]
    logits = F.linear(x.float(), sd[f"{prefix}.gate.weight"].float())
    scores = torch.sigmoid(logits)
    biased = scores + sd[f"{prefix}.gate.expert_bias"]
    groups = biased.view(T, cfg["n_group"], -1).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(cfg["topk_group"], dim=-1)[1], 1)
    keep = keep.unsqueeze(-1).expand(T, cfg["n_group"], E // cfg["n_group"]).reshape(T, E)
    ids = biased.masked_fill(keep == 0, float("-inf")).topk(k, dim=-1)[1]
    w = scores.gather(1, ids)
    if k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * cfg["routed_scaling_factor"]
    y = torch.zeros(T, k, x.shape[1], dtype=x.dtype)
    for e in range(E):
        hit = ids == e
        if hit.any():
            tok = hit.any(1).nonzero()[:, 0]
            out = _mlp(x[tok], sd, f"{prefix}.experts.{e}")
            slot = hit[tok].float().argmax(1)
            y[tok, slot] = out
    routed = (y.float() * w.unsqueeze(-1)).sum(1).to(x.dtype)
    if cfg.get("num_shared_experts"):
        routed = routed + _mlp(x, sd, f"{prefix}.shared_experts")
    return routed


def official_forward(sd: dict, cfg: dict, ids: torch.Tensor, block_length: int, *, keep: torch.Tensor = None,
                     positions: torch.Tensor = None) -> torch.Tensor:
    """Logits fp32 [T, V] of one sequence ids [T] under generate()'s block-causal mask, or under the boolean
    mask `keep` [T, T] (query row sees key column) with rotary `positions` [T] when given."""
    T = ids.shape[0]
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // nh
    rd = int(D * cfg["partial_rotary_factor"])
    eps = cfg["rms_norm_eps"]
    blocks = torch.arange(T) // block_length
    bias = torch.zeros(T, T).masked_fill(blocks[None, :] > blocks[:, None], float("-inf"))
    if keep is not None:
        bias = torch.zeros(T, T).masked_fill(~keep, float("-inf"))
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, rd, 2).float() / rd))
    freqs = (torch.arange(T) if positions is None else positions).float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)
    h = sd["model.word_embeddings.weight"][ids]
    cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        x = _rms(h, sd[f"{p}.input_layernorm.weight"], eps)
        qkv = F.linear(x, sd[f"{p}.attention.query_key_value.weight"]).view(T, nh + 2 * nkv, D).transpose(0, 1)
        q, k, v = qkv.split([nh, nkv, nkv], 0)                                        # [heads, T, D]
        q = _rms(q, sd[f"{p}.attention.query_layernorm.weight"], eps)
        k = _rms(k, sd[f"{p}.attention.key_layernorm.weight"], eps)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = torch.softmax((q @ k.transpose(1, 2)) * D ** -0.5 + bias, -1, dtype=torch.float32).to(q.dtype)
        o = (att @ v).transpose(0, 1).reshape(T, nh * D)
        h = h + F.linear(o, sd[f"{p}.attention.dense.weight"])
        x = _rms(h, sd[f"{p}.post_attention_layernorm.weight"], eps)
        moe = cfg.get("num_experts") and layer >= cfg["first_k_dense_replace"]
        h = h + (_moe(x, sd, f"{p}.mlp", cfg) if moe else _mlp(x, sd, f"{p}.mlp"))
    h = _rms(h, sd["model.norm.weight"], eps)
    return F.linear(h, sd["lm_head.weight"]).float()


def official_generate(sd: dict, cfg: dict, prompt: list, *, gen_length: int, block_length: int, steps: int,
                      threshold: float, mask_id: int, eos_id: int) -> list:
    """Greedy LLaDA2.0 generate(): generated tokens through the first EOS."""
    steps = min(steps, gen_length)
    P = len(prompt)
    num_blocks = (P + gen_length + block_length - 1) // block_length
    x = torch.full((num_blocks * block_length,), mask_id, dtype=torch.long)
    x[:P] = torch.tensor(prompt)
    base, rem = divmod(block_length, steps)
    schedule = [base + (s < rem) for s in range(steps)]
    for b in range(P // block_length, num_blocks):
        end = (b + 1) * block_length
        for step in range(steps):
            active = x[end - block_length:end] == mask_id
            if not active.any():
                break
            probs = torch.softmax(official_forward(sd, cfg, x[:end], block_length)[-block_length:], -1)
            x0 = probs.argmax(-1)
            conf = torch.where(active, probs.gather(-1, x0[:, None])[:, 0], torch.tensor(float("-inf")))
            high = conf > threshold
            if int(high.sum()) >= schedule[step]:
                transfer = high
            else:
                transfer = torch.zeros_like(high)
                transfer[conf.topk(min(schedule[step], int(active.sum()))).indices] = True
            block = x[end - block_length:end]
            block[transfer] = x0[transfer]
        if (x[P:end] == eos_id).any():
            break
    out = x[P:P + gen_length].tolist()
    return out[:out.index(eos_id) + 1] if eos_id in out else out
