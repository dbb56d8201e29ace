"""The `llada-engine` command line.

    llada-engine info                          what the native extension was built with, what this machine has
    llada-engine generate [--model DIR|HUB_ID] PROMPT   block-diffusion generation, streamed, with a stats
                                               line last (without --model: the embedded default model)
    llada-engine train CONFIG [--resume]       a training run (llada_engine/training), see configs/
    llada-engine prepare-data IN OUT --tokenizer T    documents (.txt / .jsonl / a Hugging Face dataset) tokenized
                                               once into memory-mapped token shards for training
    llada-engine merge --run RUN --top-k K --out DIR   the mean of the K best checkpoints of a run's last phase
                                               (or --phase NAME) by validation loss
    llada-engine bench [--model DIR] [--batch 1 8]    decoding speed on this machine, cached and uncached
                                               (random prompts; a table, then one JSON line)
    llada-engine serve [--model DIR] [--port 8000]    an OpenAI-compatible HTTP server on the continuous-batching
                                               engine (/v1/completions, /v1/chat/completions, /metrics)

generate, bench and serve take --parallel tp under torchrun (`torchrun --nproc_per_node N -m llada_engine generate
--parallel tp ...`): the model tensor- and expert-parallel over the N processes, rank 0 printing (and, for serve,
alone listening).

A bad invocation (an argument out of range, a missing or unreadable file, a checkpoint that does not load)
ends with one line on stderr naming the argument or file, and exit status 1 (2 for what argparse refuses).
"""
import argparse
import sys
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """argparse, but a refused argument is one line: what is wrong and where --help is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _device(text: str):
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch {torch.__version__} sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: llada_engine runs on cpu or cuda")
    return device


def _dtype(name: str):
    import torch

    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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
        file = Path(args.prompts_file)
        try:
            data = file.read_bytes()
        except OSError as error:
            raise ValueError(f"--prompts-file {file}: {error.strerror or error}") from None
        if b"\0" in data:
            raise ValueError(f"--prompts-file {file}: contains NUL bytes, not a text file (one prompt per line, UTF-8)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"--prompts-file {file}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                             f"{error.start}); give one prompt per line in UTF-8") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give a prompt, or --prompts-file with one prompt per line")
    return prompts


def _checkpoint(args: argparse.Namespace):
    """The checkpoint folder --model names, and its config (read before any weights)."""
    from llada_engine.model.config import LLaDA2Config
    from llada_engine.model.hub import resolve_checkpoint

    folder = resolve_checkpoint(args.model, revision=args.revision)
    if not folder.is_dir():
        raise NotADirectoryError(f"--model {folder}: not a checkpoint folder (config.json, safetensors, "
                                 f"tokenizer.json)")
    return folder, LLaDA2Config.from_file(folder / "config.json")


def _generate(args: argparse.Namespace) -> int:
    import llada_engine
    from llada_engine.decoding.chat import chat_prompt
    from llada_engine.decoding.validation import decode_params

    folder, config = _checkpoint(args)
    settings = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                    threshold=args.threshold, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    eos_early_stop=args.eos_early_stop, seed=args.seed, mask_id=args.mask_id, eos_id=args.eos_id)
    decode_params(config, **settings)                 # bad settings fail before the weights are read
    texts = _read_prompts(args)
    tokenizer = llada_engine.load_tokenizer(folder)
    model, main = _load(args, folder)
    if args.chat:
        texts = [chat_prompt(t, folder) for t in texts]
    prompts = [tokenizer.encode(t).ids for t in texts]

    single = len(prompts) == 1
    produced = [[] for _ in prompts]
    shown = [""]

    def stream(index: int, tokens: list) -> None:
        produced[index] += tokens
        if single and main:
            text = tokenizer.decode(produced[index], skip_special_tokens=True)
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text

    out = llada_engine.generate(model, prompts, use_cache=not args.no_cache, stream=stream, **settings)
    _stop(args)
    if not main:
        return 0
    if single:
        print()
    else:
        for i, tokens in enumerate(out.sequences):
            print(f"=== {i}: {texts[i]}")
            print(tokenizer.decode(tokens, skip_special_tokens=True))
    print(f"[{out.stats}]", file=sys.stderr if args.quiet_stats else sys.stdout)
    return 0


def _load(args: argparse.Namespace, folder: Path):
    """The model in `folder` (this rank's part under --parallel tp, in the process group set up here) and
    whether this process prints."""
    import llada_engine

    dtype = _dtype(args.dtype)
    if args.parallel is None:
        return llada_engine.load_model(folder, dtype=dtype, device=args.device, backend=args.backend), True
    from llada_engine import parallel

    device = parallel.start(args.device)
    model = llada_engine.load_model(folder, dtype=dtype, device=device, backend=args.backend,
                                    parallel=args.parallel)
    return model, parallel.is_main()


def _stop(args: argparse.Namespace) -> None:
    if args.parallel is not None:
        from llada_engine import parallel

        parallel.stop()


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
        raise ValueError("give --run RUN_DIR, or checkpoint folders")
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
    from llada_engine.decoding.validation import check_positions, decode_params

    folder, config = _checkpoint(args)
    if args.mask_id is not None:
        config.mask_token_id = args.mask_id       # so that the random prompts avoid it too
    settings = dict(block_length=args.block_length, steps=args.steps, threshold=args.threshold)
    params = decode_params(config, gen_length=args.gen_length, **settings)
    check_positions(args.prompt_length, params, config.max_position_embeddings, "--prompt-length")
    model, main = _load(args, folder)
    model.config.mask_token_id = config.mask_token_id
    rows = []
    for batch in args.batch:
        prompts = random_prompts(model.config, batch, args.prompt_length, seed=args.seed)
        rows.append(speed_row(model, prompts, gen_length=args.gen_length, uncached=not args.cached_only, **settings))
        if main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    world = model.parallel.world if args.parallel else 1
    _stop(args)
    if not main:
        return 0
    on_gpu = model.device.type == "cuda"
    device = torch.cuda.get_device_name(model.device) if on_gpu else f"cpu x{torch.get_num_threads()}"
    print(json.dumps({"benchmark": "generate", "model": str(args.model), "device": device, "ranks": world,
                      "dtype": str(model.dtype).replace("torch.", ""), "rows": rows}, sort_keys=True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from llada_engine.serving.server import serve

    return serve(args)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _parallel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parallel", choices=["tp"], default=None,
                        help="tp: tensor- and expert-parallel over the processes of torchrun (rank 0 prints; serve: "
                             "rank 0 listens)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="checkpoint folder (config.json, safetensors, tokenizer.json) or Hugging Face Hub id "
                             "(e.g. inclusionAI/LLaDA2.0-mini); default: the embedded model")
    parser.add_argument("--revision", help="the Hub revision (branch, tag or commit) of a --model Hub id")
    parser.add_argument("--mask-id", type=int, help="the MASK token id, for checkpoints whose config.json has no "
                                                     "mask_token_id (LLaDA2.0 releases: 156895)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--device", type=_device, default=None, help="e.g. cpu, cuda (default: cpu)")
    parser.add_argument("--backend", choices=["kernels", "reference"], default="kernels")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llada-engine", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print build and runtime information")
    info.set_defaults(run=_info, parser=info)

    gen = commands.add_parser("generate", help="generate text from a LLaDA2.0 checkpoint")
    gen.add_argument("prompt", nargs="*", help="prompt text (several prompts are decoded as one batch)")
    _model_arguments(gen)
    gen.add_argument("--eos-id", type=int, help="the EOS token id (default: config.json's eos_token_id)")
    gen.add_argument("--prompts-file", help="a UTF-8 text file with one prompt per line")
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
    gen.add_argument("--quiet-stats", action="store_true", help="print the stats line to stderr")
    _parallel_argument(gen)
    gen.set_defaults(run=_generate, parser=gen)

    from llada_engine.train import add_arguments

    train = commands.add_parser("train", help="train or convert a model with a run configuration (YAML or JSON)")
    add_arguments(train)
    train.set_defaults(run=_train, parser=train)

    prep = commands.add_parser("prepare-data", help="tokenize documents once into memory-mapped token shards")
    prep.add_argument("source", metavar="IN", help="a .txt / .jsonl file, a folder of them, or a Hugging Face "
                                                   "dataset (a save_to_disk folder or a Hub name; needs `datasets`)")
    prep.add_argument("out", metavar="OUT", help="the new folder of token shards (data.train / data.valid)")
    prep.add_argument("--tokenizer", required=True, help="a tokenizer.json, or a checkpoint folder with one")
    prep.add_argument("--shard-tokens", type=_positive_int, default=2**28, help="tokens per shard at most")
    prep.add_argument("--split", help="the split of a Hugging Face dataset (default: train)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=_prepare_data, parser=prep)

    merge = commands.add_parser("merge", help="average checkpoints (a run's top-k by validation loss)")
    merge.add_argument("checkpoints", nargs="*", help="checkpoint folders to average (instead of --run)")
    merge.add_argument("--run", dest="run_dir",
                       help="a run folder: merge its --top-k checkpoints with the lowest validation loss")
    merge.add_argument("--top-k", type=_positive_int, default=3)
    merge.add_argument("--phase", help="choose among the checkpoints of this phase (default: the phase of the "
                                       "run's latest checkpoint)")
    merge.add_argument("--out", required=True, help="output folder")
    merge.set_defaults(run=_merge, parser=merge)

    bench = commands.add_parser("bench", help="decoding speed of a checkpoint on this machine (random prompts)")
    _model_arguments(bench)
    bench.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 8], help="batch sizes to time")
    bench.add_argument("--prompt-length", type=_positive_int, default=64)
    bench.add_argument("--gen-length", type=_positive_int, default=128)
    bench.add_argument("--block-length", type=_positive_int, default=32)
    bench.add_argument("--steps", type=_positive_int, default=32)
    bench.add_argument("--threshold", type=float, default=0.95)
    bench.add_argument("--cached-only", action="store_true", help="skip the uncached path (slow on long prompts)")
    bench.add_argument("--seed", type=int, default=0)
    _parallel_argument(bench)
    bench.set_defaults(run=_bench, parser=bench)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    _model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one, printed)")
    serve.add_argument("--served-model-name", help="the name clients pass as `model` (default: --model as given)")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (default: $LLADA_API_KEY)")
    serve.add_argument("--max-running", type=_positive_int, default=16, help="requests decoded together at most")
    serve.add_argument("--cache-tokens", type=_positive_int, default=None,
                       help="KV cache size in tokens (default: the Engine's: a fixed size on the CPU, a share "
                            "of the free memory on a GPU)")
    serve.add_argument("--block-length", type=_positive_int, default=32, help="the engine's block length")
    serve.add_argument("--compile", action="store_true", help="torch.compile the engine's step")
    serve.add_argument("--shutdown-timeout", type=_non_negative_float, default=10.0,
                       help="on SIGINT/SIGTERM, seconds running requests get to finish before they are cancelled")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    _parallel_argument(serve)
    serve.set_defaults(run=_serve, parser=serve)
    return parser


def _one_line(error: BaseException, command: argparse.ArgumentParser) -> str:
    """The error as one line, a decoding argument named by its option (--gen-length, not gen_length)."""
    from llada_engine.decoding.validation import ArgumentError

    message = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if isinstance(error, ArgumentError):
        flag = "--" + error.argument.replace("_", "-")
        if any(flag in action.option_strings for action in command._actions):
            message = message.replace(f"{error.argument}=...", f"{flag} ...")
            if message.startswith(error.argument):
                message = flag + message[len(error.argument):]
    if not isinstance(error, (ValueError, OSError)):
        message = f"{type(error).__name__}: {message}"
    return message


def run_reporting(prog: str, command, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """command(args), a failure reported as one line on stderr (see the module doc) and exit status 1."""
    try:
        return command(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (a user's mistake or a failed run: one line, no traceback)
        print(f"{prog}: {_one_line(error, parser)}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting(f"llada-engine {args.command}", args.run, args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
