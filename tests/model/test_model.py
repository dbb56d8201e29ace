"""The LLaDA2.0 model against an independent statement of the official forward, on tiny checkpoints written in
the release's format: single-file and sharded loading, packed sequences, both backends, the bd3 layout,
byte-exact save/load round trips, and bad checkpoints named by file and tensor; on a GPU, the bf16 model on
the CUDA kernels (logits and every parameter's gradient) against fp32, held to 3x the CPU bf16 model's error."""
import json

import pytest
import torch
from safetensors import safe_open

import llada_engine
from llada_engine.model import LLaDA2Config
from model_testing import TINY_CONFIG, tiny_checkpoint, write_checkpoint, tiny_state_dict
from official_llada2 import official_forward


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("shards", [1, 3])
def test_logits_match_official_forward(tmp_path, backend, shards):
    path, cfg, sd = tiny_checkpoint(tmp_path, seed=2, shards=shards)
    model = llada_engine.load_model(path, backend=backend)
    ids = torch.randint(0, cfg["vocab_size"], (45,), generator=torch.Generator().manual_seed(0))
    for block in (4, 32):
        ours = model(ids, block_size=block)
        want = official_forward(sd, cfg, ids, block)
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


@pytest.mark.kernels
def test_backends_agree_on_packed_sequences(tiny):
    path, cfg, _ = tiny
    kernels = llada_engine.load_model(path)
    reference = llada_engine.load_model(path, backend="reference")
    g = torch.Generator().manual_seed(3)
    lengths = [1, 7, 32, 33]
    ids = torch.randint(0, cfg["vocab_size"], (sum(lengths),), generator=g)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    packed = kernels(ids, cu, block_size=8)
    torch.testing.assert_close(packed, reference(ids, cu, block_size=8), rtol=1e-5, atol=1e-5)
    for i, n in enumerate(lengths):
        alone = kernels(ids[cu[i]:cu[i + 1]], block_size=8)
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.kernels
def test_bd3_clean_half_is_block_causal_over_the_clean_copy(tiny):
    path, cfg, _ = tiny
    model = llada_engine.load_model(path)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, cfg["vocab_size"] - 1, (24,), generator=g)
    xt = torch.where(torch.rand(24, generator=g) < 0.5, torch.tensor(cfg["mask_token_id"]), x0)
    both = model(torch.cat([xt, x0]), block_size=8, mask="bd3")
    torch.testing.assert_close(both[24:], model(x0, block_size=8), rtol=1e-5, atol=1e-5)
    # the noisy half of block 0 sees only itself: same as a block_causal forward of that block alone
    torch.testing.assert_close(both[:8], model(xt[:8], block_size=8), rtol=1e-5, atol=1e-5)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    src, cfg, sd = tiny_checkpoint(tmp_path / "src", seed=5, dtype=dtype)
    model = llada_engine.load_model(src)
    assert model.dtype == dtype
    model.save_pretrained(tmp_path / "out", max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    seen = {}
    for file in files:
        with safe_open(tmp_path / "out" / file, framework="pt") as f:
            seen.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(seen) == set(sd)
    for name, tensor in sd.items():
        assert seen[name].dtype == tensor.dtype and torch.equal(seen[name], tensor), name
    saved_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in cfg.items():
        if key != "torch_dtype":
            assert saved_cfg[key] == value, key
    again = llada_engine.load_model(tmp_path / "out")
    ids = torch.arange(20) % cfg["vocab_size"]
    assert torch.equal(again(ids, block_size=4), model(ids, block_size=4))


def test_load_with_dtype_and_single_file_save(tmp_path, tiny):
    path, cfg, sd = tiny
    model = llada_engine.load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.save_pretrained(tmp_path / "one")
    assert (tmp_path / "one" / "model.safetensors").is_file()
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert llada_engine.load_model(tmp_path / "one").dtype == torch.bfloat16


def _break(tmp_path, change):
    path, cfg, sd = tiny_checkpoint(tmp_path / "bad", seed=6)
    change(path, cfg, sd)
    return path


def test_progress_bars_for_large_checkpoints_or_on_request(tiny, capsys):
    path = tiny[0]
    llada_engine.load_model(path)
    assert "loading" not in capsys.readouterr().err        # a small checkpoint loads quietly
    model = llada_engine.load_model(path, progress=True)
    err = capsys.readouterr().err
    assert f"loading {path.name}" in err and "100%" in err
    model.save_pretrained(path.parent / "saved", progress=True)
    err = capsys.readouterr().err
    assert "saving saved" in err and "100%" in err


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        llada_engine.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        llada_engine.load_model(tmp_path / "empty")


def test_other_architecture(tmp_path):
    path = _break(tmp_path, lambda p, c, s: (p / "config.json").write_text(json.dumps(dict(c, model_type="llama",
                                                                                         architectures=["Llama"]))))
    with pytest.raises(ValueError, match=r"config.json: .*'llama'.* not a LLaDA2.0 checkpoint"):
        llada_engine.load_model(path)


def test_missing_tensor(tmp_path):
    def drop(p, c, s):
        s.pop("model.layers.1.mlp.experts.3.up_proj.weight")
        write_checkpoint(p, c, s)
    with pytest.raises(ValueError, match=r"lacks tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        llada_engine.load_model(_break(tmp_path, drop))


def test_wrong_shape(tmp_path):
    def reshape(p, c, s):
        s["model.layers.0.attention.dense.weight"] = torch.zeros(64, 32)
        write_checkpoint(p, c, s)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.attention\.dense\.weight has "
                                         r"shape \[64, 32\], expected \[64, 64\]"):
        llada_engine.load_model(_break(tmp_path, reshape))


def test_unexpected_tensor(tmp_path):
    def add(p, c, s):
        s["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
        write_checkpoint(p, c, s)
    with pytest.raises(ValueError, match="tensors not in a LLaDA2.0 model.*inv_freq"):
        llada_engine.load_model(_break(tmp_path, add))


def test_truncated_file_names_file_and_tensor(tmp_path):
    def truncate(p, c, s):
        data = (p / "model.safetensors").read_bytes()
        (p / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated, tensor .* ends past the end of the file"):
        llada_engine.load_model(_break(tmp_path, truncate))


def test_missing_shard(tmp_path):
    path, cfg, sd = tiny_checkpoint(tmp_path / "sharded", seed=7, shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: missing shard"):
        llada_engine.load_model(path)


def test_no_weights(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(FileNotFoundError, match="no model.safetensors and no model.safetensors.index.json"):
        llada_engine.load_model(tmp_path / "c")


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        LLaDA2Config.from_dict(dict(TINY_CONFIG, num_key_value_heads=3))
    with pytest.raises(ValueError, match="rope_scaling"):
        LLaDA2Config.from_dict(dict(TINY_CONFIG, rope_scaling={"type": "yarn"}))
    assert LLaDA2Config.from_dict({k: v for k, v in TINY_CONFIG.items() if k != "mask_token_id"}).mask_token_id is None


def test_bad_inputs(tiny):
    model = llada_engine.load_model(tiny[0])
    with pytest.raises(ValueError, match="input_ids must be in"):
        model(torch.tensor([0, 96]), block_size=4)
    with pytest.raises(ValueError, match="input_ids must be an int64"):
        model(torch.tensor([0, 1], dtype=torch.int32), block_size=4)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        model(torch.arange(6), torch.tensor([0, 4, 5], dtype=torch.int32), block_size=4)
    with pytest.raises(ValueError, match="even length"):
        model(torch.arange(5), block_size=4, mask="bd3")
    with pytest.raises(ValueError, match="mask must be one of"):
        model(torch.arange(4), block_size=4, mask="causal")


@pytest.mark.kernels
def test_logits_at_selects_tokens(tiny):
    path, cfg, _ = tiny
    model = llada_engine.load_model(path)
    ids = torch.randint(0, cfg["vocab_size"], (20,), generator=torch.Generator().manual_seed(6))
    at = torch.tensor([0, 7, 19, 3])
    full = model(torch.cat([ids, ids]), torch.tensor([0, 40], dtype=torch.int32), block_size=4, mask="bd3")
    some = model(torch.cat([ids, ids]), torch.tensor([0, 40], dtype=torch.int32), block_size=4, mask="bd3",
                 logits_at=at)
    torch.testing.assert_close(some, full[at], rtol=1e-6, atol=1e-6)


def model_error_against_fp32(model, cpu_fp32, ids, cu, mask, seed):
    """Relative errors (logits, then each parameter's gradient under one random cotangent) of `model`
    against the CPU fp32 model on the same packed batch."""
    device = next(model.parameters()).device
    want = cpu_fp32(ids, cu, block_size=4, mask=mask)                                   # [T, V]
    got = model(ids.to(device), cu.to(device), block_size=4, mask=mask)
    cotangent = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed))
    (want * cotangent).sum().backward()
    (got.float() * cotangent.to(device)).sum().backward()

    def rel(a, b):
        return ((a.float().cpu() - b).norm() / b.norm().clamp(min=1e-12)).item()
    ours = dict(model.named_parameters())
    grads = {name: rel(ours[name].grad, p.grad) for name, p in cpu_fp32.named_parameters() if p.grad.norm() > 0}
    return rel(got, want), grads


@pytest.mark.gpu
@pytest.mark.parametrize("mask,lengths", [("block_causal", [1, 7, 40, 33]), ("bd3", [2, 14, 64])])
def test_cuda_bf16_model_tracks_fp32_like_the_cpu_bf16_model(tmp_path, mask, lengths):
    # head_dim 64, as the CUDA attention kernels need; every expert chosen (top-8 of 8), so that bf16 noise
    # cannot flip a routing decision and the comparison stays smooth.
    path, cfg, _ = tiny_checkpoint(tmp_path, seed=5, head_dim=64, num_experts_per_tok=8, topk_group=4)
    cpu_fp32 = llada_engine.load_model(path)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, cfg["vocab_size"] - 2, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    cpu_logits, cpu_grads = model_error_against_fp32(llada_engine.load_model(path, dtype=torch.bfloat16),
                                                     cpu_fp32, ids, cu, mask, seed=7)
    cpu_fp32.zero_grad()
    gpu_logits, gpu_grads = model_error_against_fp32(
        llada_engine.load_model(path, dtype=torch.bfloat16, device="cuda"), cpu_fp32, ids, cu, mask, seed=7)
    assert gpu_logits <= 3 * cpu_logits + 1e-3, (gpu_logits, cpu_logits)
    for name, err in gpu_grads.items():
        assert err <= 3 * cpu_grads[name] + 1e-3, (name, err, cpu_grads[name])
