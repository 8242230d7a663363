"""``eval`` and ``predict`` from our checkpoints (self-describing) and from official-style ``.pth`` files."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import timm
import torch

from dilateformer.cli import main


def _train(data: Path, out: Path) -> None:
    code = main(["train", "--data-dir", str(data), "--model", "dilateformer_nano", "--model-kwargs", "embed_dim=12",
                 "--img-size", "32", "-b", "4", "--epochs", "2", "--warmup-epochs", "0", "--lr", "2e-3",
                 "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--workers", "0",
                 "--output", str(out)])  # fmt: skip
    assert code == 0


def test_train_then_eval_and_predict(image_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    _train(image_folder, out)
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    best = max(rows, key=lambda r: float(r["val_top1"]))
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(out), "--data-dir", str(image_folder), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    # The run dir resolves to best.safetensors: eval reproduces the best epoch's validation accuracy.
    assert f"top-1 {float(best['val_top1']):.2f}%" in text and "(12 images at 32px" in text

    image = image_folder / "val" / "red" / "0.png"
    assert main(["predict", str(image), str(image), "--checkpoint", str(out), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 6
    probs = [float(line.split("%")[0]) for line in lines[1:3]]
    names = [line.split("%")[1].strip() for line in lines[1:3]]
    assert set(names) <= {"blue", "green", "red"} and probs[0] >= probs[1] and sum(probs) <= 100.01


def test_eval_official_style_checkpoint_needs_model_and_loads_safely(
    image_folder: Path, tmp_path: Path, capsys
) -> None:
    model = timm.create_model("dilateformer_nano", num_classes=3)
    path = tmp_path / "checkpoint.pth"
    # The official training checkpoints are pickles with an argparse.Namespace inside.
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="x"), "epoch": 3}, path)
    assert main(["eval", "--checkpoint", str(path), "--data-dir", str(image_folder), "--workers", "0"]) == 2
    assert "pass --model NAME" in capsys.readouterr().err
    argv = ["eval", "--checkpoint", str(path), "--model", "dilateformer_nano", "--data-dir", str(image_folder),
            "--workers", "0", "--img-size", "32"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5 100.00%" in out  # 3 classes: top-5 is always right
    # predict on a 3-class model without stored names falls back to "class N"
    image = image_folder / "val" / "red" / "0.png"
    argv = ["predict", str(image), "--checkpoint", str(path), "--model", "dilateformer_nano", "--img-size", "32"]
    assert main(argv) == 0
    assert "class " in capsys.readouterr().out
