"""Every ``dilateformer`` command answers ``--help``, through the console front and ``python -m``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dilateformer.cli import build_parser, main

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
