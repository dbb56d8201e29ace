"""The `llada-engine` command line.

    llada-engine info      what the native extension was built with and what this machine offers
"""
import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import llada_engine

    info = llada_engine.build_info()
    width = max(len(k) for k in info)
    print(f"llada_engine {llada_engine.__version__}")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llada-engine", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print build and runtime information")
    info.set_defaults(run=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
