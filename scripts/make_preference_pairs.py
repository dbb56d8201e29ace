"""Builds the DPO example's preference pairs from the shipped SFT exchanges.

    python scripts/make_preference_pairs.py [--data data] [--train 320] [--valid 40]

For each exchange of data/shakespeare/sft_{train,valid}.jsonl (a speech as the prompt, the next speech of the
scene as the response), the chosen response is that next speech and the rejected one the response of the
exchange half the file away (a speech from another scene, usually another play). Only pairs whose two
sequences (prompt + chosen, prompt + rejected, each with its EOS) fit one row of 256 tokens of
data/tokenizer.json are kept, evenly spread over the file, at most --train / --valid of them. Writes
data/shakespeare/dpo_{train,valid}.jsonl ({"prompt", "chosen", "rejected"} per line).
"""
import argparse
import json
from pathlib import Path

ROW_LENGTH = 256


def preference_pairs(exchanges: list[dict], tokenizer, limit: int) -> list[dict]:
    n = len(exchanges)
    length = lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    pairs = []
    for i, exchange in enumerate(exchanges):
        rejected = exchanges[(i + n // 2) % n]["response"]
        prompt = length(exchange["prompt"])
        if 2 * prompt + length(exchange["response"]) + length(rejected) + 2 <= ROW_LENGTH:
            pairs.append({"prompt": exchange["prompt"], "chosen": exchange["response"], "rejected": rejected})
    step = max(1, len(pairs) // limit)
    return pairs[::step][:limit]


def main(argv=None) -> None:
    from tokenizers import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--valid", type=int, default=40)
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.from_file(str(args.data / "tokenizer.json"))
    for split, limit in (("train", args.train), ("valid", args.valid)):
        source = args.data / "shakespeare" / f"sft_{split}.jsonl"
        exchanges = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        pairs = preference_pairs(exchanges, tokenizer, limit)
        out = args.data / "shakespeare" / f"dpo_{split}.jsonl"
        out.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        print(f"{out}: {len(pairs)} pairs from {len(exchanges)} exchanges")


if __name__ == "__main__":
    main()
