"""Training entry point: `python -m llada_engine.train CONFIG [--resume] [--set section.key=value ...]`, also
under torchrun (`torchrun --nproc_per_node N -m llada_engine.train CONFIG`) and as `llada-engine train`."""
import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the run configuration (YAML or JSON), e.g. configs/wsd_conversion.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (read as YAML), e.g. --set run.out_dir=runs/x")


def run(args: argparse.Namespace) -> int:
    from llada_engine.training import load_config, train
    from llada_engine.training.config import parse_overrides

    config = load_config(args.config, parse_overrides(args.set))
    final = train(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"last checkpoint: {final}")
    return 0


def main(argv=None) -> int:
    from llada_engine.cli import Parser, run_reporting

    parser = Parser(prog="python -m llada_engine.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_reporting(parser.prog, run, parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
