"""Training data: documents tokenized into a corpus, and a corpus packed into rows of fixed length.

    corpus = read_corpus(path, tokenizer)       a .txt / .jsonl file, tokenized in memory, or a folder made by
                                                `llada-engine prepare-data` (prepare_data.py), memory-mapped
    data = PackedData(corpus, row_length, eos_id=, pad_id=, seed=, shuffle=, split_long=, pad_multiple=)
    rows, fill = data.take(n, rank, world)      this process's rows (i, Row) of the next n, and the fill rate
    data.state() / data.load_state(state)       the position: (epoch, cursor), exact

Files: `.txt` holds plain documents separated by blank lines; `.jsonl` one record a line, all of one kind:
{"text"} (pre-training), {"prompt", "response"} (SFT) or {"prompt", "chosen", "rejected"} (DPO).
A corpus holds each document's tokens without EOS; packing appends it. An SFT sequence is prompt + response
+ EOS, then EOS up to a whole number of `pad_multiple` tokens (the blocks of the run), its prompt never
trained, its EOS padding trained. A DPO example is two sequences (prompt + chosen, prompt + rejected) that
always share a row. With split_long a plain document longer than a row is cut into row-sized pieces.

A row holds whole examples, each sequence its own varlen sequence (document-level masking is the varlen
boundary); what is left of a row is one padding sequence that is never trained. The rows are a next-fit
packing of the examples in a permutation drawn from (seed, epoch), built lazily from the examples' lengths:
each process materialises the tokens of its own rows only (rows i with i % world == rank), and a corpus of
token shards is never read whole. The position (epoch, cursor: the next example of the permutation) is
saved with every checkpoint, so a resumed run sees exactly the rows it would have seen.
"""
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

PLAIN, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1
KINDS = {("text",): "text", ("prompt", "response"): "sft", ("chosen", "prompt", "rejected"): "dpo"}
SHARDS_FORMAT = "llada-engine token shards"
SHARDS_INDEX = "index.json"


@dataclasses.dataclass
class Row:
    """One packed row: tokens int64 [L], the length / prompt length / role of each of its S sequences."""
    tokens: np.ndarray
    lengths: list[int]
    prompt_lens: list[int]
    roles: list[int]


@dataclasses.dataclass
class Corpus:
    """Tokenized documents: shard k's tokens are `shards[k]` (an array, memory-mapped for a prepared folder);
    sequence s is `sequences[s]` = (shard, start, length, prompt_len, role), its tokens without EOS."""
    kind: str                       # text | sft | dpo
    shards: list
    sequences: np.ndarray           # int64 [S, 5]
    source: str
    wheres: Optional[list] = None   # 'file:line' of each sequence, for error messages
    tokenizer_sha256: Optional[str] = None
    max_token_id: int = -1

    def where(self, s: int) -> str:
        return self.wheres[s] if self.wheres is not None else f"{self.source}: document {s}"

    def tokens(self, s: int) -> np.ndarray:
        shard, start, length = (int(v) for v in self.sequences[s, :3])
        return np.asarray(self.shards[shard][start:start + length])


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- records --------------------------------------------------------------------------------------------------

def records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each document of a .txt or .jsonl file; where = 'file:line' for error messages."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".txt":
        block, start = [], 1
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if line.strip():
                    if not block:
                        start = line_no
                    block.append(line)
                elif block:
                    yield f"{path}:{start}", {"text": "\n".join(block)}
                    block = []
        if block:
            yield f"{path}:{start}", {"text": "\n".join(block)}
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({error})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield f"{path}:{line_no}", record
    else:
        raise ValueError(f"{path}: unknown data format {path.suffix!r} (expected .txt or .jsonl)")


def record_kind(where: str, record: dict, kind: Optional[str]) -> str:
    """The kind of a record (text | sft | dpo), checked against the file's kind so far and for empty fields."""
    keys = tuple(sorted(record))
    if keys not in KINDS:
        raise ValueError(f"{where}: a record must have the keys text | prompt, response | prompt, chosen, "
                         f"rejected; got {list(record)}")
    if kind is not None and KINDS[keys] != kind:
        raise ValueError(f"{where}: a {KINDS[keys]} record in a file of {kind} records")
    for key, value in record.items():
        if not isinstance(value, str) or (key != "prompt" and not value.strip()):
            raise ValueError(f"{where}: empty document ({key!r} is {value!r})")
    return KINDS[keys]


def record_sequences(ids: dict, kind: str) -> list[tuple[list[int], int, int]]:
    """(ids without EOS, prompt length, role) of each sequence of a record whose fields are tokenized (`ids`)."""
    if kind == "text":
        return [(ids["text"], 0, PLAIN)]
    prompt = ids["prompt"]
    if kind == "sft":
        return [(prompt + ids["response"], len(prompt), PLAIN)]
    return [(prompt + ids[side], len(prompt), role) for side, role in (("chosen", CHOSEN), ("rejected", REJECTED))]


def read_corpus(path, tokenizer) -> Corpus:
    """The corpus of a .txt / .jsonl file (tokenized here) or of a folder made by prepare-data."""
    path = Path(path)
    if path.is_dir():
        return open_shards(path)
    kind = None
    tokens, sequences, wheres = [], [], []
    at = 0
    for where, record in records(path):
        kind = record_kind(where, record, kind)
        encoded = {key: tokenizer.encode(text, add_special_tokens=False).ids for key, text in record.items()}
        for ids, prompt_len, role in record_sequences(encoded, kind):
            tokens.append(np.asarray(ids, dtype=np.int64))
            sequences.append((0, at, len(ids), prompt_len, role))
            wheres.append(where)
            at += len(ids)
    if not sequences:
        raise ValueError(f"{path}: no documents")
    flat = np.concatenate(tokens)
    return Corpus(kind, [flat], np.array(sequences, dtype=np.int64).reshape(-1, 5), str(path), wheres,
                  max_token_id=int(flat.max()) if len(flat) else -1)


def open_shards(path: Path) -> Corpus:
    """A folder of token shards (prepare_data.py) as a corpus: its index in memory, its tokens memory-mapped."""
    index_file = path / SHARDS_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{path}: not a prepared data folder (no {SHARDS_INDEX}; make one with "
                                f"llada-engine prepare-data)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{index_file}: not valid JSON ({error})") from None
    if index.get("format") != SHARDS_FORMAT:
        raise ValueError(f"{index_file}: not an index of {SHARDS_FORMAT!r}")
    shards, tables = [], []
    for k, shard in enumerate(index["shards"]):
        tokens_file, table_file = path / f"{shard['name']}.bin", path / f"{shard['name']}.npy"
        for file in (tokens_file, table_file):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing shard")
        dtype = np.dtype(index["dtype"])
        if tokens_file.stat().st_size != shard["tokens"] * dtype.itemsize:
            raise ValueError(f"{tokens_file}: {tokens_file.stat().st_size} bytes, expected {shard['tokens']} tokens "
                             f"of {dtype}")
        shards.append(np.memmap(tokens_file, dtype=dtype, mode="r", shape=(shard["tokens"],))
                      if shard["tokens"] else np.zeros(0, dtype=dtype))
        table = np.load(table_file)
        if table.shape != (shard["sequences"], 4):
            raise ValueError(f"{table_file}: table of shape {list(table.shape)}, expected [{shard['sequences']}, 4]")
        tables.append(np.concatenate([np.full((len(table), 1), k, dtype=np.int64), table.astype(np.int64)], 1))
    return Corpus(index["kind"], shards, np.concatenate(tables), str(path),
                  tokenizer_sha256=index.get("tokenizer_sha256"), max_token_id=int(index.get("max_token_id", -1)))


# ---- packing ---------------------------------------------------------------------------------------------------

class PackedData:
    """Rows of an epoch, epoch after epoch, from a saved position (see the module doc)."""

    def __init__(self, corpus: Corpus, row_length: int, *, eos_id: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True, split_long: bool = False, pad_multiple: int = 1):
        self.corpus, self.row_length, self.eos_id, self.pad_id = corpus, row_length, eos_id, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.kind = corpus.kind
        seqs = corpus.sequences
        raw = seqs[:, 2]                                                            # [S] tokens without EOS
        full = raw + 1                                                              # with EOS
        # windows: (sequence, offset, length) of every packed sequence; an example is 1 window (2 for dpo)
        if corpus.kind == "text" and split_long:
            pieces = -(-full // row_length)                                         # [S]
            self.win_seq = np.repeat(np.arange(len(seqs)), pieces)                  # [W]
            first = np.repeat(np.cumsum(pieces) - pieces, pieces)
            self.win_off = (np.arange(len(self.win_seq)) - first) * row_length
            self.win_len = np.minimum(row_length, full[self.win_seq] - self.win_off)
        else:
            self.win_seq = np.arange(len(seqs))
            self.win_off = np.zeros(len(seqs), dtype=np.int64)
            self.win_len = -(-full // pad_multiple) * pad_multiple if corpus.kind == "sft" else full
        self.group = group = 2 if corpus.kind == "dpo" else 1
        self.ex_len = self.win_len.reshape(-1, group).sum(1)                        # [N]
        split = corpus.kind == "text" and split_long
        unpadded = self.ex_len if split else full[self.win_seq].reshape(-1, group).sum(1)
        too_long = np.flatnonzero(unpadded > row_length)
        if len(too_long):
            e = int(too_long[0])
            raise ValueError(f"{corpus.where(int(self.win_seq[e * group]))}: document of {int(unpadded[e])} tokens "
                             f"is longer than data.row_length {row_length}"
                             + (" (set data.split_long to cut plain text)" if corpus.kind == "text" else ""))
        self.examples = len(self.ex_len)
        self.epoch, self.cursor = 0, 0
        self._order, self._order_epoch = None, -1

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.examples
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _next_row(self) -> tuple[np.ndarray, int]:
        """The examples of the next row and their tokens; advances the position."""
        order = self.order(self.epoch)
        start, used = self.cursor, 0
        while self.cursor < self.examples and used + self.ex_len[order[self.cursor]] <= self.row_length:
            used += int(self.ex_len[order[self.cursor]])
            self.cursor += 1
        picked = order[start:self.cursor]
        if self.cursor >= self.examples:
            self.epoch, self.cursor = self.epoch + 1, 0
        return picked, used

    def _window_tokens(self, w: int) -> np.ndarray:
        """The tokens of window w: its part of the sequence's tokens, then EOS (the end and any padding)."""
        s, off, length = int(self.win_seq[w]), int(self.win_off[w]), int(self.win_len[w])
        ids = self.corpus.tokens(s)
        out = np.full(length, self.eos_id, dtype=np.int64)
        part = ids[off:off + length]
        out[:len(part)] = part
        return out

    def _row(self, examples: np.ndarray) -> Row:
        tokens = np.full(self.row_length, self.pad_id, dtype=np.int64)
        lengths, prompt_lens, roles, at = [], [], [], 0
        for e in examples:
            for w in range(int(e) * self.group, int(e) * self.group + self.group):
                ids = self._window_tokens(w)
                tokens[at:at + len(ids)] = ids
                at += len(ids)
                s = int(self.win_seq[w])
                lengths.append(len(ids))
                prompt_lens.append(int(self.corpus.sequences[s, 3]) if self.win_off[w] == 0 else 0)
                roles.append(int(self.corpus.sequences[s, 4]))
        if at < self.row_length:
            lengths.append(self.row_length - at)
            prompt_lens.append(0)
            roles.append(PADDING)
        return Row(tokens, lengths, prompt_lens, roles)

    def take(self, n: int, rank: int = 0, world: int = 1) -> tuple[list[tuple[int, Row]], float]:
        """Rows i of the next n with i % world == rank, as (i, row), and the fill rate of all n rows (the
        fraction of their tokens that are data, not padding)."""
        out, used = [], 0
        for i in range(n):
            examples, filled = self._next_row()
            used += filled
            if i % world == rank:
                out.append((i, self._row(examples)))
        return out, used / (n * self.row_length)

    def next_rows(self, n: int) -> list[Row]:
        return [row for _, row in self.take(n)[0]]

    def epoch_rows(self, limit: int = 0) -> list[Row]:
        """The rows of one epoch from the start (at most `limit`, 0: all), leaving the position as it was."""
        saved = self.state()
        self.load_state({"epoch": 0, "cursor": 0, "examples": self.examples})
        rows = []
        while self.epoch == 0 and (not limit or len(rows) < limit):
            rows.append(self._row(self._next_row()[0]))
        self.load_state(saved)
        return rows

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "examples": self.examples}

    def load_state(self, state: dict) -> None:
        if int(state["examples"]) != self.examples:
            raise ValueError(f"{self.corpus.source}: the data has {self.examples} examples, the checkpoint's "
                             f"position is in data of {state['examples']}: the training data changed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def lcm(values) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out
