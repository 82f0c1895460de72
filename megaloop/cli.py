"""The `megaloop` command: parse, call one function per subcommand, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from megaloop.errors import MegaloopError


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")


def cmd_params(args: argparse.Namespace) -> int:
    from megaloop import config
    from megaloop.model.accounting import account, format_table

    run = config.load(args.config, args.overrides)
    result = account(run.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(run.model, result, title=args.config or "defaults"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaloop", description="Train looped language models and fit how much a recurrence "
                                     "is worth.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")

    params = sub.add_parser("params", parents=[common],
                            help="parameter groups and training FLOPs per token")
    _add_config_arguments(params)
    params.add_argument("--json", action="store_true", help="print JSON instead of a table")
    params.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MegaloopError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"megaloop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megaloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
