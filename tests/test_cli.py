"""Every ``dilateformer`` command answers ``--help`` (console and ``python -m``); one guard reports user errors."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dilateformer.cli import build_parser, main, run_command
from dilateformer.errors import CommandError

TRAIN_COMMANDS = ("train", "eval", "predict", "demo")
# The timm train.py flag names the issue promises.
TRAIN_FLAGS = (
    "--model", "--data-dir", "--dataset", "--epochs", "--batch-size", "-b", "--lr", "--weight-decay", "--opt",
    "--sched", "--warmup-epochs", "--mixup", "--cutmix", "--smoothing", "--aa", "--reprob", "--drop-path",
    "--model-ema", "--amp", "--grad-checkpointing", "--compile", "--img-size", "--workers", "--seed", "--output",
    "--resume", "--pretrained", "--initial-checkpoint",
)  # fmt: skip


def _commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_train_commands_are_registered() -> None:
    assert set(TRAIN_COMMANDS) <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and command in out.splitlines()[0]


def test_train_help_lists_the_timm_flags(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    missing = [flag for flag in TRAIN_FLAGS if f" {flag}" not in out]
    assert not missing


def test_python_dash_m_and_top_level_help() -> None:
    done = subprocess.run([sys.executable, "-m", "dilateformer", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in TRAIN_COMMANDS:
        assert command in done.stdout


def _namespace(command: str, raised: BaseException) -> argparse.Namespace:
    def func(_: argparse.Namespace) -> int:
        raise raised

    return argparse.Namespace(command=command, func=func)


@pytest.mark.parametrize(
    "raised, expected",
    [
        (CommandError("--checkpoint x does not exist"), "--checkpoint x does not exist"),
        (ValueError("kernel_size must be odd, got 4"), "kernel_size must be odd, got 4"),
        (TypeError("q must be a tensor"), "q must be a tensor"),
        (FileNotFoundError(2, "No such file or directory", "/no/such"), "/no/such"),
        (ValueError("keys that do not fit:\n  a.weight\n  b.bias"), "keys that do not fit: a.weight; b.bias"),
    ],
)
def test_one_guard_turns_user_errors_into_one_line(capsys, monkeypatch, raised, expected) -> None:
    monkeypatch.delenv("DILATEFORMER_TRACEBACK", raising=False)
    assert run_command(_namespace("eval", raised)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dilateformer eval: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_guard_shows_the_traceback_on_request_and_lets_bugs_through(monkeypatch) -> None:
    monkeypatch.setenv("DILATEFORMER_TRACEBACK", "1")
    with pytest.raises(ValueError, match="odd"):
        run_command(_namespace("train", ValueError("kernel_size must be odd")))
    monkeypatch.delenv("DILATEFORMER_TRACEBACK")
    with pytest.raises(ZeroDivisionError):  # not a user error: keeps its traceback
        run_command(_namespace("train", ZeroDivisionError("bug")))


def test_interrupt_exits_130(capsys) -> None:
    assert run_command(_namespace("train", KeyboardInterrupt())) == 130
    assert "interrupted" in capsys.readouterr().err


def test_no_command_module_defines_its_own_guard_or_error_type() -> None:
    package = Path(__file__).resolve().parents[1] / "dilateformer"
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "errors.py"
        and re.search(r"^\s*(def _guarded|class \w+Error\(Exception\))", path.read_text(), re.M)
    ]
    assert not offenders


@pytest.mark.parametrize(("env", "kept"), [(None, True), ("1", True), ("0", False)])
def test_a_command_keeps_large_buffers_mapped_unless_told_not_to(monkeypatch, env, kept) -> None:
    from dilateformer.ops import native

    calls = []
    monkeypatch.setattr(native, "keep_large_buffers_mapped", lambda: calls.append("kept") or True)
    if env is None:
        monkeypatch.delenv("DILATEFORMER_KEEP_BUFFERS", raising=False)
    else:
        monkeypatch.setenv("DILATEFORMER_KEEP_BUFFERS", env)
    parser = argparse.ArgumentParser(prog="dilateformer")
    parser.add_subparsers(dest="command").add_parser("probe").set_defaults(func=lambda args: calls.append("ran"))
    monkeypatch.setattr("dilateformer.cli.build_parser", lambda: parser)
    assert main(["probe"]) == 0
    assert calls == (["kept", "ran"] if kept else ["ran"])
