"""The ``dilateformer`` command line. Argument parsing only: each command's work lives in the package."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that each define ``register(subparsers)``; a command sets ``func(args) -> int`` on its parser.
COMMAND_MODULES = (
    "dilateformer.train.commands",
    "dilateformer.demo",  # after train/eval/predict in --help, where it was before it got its own module
    "dilateformer.analysis.commands",
    "dilateformer.integrations.commands",
    "dilateformer.retrofit.commands",
)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a bad flag value reported as one line (no usage block) that says where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="dilateformer",
        description="Multi-Scale Dilated Attention and DilateFormer models: train, evaluate, explain and measure.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
