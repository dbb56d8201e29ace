"""The numbers the README reports for the embedded default model, as markdown.

    python scripts/report_default_model.py [--runs runs]

Validation losses from the recipe's runs (RUN/metrics.jsonl: AR next-token loss; converted and SFT models:
masked-token loss at t = 0.5), TPF and tokens/s of generate() at thresholds 0.7, 0.9 and 0.95 on the
shipped model, and three sample generations with their settings.
"""
import argparse
import json
from pathlib import Path

import torch

import llada_engine

PROMPTS = ["ROMEO:\n", "HAMLET:\n", "KING LEAR:\n", "JULIET:\n", "MACBETH:\n", "PORTIA:\n", "FALSTAFF:\n", "ROSALIND:\n"]
SAMPLES = [("ROMEO:\n", dict(threshold=0.9)), ("HAMLET:\nTo be, or not to be,", dict(threshold=0.95)),
           ("KING LEAR:\n", dict(threshold=0.7, temperature=0.8, top_p=0.9, seed=1))]


def last_valid_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["valid_loss"] for r in rows if "valid_loss" in r][-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print("| model | validation loss |\n|---|---|")
    for name, run in (("AR (next token)", "tiny-ar"), ("converted, WSD (masked tokens, t = 0.5)", "tiny-wsd"),
                      ("SFT (masked tokens, t = 0.5)", "tiny-sft")):
        print(f"| {name} | {last_valid_loss(args.runs / run):.3f} |")

    model = llada_engine.load_model("default", dtype=torch.float32)
    tokenizer = llada_engine.load_tokenizer("default")
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    print("\n| threshold | TPF | tokens/s (batch 8, gen 128, fp32, 2 threads) |\n|---|---|---|")
    for threshold in (0.7, 0.9, 0.95):
        llada_engine.generate(model, prompts[:1], gen_length=32, threshold=threshold)
        out = llada_engine.generate(model, prompts, gen_length=128, threshold=threshold)
        print(f"| {threshold} | {out.stats.tokens_per_forward:.2f} | {out.stats.tokens_per_second:.0f} |")
    print()
    for prompt, settings in SAMPLES:
        out = llada_engine.generate(model, tokenizer.encode(prompt).ids, gen_length=96, **settings)
        text = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        print(f"`{prompt!r}` ({shown}, gen_length=96; TPF {out.stats.tokens_per_forward:.2f}):\n```\n{prompt}{text}\n```")


if __name__ == "__main__":
    main()
