"""`raydist ...` sub-commands: parse, build a spec, hand over. No logic of their own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any, NoReturn

from raydist.config import ConfigError, RunSpec, load_yaml, parse_sets


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """--config FILE, --set key=value, and one flag per RunSpec field (--batch-size ...)."""
    p.add_argument("--config", help="YAML file whose keys are RunSpec fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field; repeatable")
    for f in fields(RunSpec):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                       metavar=f.name.upper(), help=f.metadata["help"])


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """Defaults < --config file < flags < --set."""
    raw: dict[str, Any] = {}
    if args.config:
        raw = load_yaml(args.config)
        RunSpec.from_dict(raw, source=args.config)
    raw.update({f.name: getattr(args, f.name) for f in fields(RunSpec) if hasattr(args, f.name)})
    raw.update(parse_sets(args.set))
    return RunSpec.from_dict(raw)


def cmd_train(args: argparse.Namespace) -> None:
    from raydist.strategies import train

    spec = spec_from_args(args)
    train(spec)
    print(f"wrote {spec.out}/spec.yaml, metrics.csv, model.pt")


Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None],
                str]
COMMANDS: dict[str, Command] = {
    "train": (add_spec_flags, cmd_train, "train one run with one strategy"),
}


def build_parser() -> Parser:
    parser = Parser(prog="raydist", allow_abbrev=False,
                    description="Parallel and distributed PyTorch training on Ray, measured.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (add_args, handler, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, allow_abbrev=False)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
