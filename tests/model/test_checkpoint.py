"""Checkpoints as users meet them: official-format configs without a mask_token_id (vocab 512 and 4096) load
as the official code loads them and decode once given the MASK id; save_pretrained plans its shards with
huggingface_hub, stays loadable by the official layout, writes beside the old checkpoint and switches over
so that a full disk leaves the old one loadable, removes only the old checkpoint's own files and never a
foreign one; checkpoints that would load wrong are refused (index entries outside the folder, non-float
tensors, bad config values, absurd safetensors headers), a tensor stored in another dtype is cast to the
model's; the embedded model is verified against its checksums.json."""
import errno
import json
import re
import shutil

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

import llada_engine
from llada_engine.model import checkpoint, default
from model_testing import TINY_CONFIG, tiny_checkpoint, tiny_state_dict, write_checkpoint
from official_llada2 import official_forward, official_generate


def official_format(path, vocab_size, seed):
    """A checkpoint whose config.json is like the release's: no mask_token_id."""
    cfg = {k: v for k, v in TINY_CONFIG.items() if k != "mask_token_id"}
    cfg.update(vocab_size=vocab_size, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 2)
    sd = tiny_state_dict(cfg, seed=seed)
    write_checkpoint(path, cfg, sd)
    return path, cfg, sd


@pytest.mark.parametrize("vocab_size", [512, 4096])
def test_official_config_without_mask_id_loads_and_decodes_with_one(tmp_path, vocab_size):
    path, cfg, sd = official_format(tmp_path, vocab_size, seed=31)
    model = llada_engine.load_model(path, backend="reference")
    assert model.config.mask_token_id is None and model.config.vocab_size == vocab_size
    ids = torch.randint(0, vocab_size, (19,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids, block_size=8), official_forward(sd, cfg, ids, 8), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError) as error:
        llada_engine.generate(model, [1, 2, 3], gen_length=8)
    assert str(error.value) == ("mask_id: the checkpoint's config.json has no mask_token_id; pass mask_id=... "
                                "(LLaDA2.0 releases use 156895)")
    mask_id = vocab_size - 1
    kw = dict(gen_length=12, block_length=4, steps=4, threshold=0.9)
    got = llada_engine.generate(model, [5, 6, 7], mask_id=mask_id, **kw).sequences[0]
    assert got == official_generate(sd, cfg, [5, 6, 7], mask_id=mask_id, eos_id=cfg["eos_token_id"], **kw)


def test_eos_outside_the_vocabulary_is_named_where_used(tmp_path):
    path, cfg, _ = official_format(tmp_path, 512, seed=32)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, eos_token_id=156892)))
    model = llada_engine.load_model(path, backend="reference")
    with pytest.raises(ValueError, match=r"eos_id: config.json's eos_token_id 156892 is outside the vocabulary "
                                         r"\[0, 512\); pass eos_id=\.\.\."):
        llada_engine.generate(model, [1], mask_id=511)
    assert len(llada_engine.generate(model, [1], mask_id=511, eos_id=510, gen_length=4).sequences[0]) <= 4


# ---- save_pretrained ----------------------------------------------------------------------------------------

FOREIGN = {"model_backup.safetensors": b"backup", "model-best.safetensors": b"best", "modelA.safetensors": b"A",
           "notes.txt": b"mine", "tokenizer.json": b"{}"}


def add_foreign(path):
    for name, data in FOREIGN.items():
        (path / name).write_bytes(data)
    return {name: (path / name).stat().st_mtime_ns for name in FOREIGN}


def assert_foreign_untouched(path, mtimes):
    for name, data in FOREIGN.items():
        assert (path / name).read_bytes() == data and (path / name).stat().st_mtime_ns == mtimes[name], name


def logits(model):
    return model(torch.arange(20) % model.config.vocab_size, block_size=4)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [llada_engine.load_model(tiny_checkpoint(root / f"m{seed}", seed=seed)[0], backend="reference")
            for seed in (41, 42)]


def test_shards_are_huggingface_hubs_plan_and_load_by_the_index(tmp_path, two_models):
    model = two_models[0]
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names, tensors = [], {}
    for release, tensor, _, at in checkpoint.release_tensors(model):
        names.append(release)
        tensors[release] = (tensor[at] if at else tensor).detach().clone()
    want = split_torch_state_dict_into_shards(tensors, max_shard_size=40_000)
    assert index == {"metadata": want.metadata, "weight_map": want.tensor_to_filename}
    assert len(set(index["weight_map"].values())) > 1
    # read as the official code does: follow the index, then run the official forward on what it found
    sd = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(tmp_path / file, framework="pt") as f:
            sd.update({name: f.get_tensor(name) for name in f.keys()})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert set(sd) == set(names) and "mask_token_id" in cfg
    ids = torch.arange(20) % cfg["vocab_size"]
    torch.testing.assert_close(official_forward(sd, cfg, ids, 4), logits(model), rtol=1e-4, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resaving_removes_only_the_old_checkpoints_files(tmp_path, two_models):
    a, b = two_models
    mtimes = add_foreign(tmp_path)
    stale_shard = tmp_path / "model-00009-of-00009.safetensors"    # looks like ours, no index names it
    stale_shard.write_bytes(b"stale")
    plans = [(a, "5GB"), (b, "40KB"), (a, "40KB"), (b, "40KB"), (a, "5GB"), (b, "50KB")]
    layouts = []
    for model, size in plans:
        model.save_pretrained(tmp_path, max_shard_size=size)
        torch.testing.assert_close(logits(llada_engine.load_model(tmp_path, backend="reference")), logits(model))
        ours = checkpoint.checkpoint_files(tmp_path)
        weights = {p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")}
        assert weights == ours | set(FOREIGN) - {"notes.txt", "tokenizer.json"} | {stale_shard.name}
        assert_foreign_untouched(tmp_path, mtimes)
        assert stale_shard.read_bytes() == b"stale"
        layouts.append(sorted(ours))
    # single file; shards; the same shard names taken, so the other pattern; back to the first; single; shards
    assert layouts[0] == ["model.safetensors"]
    assert all(n.startswith("model-0") for n in layouts[1] if n != "model.safetensors.index.json")
    assert all(n.startswith("model-alt-0") for n in layouts[2] if n != "model.safetensors.index.json")
    assert layouts[3] == layouts[1] and layouts[4] == ["model.safetensors"] and len(layouts[5]) > 2


@pytest.mark.parametrize("old_size", ["5GB", "40KB"])
def test_disk_full_on_the_second_shard_leaves_the_old_checkpoint(tmp_path, two_models, monkeypatch, old_size):
    a, b = two_models
    a.save_pretrained(tmp_path, max_shard_size=old_size)
    mtimes = add_foreign(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    writes = []
    real = checkpoint.save_file

    def full_disk(tensors, file, metadata=None):
        writes.append(file)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        real(tensors, file, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        b.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(writes) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before       # no staging folder left behind
    assert_foreign_untouched(tmp_path, mtimes)
    torch.testing.assert_close(logits(llada_engine.load_model(tmp_path, backend="reference")), logits(a))


def test_a_failed_save_into_a_new_folder_leaves_nothing(tmp_path, two_models, monkeypatch):
    def no_space(tensors, file, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    with pytest.raises(OSError):
        two_models[0].save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("size", [0, -1, "0GB", "0.0001B", True, 1.5, "lots"])
def test_max_shard_size_must_be_positive(tmp_path, two_models, size):
    with pytest.raises(ValueError, match=r"max_shard_size must be (more than 0 bytes|a number of bytes or a size like "
                                         rf"'5GB'), got {re.escape(repr(size))}$"):
        two_models[0].save_pretrained(tmp_path, max_shard_size=size)
    assert not any(tmp_path.iterdir())


def test_an_index_naming_files_outside_is_neither_read_nor_cleaned_up(tmp_path, two_models):
    outside = tmp_path / "other"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"keep")
    for entry in ("../other/model.safetensors", str(outside / "model.safetensors"), "..", "sub/model.safetensors"):
        path = tmp_path / "ckpt"
        shutil.rmtree(path, ignore_errors=True)
        tiny_checkpoint(path, seed=43, shards=2)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = entry
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=rf"model.safetensors.index.json: weight_map entry of {name} is "
                                             rf"'{entry}': expected a plain file name inside"):
            llada_engine.load_model(path)
        two_models[0].save_pretrained(path)
        assert (outside / "model.safetensors").read_bytes() == b"keep"
        assert llada_engine.load_model(path, backend="reference").config.vocab_size == 96


def test_an_index_naming_other_files_as_shards_does_not_get_them_removed(tmp_path, two_models):
    tiny_checkpoint(tmp_path, seed=48, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = iter(index["weight_map"])
    index["weight_map"][next(names)] = "tokenizer.json"
    index["weight_map"][next(names)] = "notes.txt"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "notes.txt").write_bytes(b"mine")
    tokenizer = (tmp_path / "tokenizer.json").read_bytes()
    two_models[0].save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "notes.txt").read_bytes() == b"mine" and (tmp_path / "tokenizer.json").read_bytes() == tokenizer
    torch.testing.assert_close(logits(llada_engine.load_model(tmp_path, backend="reference")), logits(two_models[0]))


# ---- checkpoints that would load wrong ------------------------------------------------------------------------

def test_a_tensor_in_another_dtype_is_cast_to_the_models(tmp_path):
    cfg = dict(TINY_CONFIG)
    sd = tiny_state_dict(cfg, seed=44)
    sd["model.layers.1.attention.dense.weight"] = sd["model.layers.1.attention.dense.weight"].half()
    write_checkpoint(tmp_path, cfg, sd)
    model = llada_engine.load_model(tmp_path, backend="reference")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    dense = "model.layers.1.attention.dense.weight"
    assert torch.equal(model.model.layers[1].attention.dense.weight, sd[dense].float())


def test_a_non_float_tensor_is_refused(tmp_path):
    cfg = dict(TINY_CONFIG)
    sd = tiny_state_dict(cfg, seed=45)
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    write_checkpoint(tmp_path, cfg, sd)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.norm\.weight is stored as I32, expected "
                                         r"a floating dtype"):
        llada_engine.load_model(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number > 0, got nan"),
    ("num_experts_per_tok", 2.0, "num_experts_per_tok must be a positive int, got 2.0"),
    ("num_key_value_heads", 0, "num_key_value_heads must be a positive int, got 0"),
    ("hidden_size", True, "hidden_size must be a positive int, got True"),
    ("use_qk_norm", "yes", "use_qk_norm must be true or false, got 'yes'"),
    ("mask_token_id", -1, r"mask_token_id must be an int >= 0 \(or null\), got -1"),
    ("partial_rotary_factor", 0.0, r"partial_rotary_factor must be a number in \(0, 1\], got 0.0"),
])
def test_bad_config_values_name_the_file_and_key(tmp_path, key, value, message):
    cfg = dict(TINY_CONFIG)
    write_checkpoint(tmp_path, cfg, tiny_state_dict(cfg, seed=46))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
    with pytest.raises(ValueError, match=rf"config\.json: {message}"):
        llada_engine.load_model(tmp_path)


def test_a_safetensors_header_length_of_2_60_is_named(tmp_path):
    cfg = dict(TINY_CONFIG)
    write_checkpoint(tmp_path, cfg, tiny_state_dict(cfg, seed=47))
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[:8] = (2**60).to_bytes(8, "little")
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file: its header length field says "
                                         r"1152921504606846976 bytes, but the file has \d+"):
        llada_engine.load_model(tmp_path)


def test_the_embedded_model_is_verified_against_its_checksums(tmp_path, monkeypatch):
    copy = tmp_path / "default_model"
    shutil.copytree(default.DEFAULT_MODEL_DIR, copy)
    monkeypatch.setattr(default, "DEFAULT_MODEL_DIR", copy)
    assert llada_engine.load_model("default", backend="reference").config.vocab_size == 4096
    good = (copy / "model.safetensors").read_bytes()
    data = bytearray(good)
    data[-100] ^= 0x10                                      # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    for load in (llada_engine.load_model, llada_engine.load_tokenizer):
        with pytest.raises(ValueError, match=r"default_model/model\.safetensors: sha256 [0-9a-f]{64} does not match "
                                             r"checksums\.json \([0-9a-f]{64}\): the installed default model is "
                                             r"damaged; reinstall llada_engine"):
            load("default")
    (copy / "model.safetensors").write_bytes(good)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        llada_engine.load_tokenizer("default")
