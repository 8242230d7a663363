"""Resume is exact: a run SIGKILLed mid-epoch and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dilateformer.train.checkpoint import read_metadata

pytestmark = pytest.mark.slow

# Mixup/cutmix, RandAugment, random erasing, drop path and EMA all draw random numbers: the test covers them all.
RECIPE = [
    "--model", "dilateformer_nano", "--model-kwargs", "embed_dim=12", "--img-size", "32",
    "-b", "4", "--epochs", "3", "--warmup-epochs", "1", "--lr", "1e-3", "--workers", "1",
    "--mixup", "0.8", "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
    "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--seed", "7", "--log-interval", "1",
]  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(
    image_folder: Path, tmp_path: Path, run_cli, cli_env
) -> None:
    reference = tmp_path / "reference"
    done = run_cli("train", "--data-dir", str(image_folder), *RECIPE, "--output", str(reference))
    assert done.returncode == 0, done.stderr

    interrupted = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "dilateformer", "train", "--data-dir", str(image_folder), *RECIPE]
    proc = subprocess.Popen(
        [*cmd, "--output", str(interrupted)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env,
    )
    killed_at = None
    for line in proc.stdout:  # 9 steps per epoch: kill as the 3rd step of epoch 2 is reported
        if line.startswith("epoch 2/3 step 3/"):
            proc.send_signal(signal.SIGKILL)
            killed_at = line
            break
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    # The kill landed inside epoch 2: the last checkpoint is still the one from the end of epoch 1.
    assert read_metadata(interrupted / "last.safetensors")["epoch"] == 1

    resumed = run_cli("train", "--resume", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "epoch 2/3" in resumed.stdout

    expected, actual = _weights(reference), _weights(interrupted)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # The metrics history, rebuilt from the checkpoint, matches too (loss/accuracy of every epoch).
    ref_rows = (reference / "metrics.csv").read_text().splitlines()
    new_rows = (interrupted / "metrics.csv").read_text().splitlines()
    assert len(new_rows) == len(ref_rows) == 4
    strip = [",".join(r.split(",")[:7]) for r in ref_rows], [",".join(r.split(",")[:7]) for r in new_rows]
    assert strip[0] == strip[1]


def test_resume_auto_without_a_run_starts_fresh_and_resume_to_nothing_fails(
    image_folder: Path, tmp_path: Path, run_cli, tiny_model
):
    missing = run_cli("train", "--data-dir", str(image_folder), *tiny_model, "--resume", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "--resume: no checkpoint at" in missing.stderr and "Traceback" not in missing.stderr
