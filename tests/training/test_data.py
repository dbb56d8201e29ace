"""Data: packing into fixed rows of whole sequences, deterministic order by seed, a position that resumes
exactly, each process materialising its own rows, the fill rate, DPO pairs kept together, SFT padded with
trained EOS to whole blocks, clear errors for bad files and documents; prepare-data round-trips documents
into memory-mapped token shards that pack into the same rows and resume at the exact position."""
import json

import numpy as np
import pytest
import torch

import llada_engine
from llada_engine.cli import main as cli_main
from llada_engine.training.data import CHOSEN, PADDING, REJECTED, PackedData, read_corpus
from llada_engine.training.noise import trainable
from llada_engine.training.prepare_data import prepare_data
from training_testing import EOS, dpo_corpus, jsonl, sft_corpus, small_checkpoint, text_corpus


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _, _ = small_checkpoint(tmp_path_factory.mktemp("data"))
    return path


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return llada_engine.load_tokenizer(checkpoint)


def packed(path, tokenizer, row_length=64, **kw):
    kw.setdefault("seed", 0)
    return PackedData(read_corpus(path, tokenizer), row_length, eos_id=EOS, pad_id=EOS, **kw)


def sequences_of(row):
    at, out = 0, []
    for n, role, prompt in zip(row.lengths, row.roles, row.prompt_lens):
        if role != PADDING:
            out.append((tuple(row.tokens[at:at + n].tolist()), prompt, role))
        at += n
    return out


def test_text_documents_are_packed_whole_with_eos(tmp_path, tokenizer):
    path = text_corpus(tmp_path / "c.txt", n=30)
    data = packed(path, tokenizer, seed=1)
    rows = data.epoch_rows()
    docs = sorted(tuple(tokenizer.encode(d, add_special_tokens=False).ids + [EOS])
                  for d in path.read_text().strip().split("\n\n"))
    assert len(docs) == 30
    for row in rows:
        assert len(row.tokens) == 64 == sum(row.lengths)
    assert sorted(ids for row in rows for ids, _, _ in sequences_of(row)) == docs
    tokens = lambda rs: [r.tokens.tolist() for r in rs]  # noqa: E731
    assert tokens(packed(path, tokenizer, seed=1).epoch_rows()) == tokens(rows)
    assert tokens(packed(path, tokenizer, seed=2).epoch_rows()) != tokens(rows)


def test_position_resumes_exactly_and_each_process_takes_its_rows(tmp_path, tokenizer):
    path = text_corpus(tmp_path / "c.txt", n=30)
    straight = packed(path, tokenizer, seed=3)
    want = [r.tokens.tolist() for _ in range(12) for r in straight.next_rows(3)]   # crosses epochs
    first = packed(path, tokenizer, seed=3)
    got = [r.tokens.tolist() for _ in range(5) for r in first.next_rows(3)]
    state = json.loads(json.dumps(first.state()))
    resumed = packed(path, tokenizer, seed=3)
    resumed.load_state(state)
    got += [r.tokens.tolist() for _ in range(7) for r in resumed.next_rows(3)]
    assert got == want and straight.epoch >= 1

    whole, fill = packed(path, tokenizer, seed=4).take(5)
    parts = [packed(path, tokenizer, seed=4).take(5, rank, 2) for rank in (0, 1)]
    assert [i for i, _ in parts[0][0]] == [0, 2, 4] and [i for i, _ in parts[1][0]] == [1, 3]
    for i, row in parts[0][0] + parts[1][0]:
        assert row.tokens.tolist() == whole[i][1].tokens.tolist()
    assert parts[0][1] == parts[1][1] == fill
    data_tokens = sum(n for _, row in whole for n, r in zip(row.lengths, row.roles) if r != PADDING)
    assert fill == data_tokens / (5 * 64) and 0.5 < fill < 1
    with pytest.raises(ValueError, match="the training data changed"):
        packed(text_corpus(tmp_path / "other.txt", n=31), tokenizer).load_state(state)


def test_sft_pads_to_whole_blocks_with_trained_eos_and_dpo_pairs_share_a_row(tmp_path, tokenizer):
    sft = packed(sft_corpus(tmp_path / "s.jsonl", n=6), tokenizer, shuffle=False, pad_multiple=16)
    row = sft.epoch_rows()[0]
    (ids, prompt, _), *_ = sequences_of(row)
    want = tokenizer.encode("q0: cat?", add_special_tokens=False).ids + \
        tokenizer.encode(" the cat sat 0.", add_special_tokens=False).ids + [EOS]
    assert prompt == len("q0: cat?") and len(ids) % 16 == 0 and len(want) % 16 != 0
    assert list(ids) == want + [EOS] * (len(ids) - len(want))
    assert trainable(row)[:len(ids)].tolist() == [False] * prompt + [True] * (len(ids) - prompt)
    assert all(n % 16 == 0 for n, r in zip(row.lengths, row.roles) if r != PADDING)

    dpo = packed(dpo_corpus(tmp_path / "d.jsonl", n=10), tokenizer)
    for row in dpo.epoch_rows():
        roles = [r for r in row.roles if r != PADDING]
        assert roles == [CHOSEN, REJECTED] * (len(roles) // 2) and roles


def test_split_long_cuts_plain_text(tmp_path, tokenizer):
    (tmp_path / "long.txt").write_text("x" * 150)
    data = packed(tmp_path / "long.txt", tokenizer, split_long=True, shuffle=False)
    assert [n for row in data.epoch_rows() for n, r in zip(row.lengths, row.roles) if r != PADDING] == [64, 64, 23]


@pytest.mark.parametrize("name,content,message", [
    ("missing.txt", None, "no such data file"),
    ("empty.jsonl", [{"text": "fine"}, {"text": "  "}], "empty.jsonl:2: empty document"),
    ("long.jsonl", [{"text": "ok"}, {"text": "y" * 80}],
     "long.jsonl:2: document of 81 tokens is longer than data.row_length 64"),
    ("long_sft.jsonl", [{"prompt": "p" * 40, "response": "r" * 30}], "long_sft.jsonl:1: document of 71 tokens"),
    ("mixed.jsonl", [{"text": "a"}, {"prompt": "b", "response": "c"}], "mixed.jsonl:2: a sft record in a file of text"),
    ("keys.jsonl", [{"body": "a"}], "keys.jsonl:1: a record must have the keys"),
    ("bad.csv", "a,b", "unknown data format '.csv'"),
    ("nothing.txt", "\n\n", "no documents"),
])
def test_bad_data_is_a_clear_error(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    if isinstance(content, list):
        jsonl(path, content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(".", r"\.")):
        packed(path, tokenizer)


@pytest.mark.parametrize("kind", ["text", "sft", "dpo"])
def test_prepare_data_round_trips_into_memory_mapped_shards(tmp_path, checkpoint, tokenizer, kind):
    source = {"text": lambda p: text_corpus(p.with_suffix(".txt"), n=50), "sft": lambda p: sft_corpus(p, n=30),
              "dpo": lambda p: dpo_corpus(p, n=20)}[kind](tmp_path / "in.jsonl")
    index = prepare_data(source, tmp_path / "shards", checkpoint, shard_tokens=200)
    memory, mapped = read_corpus(source, tokenizer), read_corpus(tmp_path / "shards", tokenizer)
    assert index["kind"] == mapped.kind == kind and len(index["shards"]) > 2 and index["dtype"] == "uint16"
    assert all(isinstance(shard, np.memmap) for shard in mapped.shards)
    assert len(mapped.sequences) == len(memory.sequences)
    for s in range(len(memory.sequences)):
        assert mapped.tokens(s).tolist() == memory.tokens(s).tolist()
        assert mapped.sequences[s, 3:].tolist() == memory.sequences[s, 3:].tolist()

    def rows(corpus, state=None, n=7):
        data = PackedData(corpus, 64, eos_id=EOS, pad_id=EOS, seed=5, pad_multiple=4)
        if state:
            data.load_state(state)
        return [r.tokens.tolist() for _ in range(n) for r in data.next_rows(3)], data.state()

    want, _ = rows(memory)
    assert rows(mapped)[0] == want
    first, state = rows(read_corpus(tmp_path / "shards", tokenizer), n=3)
    rest, _ = rows(read_corpus(tmp_path / "shards", tokenizer), json.loads(json.dumps(state)), n=4)
    assert first + rest == want


def test_prepare_data_command_folders_and_errors(tmp_path, checkpoint, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    text_corpus(folder / "b.txt", n=5, seed=1)
    text_corpus(folder / "a.txt", n=4)
    out = tmp_path / "shards"
    assert cli_main(["prepare-data", str(folder), str(out), "--tokenizer", str(checkpoint / "tokenizer.json"),
                     "--quiet"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["documents"] == 9 and index["shards"][0]["sequences"] == 9
    first = read_corpus(out, tokenizer).tokens(0)
    assert first.tolist() == read_corpus(folder / "a.txt", tokenizer).tokens(0).tolist()
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_data(folder, out, checkpoint)
    jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": ""}])
    with pytest.raises(ValueError, match="bad.jsonl:2: empty document"):
        prepare_data(tmp_path / "bad.jsonl", tmp_path / "never", checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "docs", "shards"]   # nothing half-written
    (out / "shard-00000.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="shard-00000.bin: 2 bytes, expected"):
        read_corpus(out, tokenizer)


def test_prepare_data_reads_a_hugging_face_dataset(tmp_path, checkpoint, tokenizer):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": f"q{i}?", "response": f" r{i}.", "id": i} for i in range(12)]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    prepare_data(tmp_path / "hf", tmp_path / "shards", checkpoint)
    mapped = read_corpus(tmp_path / "shards", tokenizer)
    memory = read_corpus(jsonl(tmp_path / "same.jsonl", [{k: r[k] for k in ("prompt", "response")} for r in records]),
                         tokenizer)
    assert mapped.kind == "sft"
    assert [mapped.tokens(s).tolist() for s in range(12)] == [memory.tokens(s).tolist() for s in range(12)]
    assert torch.equal(torch.from_numpy(mapped.sequences[:, 3:]), torch.from_numpy(memory.sequences[:, 3:]))
