"""Data: packing into fixed rows of whole sequences, deterministic order by seed, a position that resumes
exactly, DPO pairs kept together, and clear errors for bad files and documents."""
import json

import numpy as np
import pytest

import llada_engine
from llada_engine.training.data import CHOSEN, PADDING, REJECTED, PackedData, read_examples
from training_testing import EOS, dpo_corpus, jsonl, sft_corpus, small_checkpoint, text_corpus


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path, _, _ = small_checkpoint(tmp_path_factory.mktemp("data"))
    return llada_engine.load_tokenizer(path)


def test_text_documents_are_packed_whole_with_eos(tmp_path, tokenizer):
    examples = read_examples(text_corpus(tmp_path / "c.txt", n=30), tokenizer, EOS, 64)
    assert len(examples) == 30 and all(e.sequences[0].ids[-1] == EOS for e in examples)
    data = PackedData(examples, 64, EOS, seed=1)
    rows = data.rows(0)
    docs = sorted(tuple(e.sequences[0].ids) for e in examples)
    seen = []
    for row in rows:
        assert len(row.tokens) == 64 == sum(row.lengths)
        at = 0
        for n, role in zip(row.lengths, row.roles):
            if role != PADDING:
                seen.append(tuple(row.tokens[at:at + n].tolist()))
            at += n
    assert sorted(seen) == docs
    tokens = lambda rs: [r.tokens.tolist() for r in rs]  # noqa: E731
    assert tokens(PackedData(examples, 64, EOS, seed=1).rows(0)) == tokens(rows)
    assert tokens(PackedData(examples, 64, EOS, seed=2).rows(0)) != tokens(rows)


def test_position_resumes_exactly(tmp_path, tokenizer):
    examples = read_examples(text_corpus(tmp_path / "c.txt", n=30), tokenizer, EOS, 64)
    straight = PackedData(examples, 64, EOS, seed=3)
    want = [r.tokens.tolist() for _ in range(12) for r in straight.next_rows(3)]   # crosses epochs
    first = PackedData(examples, 64, EOS, seed=3)
    got = [r.tokens.tolist() for _ in range(5) for r in first.next_rows(3)]
    state = json.loads(json.dumps(first.state()))
    resumed = PackedData(examples, 64, EOS, seed=3)
    resumed.load_state(state)
    got += [r.tokens.tolist() for _ in range(7) for r in resumed.next_rows(3)]
    assert got == want and straight.epoch >= 1


def test_sft_and_dpo_records(tmp_path, tokenizer):
    sft = read_examples(sft_corpus(tmp_path / "s.jsonl", n=3), tokenizer, EOS, 64)
    seq = sft[0].sequences[0]
    assert seq.prompt_len == len("q0: cat?") and tokenizer.decode(seq.ids[seq.prompt_len:-1]) == " the cat sat 0."
    dpo = read_examples(dpo_corpus(tmp_path / "d.jsonl", n=10), tokenizer, EOS, 64)
    assert [s.role for s in dpo[0].sequences] == [CHOSEN, REJECTED]
    for row in PackedData(dpo, 64, EOS).rows(0):
        roles = [r for r in row.roles if r != PADDING]
        assert roles == [CHOSEN, REJECTED] * (len(roles) // 2)


def test_split_long_cuts_plain_text(tmp_path, tokenizer):
    (tmp_path / "long.txt").write_text("x" * 150)
    examples = read_examples(tmp_path / "long.txt", tokenizer, EOS, 64, split_long=True)
    assert [e.length for e in examples] == [64, 64, 23]


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
        read_examples(path, tokenizer, EOS, 64)
