"""The ``dilateformer`` command line: builds the parser from each command module and runs the chosen command.

This is the one place that turns a user's mistake into one line on stderr and exit status 2: a
:class:`~dilateformer.errors.CommandError` from command code, a ``ValueError``/``TypeError`` from a library
function's argument check, or an ``OSError`` (a missing file, a full disk). Set ``DILATEFORMER_TRACEBACK=1`` to
see the traceback instead.

The command line owns its process, so before a command runs it keeps freed large buffers mapped
(:func:`dilateformer.ops.native.keep_large_buffers_mapped`): each step of a model then reuses pages instead of
faulting fresh ones. ``DILATEFORMER_KEEP_BUFFERS=0`` leaves glibc's defaults alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dilateformer.errors import CommandError, user_message

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
    if os.environ.get("DILATEFORMER_KEEP_BUFFERS", "") != "0":
        from dilateformer.ops import native  # torch is loaded by then: every command runs it

        native.keep_large_buffers_mapped()
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """``args.func(args)``, with the errors a user can fix reported as one line (exit 2) instead of a traceback."""
    show_traceback = os.environ.get("DILATEFORMER_TRACEBACK", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError, TypeError, OSError) as error:
        if show_traceback:
            raise
        print(f"dilateformer {args.command}: error: {user_message(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"dilateformer {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except RuntimeError as error:
        rank = _failed_peer(error)
        if rank is None or show_traceback:
            raise
        # Another rank stopped (its one-line error is above); gloo's traceback here would only bury it.
        print(
            f"dilateformer {args.command}: error: rank {rank} stopped because another process failed "
            "(the connection to it closed); see that process's error above",
            file=sys.stderr,
            flush=True,
        )
        return 2
    finally:
        distributed = sys.modules.get("dilateformer.train.distributed")
        if distributed is not None:  # only a command that started a process group can have one to close
            distributed.cleanup()


def _failed_peer(error: RuntimeError) -> int | None:
    distributed = sys.modules.get("dilateformer.train.distributed")
    return None if distributed is None else distributed.peer_failed(error)


if __name__ == "__main__":
    sys.exit(main())
