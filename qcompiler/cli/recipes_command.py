"""List the built-in recipes and the passes each runs: qcompile recipes."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show each pass's docstring summary too")


def run(args: argparse.Namespace) -> int:
    from qcompiler.passes import PASSES
    from qcompiler.recipes import available_recipes

    for recipe in available_recipes().values():
        print(f"{recipe.name}  (default W{recipe.wbits}A{recipe.abits}): {recipe.description}")
        for step in recipe.steps:
            line = f"    - {step.pass_name}"
            if args.verbose:
                line += f": {(PASSES[step.pass_name].__doc__ or '').strip().splitlines()[0]}"
            print(line)
    return 0
