"""List the built-in recipes and the passes each runs: qcompile recipes."""

from __future__ import annotations

import argparse
from dataclasses import fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose (common to every command) also shows each pass's summary and its settings."""


def run(args: argparse.Namespace) -> int:
    from qcompiler.passes import PASSES
    from qcompiler.recipes import available_recipes

    for recipe in available_recipes().values():
        print(f"{recipe.name}  (default W{recipe.wbits}A{recipe.abits}): {recipe.description}")
        for step in recipe.steps:
            line = f"    - {step.pass_name}"
            if args.verbose:
                line += f": {(PASSES[step.pass_name].__doc__ or '').strip().splitlines()[0]}"
                config = step.config if step.config is not None else PASSES[step.pass_name].Config()
                settings = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in fields(config))
                line += f"\n        settings: {settings or '(none)'}"
            print(line)
        print("    - lower: the target's lowering stage (--target ort|tensorrt; ORT's DGQ form: --channel-groups)")
    return 0
