"""Checkpoints are atomic: a kill at any point of a save leaves a loadable, consistent ``last`` pair."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dilateformer.errors import CommandError
from dilateformer.train import checkpoint as ckpt


def _save(out: Path, value: float) -> None:
    ckpt.save_last(
        out, {"w": torch.full((4,), value)}, {"epoch": int(value)}, {"value": value, "rng": ckpt.rng_state()}
    )


def test_roundtrip_weights_metadata_state_and_rng(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    _save(tmp_path, 1.0)
    expected = (torch.rand(3), np.random.rand(), random.random())
    weights, meta, state = ckpt.load_last(tmp_path / "last.safetensors")
    assert torch.equal(weights["w"], torch.ones(4)) and meta["epoch"] == 1 and state["value"] == 1.0
    ckpt.set_rng_state(state["rng"])
    assert (
        torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1] and random.random() == expected[2]
    )


def test_kill_between_the_two_renames_rolls_forward(tmp_path: Path, monkeypatch) -> None:
    _save(tmp_path, 1.0)
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the weights are renamed, the state is not: as if SIGKILL hit here
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2.0)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    weights, _, state = ckpt.load_last(tmp_path / "last.safetensors")
    assert float(weights["w"][0]) == 2.0 and state["value"] == 2.0
    assert not list(tmp_path.glob("*.tmp"))


def test_kill_while_writing_temps_keeps_the_old_pair(tmp_path: Path) -> None:
    _save(tmp_path, 1.0)
    (tmp_path / "last.state.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
    weights, _, state = ckpt.load_last(tmp_path / "last.safetensors")
    assert float(weights["w"][0]) == 1.0 and state["value"] == 1.0
    assert not (tmp_path / "last.state.pt.tmp").exists()


def test_mismatched_pair_is_refused(tmp_path: Path) -> None:
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        _save(tmp_path / name, value)
    os.replace(tmp_path / "b" / "last.state.pt", tmp_path / "a" / "last.state.pt")
    with pytest.raises(CommandError, match="different saves"):
        ckpt.load_last(tmp_path / "a" / "last.safetensors")


SAVER = textwrap.dedent(
    """
    import sys, torch
    from dilateformer.train import checkpoint as ckpt
    out, value = sys.argv[1], 0
    big = torch.randn(1_000_000)  # 4 MB per save: the kill often lands mid-write
    while True:
        value += 1
        ckpt.save_last(out, {"w": big + value, "v": torch.tensor(float(value))}, {"v": value}, {"v": value})
        print(value, flush=True)
    """
)


@pytest.mark.slow
def test_real_sigkill_during_saves_never_corrupts_last(tmp_path: Path) -> None:
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(rng.randint(1, 4)):  # a few saves complete, then the kill hits at a random moment
            proc.stdout.readline()
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        weights, meta, state = ckpt.load_last(tmp_path / "last.safetensors")
        assert meta["v"] == state["v"] == int(weights["v"]), "weights and state from different saves"
