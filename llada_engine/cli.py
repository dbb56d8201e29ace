"""The `llada-engine` command line.

    llada-engine info                          what the native extension was built with, what this machine has
    llada-engine generate [--model DIR] PROMPT block-diffusion generation, streamed, with a stats line last
                                               (without --model: the embedded default model)
    llada-engine train CONFIG [--resume]       a training run (llada_engine/training), see configs/
    llada-engine prepare-data IN OUT --tokenizer T    documents (.txt / .jsonl / a Hugging Face dataset) tokenized
                                               once into memory-mapped token shards for training
    llada-engine merge --run RUN --top-k K --out DIR   the mean of the K best checkpoints of a run's last phase
                                               (or --phase NAME) by validation loss
    llada-engine bench [--model DIR] [--batch 1 8]    decoding speed on this machine, cached and uncached
                                               (random prompts; a table, then one JSON line)
"""
import argparse
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    import llada_engine

    info = llada_engine.build_info()
    width = max(len(k) for k in info)
    print(f"llada_engine {llada_engine.__version__}")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise SystemExit("llada-engine generate: give a prompt, or --prompts-file with one prompt per line")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    import torch

    import llada_engine
    from llada_engine.decoding.chat import chat_prompt

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = llada_engine.load_model(args.model, dtype=dtype, device=args.device, backend=args.backend)
    tokenizer = llada_engine.load_tokenizer(args.model)
    texts = _read_prompts(args)
    if args.chat:
        texts = [chat_prompt(t, args.model) for t in texts]
    prompts = [tokenizer.encode(t).ids for t in texts]

    single = len(prompts) == 1
    produced = [[] for _ in prompts]
    shown = [""]

    def stream(index: int, tokens: list) -> None:
        produced[index] += tokens
        if single:
            text = tokenizer.decode(produced[index], skip_special_tokens=True)
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

    out = llada_engine.generate(
        model, prompts, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
        threshold=args.threshold, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_early_stop=args.eos_early_stop, use_cache=not args.no_cache, seed=args.seed, stream=stream)
    if single:
        print()
    else:
        for i, tokens in enumerate(out.sequences):
            print(f"=== {i}: {texts[i]}")
            print(tokenizer.decode(tokens, skip_special_tokens=True))
    print(f"[{out.stats}]", file=sys.stderr if args.quiet_stats else sys.stdout)
    return 0


def _train(args: argparse.Namespace) -> int:
    from llada_engine import train

    return train.run(args)


def _prepare_data(args: argparse.Namespace) -> int:
    from llada_engine.training.prepare_data import prepare_data

    index = prepare_data(args.source, args.out, args.tokenizer, shard_tokens=args.shard_tokens, split=args.split,
                         progress=not args.quiet)
    print(f"{args.out}: {index['documents']} {index['kind']} documents, {index['tokens']} tokens in "
          f"{len(index['shards'])} shards of {index['dtype']} (longest sequence {index['longest_sequence']} tokens)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from llada_engine.training import merge_checkpoints, top_k_by_valid_loss

    paths = args.checkpoints if args.run_dir is None else top_k_by_valid_loss(args.run_dir, args.top_k, args.phase)
    if not paths:
        raise SystemExit("llada-engine merge: give --run RUN_DIR, or checkpoint folders")
    out = merge_checkpoints(paths, args.out)
    print(f"merged {len(paths)} checkpoints into {out}: " + ", ".join(str(p) for p in paths))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _bench(args: argparse.Namespace) -> int:
    import json

    import torch

    import llada_engine
    from llada_engine.decoding.speed import random_prompts, speed_row

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = llada_engine.load_model(args.model, dtype=dtype, device=args.device, backend=args.backend)
    rows = []
    for batch in args.batch:
        prompts = random_prompts(model.config, batch, args.prompt_length, seed=args.seed)
        rows.append(speed_row(model, prompts, gen_length=args.gen_length, uncached=not args.cached_only,
                              block_length=args.block_length, steps=args.steps, threshold=args.threshold))
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)
    on_gpu = model.device.type == "cuda"
    device = torch.cuda.get_device_name(model.device) if on_gpu else f"cpu x{torch.get_num_threads()}"
    print(json.dumps({"benchmark": "generate", "model": str(args.model), "device": device,
                      "dtype": str(model.dtype).replace("torch.", ""), "rows": rows}, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada-engine", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print build and runtime information")
    info.set_defaults(run=_info)

    gen = commands.add_parser("generate", help="generate text from a LLaDA2.0 checkpoint")
    gen.add_argument("prompt", nargs="*", help="prompt text (several prompts are decoded as one batch)")
    gen.add_argument("--model", default="default",
                     help="checkpoint folder (config.json, safetensors, tokenizer.json); default: the embedded model")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat format")
    gen.add_argument("--gen-length", type=int, default=256)
    gen.add_argument("--block-length", type=int, default=32)
    gen.add_argument("--steps", type=int, default=32)
    gen.add_argument("--threshold", type=float, default=0.95)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--eos-early-stop", action="store_true")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    gen.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    gen.add_argument("--backend", choices=["kernels", "reference"], default="kernels")
    gen.add_argument("--quiet-stats", action="store_true", help="print the stats line to stderr")
    gen.set_defaults(run=_generate)

    from llada_engine.train import add_arguments

    train = commands.add_parser("train", help="train or convert a model with a run configuration (YAML or JSON)")
    add_arguments(train)
    train.set_defaults(run=_train)

    prep = commands.add_parser("prepare-data", help="tokenize documents once into memory-mapped token shards")
    prep.add_argument("source", metavar="IN", help="a .txt / .jsonl file, a folder of them, or a Hugging Face "
                                                   "dataset (a save_to_disk folder or a Hub name; needs `datasets`)")
    prep.add_argument("out", metavar="OUT", help="the new folder of token shards (data.train / data.valid)")
    prep.add_argument("--tokenizer", required=True, help="a tokenizer.json, or a checkpoint folder with one")
    prep.add_argument("--shard-tokens", type=_positive_int, default=2**28, help="tokens per shard at most")
    prep.add_argument("--split", help="the split of a Hugging Face dataset (default: train)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=_prepare_data)

    merge = commands.add_parser("merge", help="average checkpoints (a run's top-k by validation loss)")
    merge.add_argument("checkpoints", nargs="*", help="checkpoint folders to average (instead of --run)")
    merge.add_argument("--run", dest="run_dir",
                       help="a run folder: merge its --top-k checkpoints with the lowest validation loss")
    merge.add_argument("--top-k", type=int, default=3)
    merge.add_argument("--phase", help="choose among the checkpoints of this phase (default: the phase of the "
                                       "run's latest checkpoint)")
    merge.add_argument("--out", required=True, help="output folder")
    merge.set_defaults(run=_merge)

    bench = commands.add_parser("bench", help="decoding speed of a checkpoint on this machine (random prompts)")
    bench.add_argument("--model", default="default", help="checkpoint folder; default: the embedded model")
    bench.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 8], help="batch sizes to time")
    bench.add_argument("--prompt-length", type=_positive_int, default=64)
    bench.add_argument("--gen-length", type=_positive_int, default=128)
    bench.add_argument("--block-length", type=_positive_int, default=32)
    bench.add_argument("--steps", type=_positive_int, default=32)
    bench.add_argument("--threshold", type=float, default=0.95)
    bench.add_argument("--cached-only", action="store_true", help="skip the uncached path (slow on long prompts)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    bench.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    bench.add_argument("--backend", choices=["kernels", "reference"], default="kernels")
    bench.set_defaults(run=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
