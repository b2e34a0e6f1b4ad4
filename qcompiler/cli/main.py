"""``qcompile`` entry point: dispatch to a subcommand; turn user errors into one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from qcompiler.errors import QCompileError

#: Subcommand name -> module under qcompiler.cli with ``add_arguments(parser)`` and ``run(args)``.
SUBCOMMANDS = {"eval": "eval_command", "recipes": "recipes_command", "collect": "collect_command",
               "eval-diffusion": "eval_diffusion_command", "inspect": "inspect_command"}


def _module(name: str):
    import importlib

    return importlib.import_module(f"qcompiler.cli.{name}")


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object]:
    if argv and argv[0] in SUBCOMMANDS:
        module = _module(SUBCOMMANDS[argv[0]])
        parser = argparse.ArgumentParser(prog=f"qcompile {argv[0]}", description=module.__doc__)
        module.add_arguments(parser)
        return parser, module
    module = _module("compile_command")
    parser = argparse.ArgumentParser(
        prog="qcompile", description=module.__doc__,
        epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (qcompile SUBCOMMAND --help)")
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv[1:] if argv and argv[0] in SUBCOMMANDS else argv)
    try:
        return int(module.run(args) or 0)
    except QCompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qcompile: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
