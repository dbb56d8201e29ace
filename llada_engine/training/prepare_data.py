"""`llada-engine prepare-data IN OUT --tokenizer T`: documents tokenized once into memory-mapped token shards.

    prepare_data(inputs, out, tokenizer_file, shard_tokens=2**28) -> the index (a dict, also OUT/index.json)

IN is a .txt or .jsonl file, a folder of them (read in name order), or a Hugging Face dataset (a folder
written by `Dataset.save_to_disk`, or a Hub name with a split) when the `datasets` package is installed;
records as in data.py ({"text"} | {"prompt", "response"} | {"prompt", "chosen", "rejected"}; other columns
of a dataset are ignored). OUT gets, per shard of at most `shard_tokens` tokens (a shard ends at a document
boundary, a DPO pair is never split):

    shard-NNNNN.bin   the token ids without EOS, back to back, uint16 (vocabularies up to 65536) or uint32
    shard-NNNNN.npy   int64 [S, 4]: per sequence its start in the .bin, length, prompt length, role
    index.json        format, kind, dtype, tokenizer (sha256 of its file, vocabulary size), counts, shards

Training reads such a folder as `data.train` / `data.valid` (data.py): the index in memory, the tokens
memory-mapped. OUT is written under a temporary name and renamed when complete.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .data import SHARDS_FORMAT, SHARDS_INDEX, record_kind, record_sequences, records, sha256_file

DATA_SUFFIXES = (".txt", ".jsonl")
ENCODE_BATCH = 1024


def resolve_tokenizer(path) -> Path:
    """A tokenizer.json file, or the tokenizer.json of a checkpoint folder."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return file


def _dataset_records(source: str, split: Optional[str]) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{source}: not a .txt / .jsonl file or a folder of them; reading a Hugging Face dataset "
                         f"needs the `datasets` package (pip install datasets)") from None
    path = Path(source)
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split is None:
                raise ValueError(f"{source}: a dataset of splits {list(dataset)}: choose one with --split")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(source, split=split or "train", streaming=True)
    known = {"text", "prompt", "response", "chosen", "rejected"}
    for i, record in enumerate(dataset):
        yield f"{source}[{i}]", {k: v for k, v in record.items() if k in known}


def input_records(source, split: Optional[str] = None) -> Iterator[tuple[str, dict]]:
    path = Path(source)
    if path.is_file():
        yield from records(path)
    elif path.is_dir() and any(p.suffix in DATA_SUFFIXES for p in path.iterdir()):
        for file in sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file()):
            yield from records(file)
    else:
        yield from _dataset_records(str(source), split)


class _ShardWriter:
    def __init__(self, folder: Path, dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict] = []
        self._open()

    def _open(self):
        self.name = f"shard-{len(self.shards):05d}"
        self.file = open(self.folder / f"{self.name}.bin", "wb")
        self.table: list[tuple[int, int, int, int]] = []
        self.at = 0

    def _close(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        np.save(self.folder / f"{self.name}.npy", np.array(self.table, dtype=np.int64).reshape(-1, 4))
        self.shards.append({"name": self.name, "sequences": len(self.table), "tokens": self.at})

    def add(self, sequences: list[tuple[list[int], int, int]]) -> None:
        """The sequences of one record (kept in one shard)."""
        if self.table and self.at + sum(len(ids) for ids, _, _ in sequences) > self.shard_tokens:
            self._close()
            self._open()
        for ids, prompt_len, role in sequences:
            self.file.write(np.asarray(ids, dtype=self.dtype).tobytes())
            self.table.append((self.at, len(ids), prompt_len, role))
            self.at += len(ids)

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def prepare_data(source, out, tokenizer, *, shard_tokens: int = 2**28, split: Optional[str] = None,
                 progress: bool = False) -> dict:
    """Tokenizes the documents of `source` into token shards in the new folder `out` (see the module doc)."""
    from tokenizers import Tokenizer
    from tqdm import tqdm

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new output folder")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tokenizer_file = resolve_tokenizer(tokenizer)
    tok = Tokenizer.from_file(str(tokenizer_file))
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    temp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        writer, kind, pending = _ShardWriter(temp, dtype, shard_tokens), None, []
        documents = tokens = longest = 0
        max_id = -1

        def flush():
            nonlocal documents, tokens, longest, max_id
            texts = [text for record in pending for text in record.values()]
            encoded = iter(e.ids for e in tok.encode_batch(texts, add_special_tokens=False))
            for record in pending:
                sequences = record_sequences({key: next(encoded) for key in record}, kind)
                writer.add(sequences)
                for ids, _, _ in sequences:
                    tokens += len(ids)
                    longest = max(longest, len(ids))
                    max_id = max(max_id, max(ids, default=-1))
            documents += len(pending)
            bar.update(len(pending))
            pending.clear()

        with tqdm(desc=f"tokenizing {Path(str(source)).name}", unit=" docs", disable=not progress) as bar:
            for where, record in input_records(source, split):
                kind = record_kind(where, record, kind)
                pending.append(record)
                if len(pending) == ENCODE_BATCH:
                    flush()
            flush()
        if documents == 0:
            raise ValueError(f"{source}: no documents")
        index = {"format": SHARDS_FORMAT, "version": 1, "kind": kind, "dtype": np.dtype(dtype).name,
                 "tokenizer": str(tokenizer_file), "tokenizer_sha256": sha256_file(tokenizer_file),
                 "vocab_size": vocab, "max_token_id": max_id, "documents": documents, "tokens": tokens,
                 "longest_sequence": longest, "source": str(source), "shards": writer.finish()}
        (temp / SHARDS_INDEX).write_text(json.dumps(index, indent=1) + "\n")
        os.rename(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return index
