"""Bad input gets one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from dilateformer.cli import main
from dilateformer.errors import user_message
from dilateformer.models import save_weights
from dilateformer.train.data import CorruptImageError


def _fails(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def _train(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(data), "--model", "dilateformer_nano", "--model-kwargs", "embed_dim=12",
            "--img-size", "32", "-b", "4", "--epochs", "1", "--workers", "0", "--output", str(tmp_path / "run"),
            *extra]  # fmt: skip


def test_missing_dataset_dir(capsys, tmp_path: Path) -> None:
    err = _fails(capsys, *_train(tmp_path / "nowhere", tmp_path))
    assert "does not exist" in err and "nowhere" in err


def test_empty_dataset_dir(capsys, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    err = _fails(capsys, *_train(tmp_path / "empty", tmp_path))
    assert "is empty" in err


def test_class_folder_without_images(capsys, image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "train" / "zebra").mkdir()
    (image_folder / "train" / "zebra" / "notes.txt").write_text("no images here")
    err = _fails(capsys, *_train(image_folder, tmp_path))
    assert "zebra has no images" in err


def test_corrupt_image_named_in_one_line(capsys, image_folder: Path, tmp_path: Path) -> None:
    bad = image_folder / "train" / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    err = _fails(capsys, *_train(image_folder, tmp_path, "--workers", "1"))  # raised inside a worker process
    assert str(bad) in err and "remove or replace" in err


def test_worker_error_message_recovers_the_original_line() -> None:
    wrapped = CorruptImageError(
        "Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1\ndilateformer.train.data.CorruptImageError: cannot read image /a/b.png (boom)\n'
    )
    assert user_message(wrapped) == "cannot read image /a/b.png (boom)"


def test_unknown_model_suggests_the_closest(capsys, image_folder: Path, tmp_path: Path) -> None:
    argv = _train(image_folder, tmp_path)
    argv[argv.index("dilateformer_nano")] = "dilateformer_tinny"
    err = _fails(capsys, *argv)
    assert "unknown model 'dilateformer_tinny'" in err and "'dilateformer_tiny'" in err


def test_checkpoint_that_does_not_fit_lists_the_keys(capsys, image_folder: Path, tmp_path: Path) -> None:
    other = timm.create_model("dilateformer_nano", num_classes=3, embed_dim=24)  # wider than embed_dim=12
    path = tmp_path / "other.safetensors"
    save_weights(other.state_dict(), path)
    err = _fails(capsys, *_train(image_folder, tmp_path, "--initial-checkpoint", str(path)))
    assert (
        "does not fit" in err
        and "stages.0.blocks.0.mlp.fc1.weight: checkpoint (96, 24) vs model (48, 12)" in err
        and "shape mismatches" in err
    )


def test_unwritable_output_dir(capsys, image_folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = _train(image_folder, tmp_path)
    argv[argv.index("--output") + 1] = str(blocker / "run")  # a directory cannot live under a file, even for root
    err = _fails(capsys, *argv)
    assert "cannot write to output directory" in err


def test_existing_run_is_not_overwritten(capsys, image_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    save_weights({"x": torch.zeros(1)}, tmp_path / "run" / "last.safetensors")
    err = _fails(capsys, *_train(image_folder, tmp_path))
    assert "already holds a run" in err and "--resume" in err


def test_predict_missing_image_and_checkpoint(capsys, tmp_path: Path) -> None:
    err = _fails(capsys, "predict", str(tmp_path / "cat.jpg"), "--checkpoint", str(tmp_path))
    assert "cat.jpg does not exist" in err
    (tmp_path / "cat.jpg").write_bytes(b"")
    err = _fails(capsys, "predict", str(tmp_path / "cat.jpg"), "--checkpoint", str(tmp_path / "run"))
    assert "--checkpoint" in err and "does not exist" in err


@pytest.mark.parametrize("sizes", ["abc", "16", "64,-1"])
def test_demo_bad_sizes(capsys, tmp_path: Path, sizes: str) -> None:
    err = _fails(capsys, "demo", "--quick", "--sizes", sizes, "--output", str(tmp_path / "demo"))
    assert "--sizes" in err
