"""Training data: documents read from text or JSONL files, tokenized, and packed into rows of fixed length.

    read_examples(path, tokenizer, eos_id, row_length, split_long) -> list[Example]
    PackedData(examples, row_length, pad_id, seed, shuffle) .next_rows(n) -> list[Row]; .state() / .load_state()

Files: `.txt` holds plain documents separated by blank lines; `.jsonl` one record a line, all of one kind:
{"text"} (pre-training), {"prompt", "response"} (SFT) or {"prompt", "chosen", "rejected"} (DPO).
Every sequence ends with EOS. An SFT sequence is prompt + response, its prompt never trained; a DPO
example is two sequences (prompt + chosen, prompt + rejected) that always share a row.

A row holds whole sequences, each its own varlen sequence (document-level masking is the varlen boundary);
what is left of a row is one padding sequence that is never trained. The order of the examples is a
permutation drawn from (seed, epoch); the data position (epoch, row) is saved with every checkpoint, so a
resumed run sees exactly the rows it would have seen.
"""
import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

PLAIN, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1
KINDS = {("text",): "text", ("prompt", "response"): "sft", ("chosen", "prompt", "rejected"): "dpo"}


@dataclasses.dataclass
class Sequence:
    ids: list[int]
    prompt_len: int = 0             # leading tokens that are never trained
    role: int = PLAIN


@dataclasses.dataclass
class Example:
    sequences: list[Sequence]       # one, or two for DPO (chosen then rejected)
    kind: str                       # text | sft | dpo

    @property
    def length(self) -> int:
        return sum(len(s.ids) for s in self.sequences)


@dataclasses.dataclass
class Row:
    """One packed row: tokens int64 [L], the length / prompt length / role of each of its S sequences."""
    tokens: np.ndarray
    lengths: list[int]
    prompt_lens: list[int]
    roles: list[int]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _records(path: Path):
    """(where, record) for each document of a file; where = 'file:line' for error messages."""
    if path.suffix == ".txt":
        line_no, block, start = 0, [], 1
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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


def read_examples(path, tokenizer, eos_id: int, row_length: int, split_long: bool = False) -> list[Example]:
    """Tokenized examples of a data file (see the module doc). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    examples, kind = [], None
    for where, record in _records(path):
        keys = tuple(sorted(record))
        if keys not in KINDS:
            raise ValueError(f"{where}: a record must have the keys text | prompt, response | prompt, chosen, "
                             f"rejected; got {list(record)}")
        if kind is None:
            kind = KINDS[keys]
        elif KINDS[keys] != kind:
            raise ValueError(f"{where}: a {KINDS[keys]} record in a file of {kind} records")
        for key, value in record.items():
            if not isinstance(value, str) or (key != "prompt" and not value.strip()):
                raise ValueError(f"{where}: empty document ({key!r} is {value!r})")
        if kind == "text":
            ids = _encode(tokenizer, record["text"]) + [eos_id]
            if len(ids) > row_length and split_long:
                examples += [Example([Sequence(ids[i:i + row_length])], kind) for i in range(0, len(ids), row_length)]
                continue
            example = Example([Sequence(ids)], kind)
        elif kind == "sft":
            prompt = _encode(tokenizer, record["prompt"])
            example = Example([Sequence(prompt + _encode(tokenizer, record["response"]) + [eos_id], len(prompt))], kind)
        else:
            prompt = _encode(tokenizer, record["prompt"])
            example = Example([Sequence(prompt + _encode(tokenizer, record[side]) + [eos_id], len(prompt), role)
                               for side, role in (("chosen", CHOSEN), ("rejected", REJECTED))], kind)
        if example.length > row_length:
            raise ValueError(f"{where}: document of {example.length} tokens is longer than data.row_length "
                             f"{row_length}" + (" (set data.split_long to cut plain text)" if kind == "text" else ""))
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no documents")
    return examples


def pack(examples: list[Example], order: np.ndarray, row_length: int, pad_id: int) -> list[Row]:
    """Next-fit packing of the examples in `order` into rows of row_length tokens."""
    rows, current, used = [], [], 0

    def close():
        tokens = np.full(row_length, pad_id, dtype=np.int64)
        lengths, prompt_lens, roles, at = [], [], [], 0
        for seq in current:
            tokens[at:at + len(seq.ids)] = seq.ids
            at += len(seq.ids)
            lengths.append(len(seq.ids))
            prompt_lens.append(seq.prompt_len)
            roles.append(seq.role)
        if at < row_length:
            lengths.append(row_length - at)
            prompt_lens.append(0)
            roles.append(PADDING)
        rows.append(Row(tokens, lengths, prompt_lens, roles))

    for i in order:
        example = examples[i]
        if used + example.length > row_length:
            close()
            current, used = [], 0
        current += example.sequences
        used += example.length
    if current:
        close()
    return rows


class PackedData:
    """Rows of an epoch, epoch after epoch, from a saved position."""

    def __init__(self, examples: list[Example], row_length: int, pad_id: int, seed: int = 0, shuffle: bool = True):
        self.examples = examples
        self.row_length = row_length
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.kind = examples[0].kind
        self.epoch, self.index = 0, 0
        self._rows: Optional[list[Row]] = None
        self._rows_epoch = -1

    def rows(self, epoch: int) -> list[Row]:
        if self._rows_epoch != epoch:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._rows, self._rows_epoch = pack(self.examples, order, self.row_length, self.pad_id), epoch
        return self._rows

    def next_rows(self, n: int) -> list[Row]:
        out = []
        while len(out) < n:
            rows = self.rows(self.epoch)
            take = rows[self.index:self.index + n - len(out)]
            out += take
            self.index += len(take)
            if self.index >= len(rows):
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
