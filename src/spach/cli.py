"""The `spach` command line: argument parsing only; every subcommand calls into the modules.

Each subcommand has one `_add_<name>(sub)` function that declares its arguments and sets `func`
to the function that runs it.
"""
from __future__ import annotations

import argparse
import sys

from spach.errors import SpachError


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo: params, MACs, official ImageNet top-1")
    p.add_argument("pattern", nargs="?", default="*", help="glob over model names (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def run(args: argparse.Namespace) -> None:
        from spach.zoo_table import print_models

        print_models(args.pattern, as_json=args.json)

    p.set_defaults(func=run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    pass  # issue 3


def _add_train(sub: argparse._SubParsersAction) -> None:
    pass  # issue 4


def _add_eval(sub: argparse._SubParsersAction) -> None:
    pass  # issue 4


def _add_battle(sub: argparse._SubParsersAction) -> None:
    pass  # issue 5


def _add_report(sub: argparse._SubParsersAction) -> None:
    pass  # issue 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spach", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models, _add_bench, _add_train, _add_eval, _add_battle, _add_report):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SpachError as e:
        print(f"spach {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"spach {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
