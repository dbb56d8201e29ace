"""Tiny LLaDA2.0 checkpoints written in the release's format (config.json keys, safetensors tensor names),
made by the tests themselves: no download, no pickle."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe",
    "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
    "use_qkv_bias": False, "use_qk_norm": True, "use_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 600000,
    "partial_rotary_factor": 0.5, "rope_scaling": None, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "num_experts": 8, "num_shared_experts": 1, "num_experts_per_tok": 2,
    "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "moe_intermediate_size": 32,
    "first_k_dense_replace": 1, "norm_topk_prob": True, "pad_token_id": 94, "eos_token_id": 94,
    "mask_token_id": 95, "torch_dtype": "float32", "router_dtype": "fp32",
}


def tiny_state_dict(cfg: dict, *, seed: int = 0, dtype=torch.float32) -> dict:
    """Random weights under the release's names; lm_head is scaled so that confidences spread over (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    H, V, nh, nkv, D = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["head_dim"]
    I, Ie, E = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["num_experts"]

    def w(*shape, std=None):
        std = std if std is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    sd = {"model.word_embeddings.weight": w(V, H, std=1.0), "model.norm.weight": 1 + w(H, std=0.1),
          "lm_head.weight": w(V, H, std=0.6)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        sd[f"{p}.input_layernorm.weight"] = 1 + w(H, std=0.1)
        sd[f"{p}.post_attention_layernorm.weight"] = 1 + w(H, std=0.1)
        sd[f"{p}.attention.query_key_value.weight"] = w((nh + 2 * nkv) * D, H)
        sd[f"{p}.attention.query_layernorm.weight"] = 1 + w(D, std=0.1)
        sd[f"{p}.attention.key_layernorm.weight"] = 1 + w(D, std=0.1)
        sd[f"{p}.attention.dense.weight"] = w(H, nh * D)
        if layer < cfg["first_k_dense_replace"]:
            for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                sd[f"{p}.mlp.{name}.weight"] = w(*shape)
            continue
        sd[f"{p}.mlp.gate.weight"] = w(E, H)
        sd[f"{p}.mlp.gate.expert_bias"] = (torch.randn(E, generator=g) * 0.1).float()
        for e in range(E):
            for name, shape in (("gate_proj", (Ie, H)), ("up_proj", (Ie, H)), ("down_proj", (H, Ie))):
                sd[f"{p}.mlp.experts.{e}.{name}.weight"] = w(*shape)
        ns = Ie * cfg["num_shared_experts"]
        for name, shape in (("gate_proj", (ns, H)), ("up_proj", (ns, H)), ("down_proj", (H, ns))):
            sd[f"{p}.mlp.shared_experts.{name}.weight"] = w(*shape)
    return sd


def write_checkpoint(path: Path, cfg: dict, sd: dict, *, shards: int = 1) -> Path:
    """Writes config.json and the state dict as model.safetensors, or as `shards` files with an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(sd)
    if shards == 1:
        save_file(sd, path / "model.safetensors")
        return path
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[i::shards]}
        save_file(part, path / file)
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def tiny_tokenizer(path: Path) -> Path:
    """A character-level tokenizer.json whose ids fit TINY_CONFIG: EOS = 94, MASK = 95."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'-\n()\"&*+/<=>@[]_|~#$%"
    vocab = {c: i for i, c in enumerate(chars[:93])}
    vocab.update({"<unk>": 93, "<|endoftext|>": 94, "<|mask|>": 95})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>", "<|mask|>"])
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def tiny_checkpoint(path: Path, *, seed: int = 0, shards: int = 1, dtype=torch.float32, **overrides):
    cfg = dict(TINY_CONFIG, **overrides)
    sd = tiny_state_dict(cfg, seed=seed, dtype=dtype)
    write_checkpoint(path, cfg, sd, shards=shards)
    tiny_tokenizer(path)
    return path, cfg, sd
