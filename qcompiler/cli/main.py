"""``qcompile`` entry point: argparse subcommands, logging, and the error contract.

Exit codes: 0 success; 2 bad input (one line naming the file, node or tensor: the user can fix
it); 1 an internal error (one line naming the pass and node, the traceback with ``--debug``);
130 interrupted. ``qcompile MODEL ...`` is short for ``qcompile compile MODEL ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from qcompiler.memory import serve_large_blocks_by_mmap
from qcompiler.errors import InternalError, QCompileError

#: Subcommand name -> module under qcompiler.cli with ``add_arguments(parser)`` and ``run(args)``.
SUBCOMMANDS = {"compile": "compile_command", "eval": "eval_command", "inspect": "inspect_command",
               "recipes": "recipes_command", "collect": "collect_command",
               "eval-diffusion": "eval_diffusion_command", "deploy": "deploy_command", "view": "view_command"}


def _module(name: str):
    import importlib

    return importlib.import_module(f"qcompiler.cli.{name}")


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress display; errors only on stderr")
    common.add_argument("-v", "--verbose", action="store_true", help="diagnostic log messages on stderr")
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcompile", description="ONNX quantization compiler. `qcompile MODEL ...` runs `qcompile compile`.",
        epilog="qcompile COMMAND --help documents each command.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_flags()
    for name, module_name in SUBCOMMANDS.items():
        module = _module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = commands.add_parser(name, parents=[common], help=summary, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """``qcompile model.onnx ...`` → ``qcompile compile model.onnx ...`` (the first word is not a command)."""
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        return ["compile", *argv]
    return argv


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="qcompile: %(levelname)s: %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process is ours (console script / python -m), not a caller's
        serve_large_blocks_by_mmap()
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _configure_logging(args)
    try:
        return int(args.run(args) or 0)
    except QCompileError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qcompile: interrupted; no output written", file=sys.stderr)
        return 130
    except InternalError as exc:
        return _internal(exc, str(exc), args.debug)
    except Exception as exc:  # a bug outside the passes
        return _internal(exc, f"internal error in 'qcompile {args.command}': {type(exc).__name__}: {exc}", args.debug)


def _internal(exc: BaseException, message: str, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    first = message.splitlines()[0] if message else type(exc).__name__
    print(f"qcompile: {first}" + ("" if debug else "; this is a bug in qcompile: rerun with --debug for the "
                                  "traceback and report it"), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
