"""``train --amp`` through the CLI: bf16 autocast on CPU, a finite loss, and the same checkpoint format."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def test_train_amp_one_epoch(image_folder: Path, tmp_path: Path, run_cli, tiny_model) -> None:
    out = tmp_path / "amp"
    result = run_cli(
        "train", "--data-dir", str(image_folder), *tiny_model, "-b", "4", "--epochs", "1", "--warmup-epochs", "0",
        "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--workers", "0", "--amp",
        "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"])) and math.isfinite(float(rows[0]["val_loss"]))
    assert (out / "best.safetensors").is_file()
    assert "bfloat16 autocast" in result.stdout + result.stderr
