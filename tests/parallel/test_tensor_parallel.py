"""Tensor- and expert-parallel inference under torchrun (gloo, CPU) with 2 and 4 processes against one process
on random official-format checkpoints: logits to fp32 rounding, identical tokens (greedy and sampled, cached
and uncached, batched, and from an Engine serving staggered requests), page pools of the rank's KV heads,
each rank reading and holding its 1/N of the weights; the CLI under torchrun; one rank giving the model's own
bits; the errors without a process group, with an NCCL group and a CPU model, or with a number of ranks that
does not divide the model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llada_engine
from llada_engine import cli
from llada_engine.model import LLaDA2Config
from llada_engine.model.init import random_model
from llada_engine.parallel import Shard, check_divisible, shard_plan
from model_testing import TINY_CONFIG, tiny_checkpoint, tiny_state_dict, tiny_tokenizer, write_checkpoint

WORKER = Path(__file__).with_name("tp_worker.py")


def torchrun(world: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def eight_heads_with_biases(path: Path) -> Path:
    """GQA 8/4 with the attention biases (use_qkv_bias, use_bias), in three shards."""
    cfg = dict(TINY_CONFIG, num_attention_heads=8, num_key_value_heads=4, use_qkv_bias=True, use_bias=True)
    sd = tiny_state_dict(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.attention"
        sd[f"{p}.query_key_value.bias"] = torch.randn((8 + 2 * 4) * cfg["head_dim"], generator=g) * 0.1
        sd[f"{p}.dense.bias"] = torch.randn(cfg["hidden_size"], generator=g) * 0.1
    return write_checkpoint(path, cfg, sd, shards=3)


def kv_replica_bytes(cfg: dict, world: int) -> int:
    """What KV heads replicated over world / Hkv ranks add to one rank beyond its 1/N share (fp32)."""
    kv = cfg["num_key_value_heads"]
    if kv >= world:
        return 0
    per_rank = 2 * cfg["head_dim"] * cfg["hidden_size"] * 4 * cfg["num_hidden_layers"]   # k and v of one head
    return per_rank - per_rank * kv // world


def run_worker(tmp_path: Path, world: int, checkpoints: dict) -> dict:
    out = tmp_path / f"tp{world}.json"
    torchrun(world, str(WORKER), str(out), *(str(p) for p in checkpoints.values()))
    result = json.loads(out.read_text())
    assert result["world"] == world
    return {name: result["checkpoints"][str(path)] for name, path in checkpoints.items()}


def check(result: dict, cfg: dict, world: int) -> None:
    local_kv = max(cfg["num_key_value_heads"] // world, 1)
    assert result["local_heads"] == [cfg["num_attention_heads"] // world, local_kv]
    assert result["pool_kv_heads"] == [cfg["num_key_value_heads"], local_kv]
    scale = result["logits_scale"]
    for key in ("logits", "cached_logits", "reference_logits"):
        assert result[key] <= 2e-6 * scale, (key, result[key], scale)
    for key, tokens in result["generate"].items():
        assert tokens == {"same_as_one_process": True, "same_on_every_rank": True, "streamed_all": True,
                          "tokens": tokens["tokens"]}, key
        assert tokens["tokens"] > 0
    assert result["engine"] == {"same_as_one_process": True, "same_on_every_rank": True,
                                "tokens": result["engine"]["tokens"]}
    assert result["engine"]["tokens"] > 0
    full, replicated = result["full_bytes"], result["replicated_bytes"]
    share = (full - replicated) // world + replicated + kv_replica_bytes(cfg, world)
    assert result["rank_bytes"] == [share] * world
    assert replicated < 0.01 * full
    for held, read, zeros in zip(result["rank_bytes"], result["rank_read_bytes"], result["rank_zero_bytes"]):
        assert read == held - zeros
    assert result["save_refused"]
    assert result["least"] == 10


@pytest.mark.slow
@pytest.mark.kernels
def test_two_ranks_match_one(tmp_path):
    ckpt, cfg, _ = tiny_checkpoint(tmp_path / "tiny")
    biased = eight_heads_with_biases(tmp_path / "biased")
    results = run_worker(tmp_path, 2, {"tiny": ckpt, "biased": biased})
    check(results["tiny"], cfg, 2)
    check(results["biased"], json.loads((biased / "config.json").read_text()), 2)


@pytest.mark.slow
@pytest.mark.kernels
def test_four_ranks_match_one(tmp_path):
    """2 KV heads over 4 ranks (each KV head on two ranks), and 4 KV heads split over 4."""
    ckpt, cfg, _ = tiny_checkpoint(tmp_path / "tiny")
    biased = eight_heads_with_biases(tmp_path / "biased")
    results = run_worker(tmp_path, 4, {"tiny": ckpt, "biased": biased})
    check(results["tiny"], cfg, 4)
    check(results["biased"], json.loads((biased / "config.json").read_text()), 4)


@pytest.mark.slow
@pytest.mark.kernels
def test_cli_under_torchrun(tmp_path, capsys):
    """torchrun -m llada_engine generate --parallel tp prints once what one process prints; bench too."""
    ckpt, _, _ = tiny_checkpoint(tmp_path / "tiny")
    tiny_tokenizer(ckpt)
    args = ["generate", "--model", str(ckpt), "--gen-length", "12", "--block-length", "4", "--steps", "4",
            "--quiet-stats", "to be"]
    assert cli.main(args) == 0
    one = capsys.readouterr().out
    two = torchrun(2, "-m", "llada_engine", *args, "--parallel", "tp")
    assert two.stdout == one and one.strip()
    bench = torchrun(2, "-m", "llada_engine", "bench", "--model", str(ckpt), "--batch", "2", "--gen-length", "4",
                     "--block-length", "4", "--steps", "4", "--prompt-length", "5", "--cached-only",
                     "--parallel", "tp")
    lines = bench.stdout.strip().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[-1])
    assert record["ranks"] == 2 and record["rows"][0]["batch"] == 2 and record["rows"][0]["tokens"] > 0


def test_load_needs_a_process_group(tmp_path):
    ckpt, _, _ = tiny_checkpoint(tmp_path / "tiny")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        llada_engine.load_model(ckpt, parallel="tp")
    with pytest.raises(ValueError, match="parallel must be None or one of"):
        llada_engine.load_model(ckpt, parallel="pp")


@pytest.fixture
def group_of_one():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.kernels
def test_one_rank_is_the_model_and_nccl_needs_a_gpu(tmp_path, group_of_one, monkeypatch):
    ckpt, cfg, _ = tiny_checkpoint(tmp_path / "tiny")
    full, tp = llada_engine.load_model(ckpt), llada_engine.load_model(ckpt, parallel="tp")
    ids = torch.randint(0, cfg["vocab_size"] - 2, (13,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(tp(ids, block_size=4), full(ids, block_size=4), rtol=0, atol=0)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="backend is nccl, which needs the model on a GPU, got device='cpu'"):
        llada_engine.load_model(ckpt, parallel="tp")


def test_ranks_must_divide_the_model():
    cfg = LLaDA2Config.from_dict(dict(TINY_CONFIG))            # Hq 4, Hkv 2, V 96, I 96, E 8, shared 32
    check_divisible(cfg, 4)
    with pytest.raises(ValueError, match="num_attention_heads = 4 is not divisible by 3"):
        check_divisible(cfg, 3)
    with pytest.raises(ValueError, match="vocab_size = 96 is not divisible by 64"):
        check_divisible(LLaDA2Config.from_dict(dict(TINY_CONFIG, num_attention_heads=64)), 64)
    with pytest.raises(ValueError, match="num_experts = 8 is not divisible by 16"):
        check_divisible(LLaDA2Config.from_dict(dict(TINY_CONFIG, num_attention_heads=16, vocab_size=160,
                                                    intermediate_size=160, mask_token_id=159)), 16)
    with pytest.raises(ValueError, match="num_key_value_heads = 6 must be a multiple of 4"):
        check_divisible(LLaDA2Config.from_dict(dict(TINY_CONFIG, num_attention_heads=12, num_key_value_heads=6)), 4)
    with pytest.raises(ValueError, match="intermediate_size = 96 is not divisible by 64"):
        check_divisible(LLaDA2Config.from_dict(dict(TINY_CONFIG, num_attention_heads=64, vocab_size=128,
                                                    mask_token_id=127, num_experts=64, n_group=8,
                                                    moe_intermediate_size=64)), 64)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_plan_partitions_every_split_tensor(world):
    """Over the ranks, each split tensor's parts are the whole of it once (KV heads replicated at N = 4
    aside), and a row-parallel bias is held by rank 0 only."""
    cfg = LLaDA2Config.from_dict(dict(TINY_CONFIG, use_qkv_bias=True, use_bias=True))
    model = random_model(cfg, seed=3)
    with torch.no_grad():
        for _, b in model.named_parameters():
            b.normal_()
    full = dict(model.named_parameters())
    plans = [shard_plan(cfg, rank, world) for rank in range(world)]
    D, Hq, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for name in plans[-1]:
        parts = [plan[name].take(full[name]) if name in plan else full[name] for plan in plans]
        for plan, part in zip(plans, parts):
            assert name not in plan or tuple(part.shape) == plan[name].local_shape(full[name].shape)
        if name.endswith("dense.bias"):
            assert name not in plans[0] and all(not p.any() for p in parts[1:])
        elif "query_key_value" in name and Hkv < world:
            queries = torch.cat([p[:Hq // world * D] for p in parts])
            assert torch.equal(queries, full[name][:Hq * D])
            for rank, part in enumerate(parts):
                head = rank * Hkv // world
                assert torch.equal(part[Hq // world * D:], torch.cat([full[name][(Hq + head) * D:(Hq + head + 1) * D],
                                                                      full[name][(Hq + Hkv + head) * D:
                                                                                 (Hq + Hkv + head + 1) * D]]))
        elif "query_key_value" in name:
            q, k, v = zip(*(p.split([Hq // world * D, Hkv // world * D, Hkv // world * D]) for p in parts))
            assert torch.equal(torch.cat(q + k + v), full[name])
        else:
            assert torch.equal(torch.cat(parts, plans[0][name].dim), full[name]), name
    assert Shard(0, ((4, 6), (0, 2))).locate(1) == 3 and Shard(0, ((4, 6),)).locate(3) is None
