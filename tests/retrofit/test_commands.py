"""``dilateformer retrofit`` and ``train --retrofit``: files written, checkpoints reloadable, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from dilateformer.cli import main
from dilateformer.models import load_weights
from dilateformer.retrofit import RetrofitAttention
from tests.train.conftest import make_image_folder

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "patch_size=8", "depth=2",
            "embed_dim=48", "num_heads=6"]  # fmt: skip


def test_retrofit_writes_weights_report_and_figure(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=6,
                              num_classes=3)  # fmt: skip
    checkpoint = tmp_path / "plain.pth"
    torch.save(plain.state_dict(), checkpoint)
    images = make_image_folder(tmp_path / "data", per_class=(2, 0)) / "train"
    out = tmp_path / "out"
    # A random model attends at chance level: auto measures every block and swaps none.
    code = main(["retrofit", *TINY_VIT, "--checkpoint", str(checkpoint), "--blocks", "auto", "--images",
                 str(images), "--output", str(out)])  # fmt: skip
    assert code == 0
    assert "in-window mass" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert len(report["locality"]) == 2 and report["blocks"] == [] and "unchanged" in report["notes"][0]
    assert load_weights(out / "retrofit.safetensors")[1]["retrofit"] is None
    code = main(["retrofit", *TINY_VIT, "--checkpoint", str(checkpoint), "--blocks", "1", "--prefix", "keys",
                 "--output", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_before"] == report["params_after"] == sum(p.numel() for p in plain.parameters())
    assert report["blocks"] == [1] and report["gmacs_after"] < report["gmacs_before"]
    assert (out / "report.png").stat().st_size > 0
    state, meta = load_weights(out / "retrofit.safetensors")
    assert meta["retrofit"]["blocks"] == [1] and meta["retrofit"]["prefix"] == "keys" and meta["num_classes"] == 3
    for key, value in plain.state_dict().items():  # the weights are untouched
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_train_retrofit_fine_tunes_and_eval_rebuilds_the_retrofit(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(data), *TINY_VIT, "--img-size", "32", "--retrofit", "0", "-b", "4",
                 "--epochs", "1", "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--aa", "none",
                 "--reprob", "0", "--workers", "0", "--output", str(out)])  # fmt: skip
    assert code == 0
    _, meta = load_weights(out / "best.safetensors")
    assert meta["retrofit"]["blocks"] == [0]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--data-dir", str(data), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out
    from argparse import Namespace

    from dilateformer.train.inference import load_for_inference

    model, _ = load_for_inference(Namespace(checkpoint=str(out), model=None), torch.device("cpu"))
    assert isinstance(model.blocks[0].attn, RetrofitAttention) and not isinstance(
        model.blocks[1].attn, RetrofitAttention
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--blocks", "0-7"], "out of range"),
        (["--blocks", "auto"], "--images"),
        (["--blocks", "0", "--dilations", "1,2,4,5"], "divisible"),
        (["--checkpoint", "missing.pth"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, capsys, flags, message) -> None:
    assert main(["retrofit", *TINY_VIT, *flags, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dilateformer retrofit: error:") and message in err and "\n" not in err
