"""Nothing lost, nothing silent: faults (kills, full disks), odd data and bad flags, each produced for real."""

from __future__ import annotations

import os
import pickle
import resource
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dilateformer.cli import main
from dilateformer.files import KILL_AFTER_TEMP_ENV
from dilateformer.models import load_checkpoint_file, save_weights
from dilateformer.train.checkpoint import load_last, read_metadata
from dilateformer.train.data import MAX_IMAGE_PIXELS, CorruptImageError, ImageFolderDataset, load_image
from dilateformer.train.modeling import create_model, parse_model_kwargs

from .conftest import TINY_MODEL, _cli_env, make_image_folder


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(data), *TINY_MODEL, "-b", "4", "--epochs", "1", "--workers", "0",
            "--warmup-epochs", "0", "--output", str(out), *extra]  # fmt: skip


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must fail with exit code 2 and exactly one stderr line, no traceback."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One finished 1-epoch run of the tiny model (last, best, metrics)."""
    root = tmp_path_factory.mktemp("trained")
    data = make_image_folder(root / "data")
    done = subprocess.run([sys.executable, "-m", "dilateformer", *_train(data, root / "run")],
                          capture_output=True, text=True, env=_cli_env(), timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root / "run"


# ------------------------------------------------------------------------------------------ 1: the best weights


def test_kill_while_best_is_written_never_commits_a_last_without_its_best(image_folder: Path, tmp_path: Path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "dilateformer", *_train(image_folder, out, "--epochs", "2")]
    env = {**_cli_env(), KILL_AFTER_TEMP_ENV: "best.safetensors"}  # a real SIGKILL once best's temp is written
    killed = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if (out / "last.safetensors").exists():  # a committed last must have its best on disk
        _, _, state = load_last(out / "last.safetensors")
        assert read_metadata(out / "best.safetensors")["epoch"] == state["best_epoch"] + 1
    resumed = subprocess.run([*argv[:-2], "--output", str(out), "--resume", "auto"],
                             capture_output=True, text=True, env=_cli_env(), timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    _, _, state = load_last(out / "last.safetensors")
    best = read_metadata(out / "best.safetensors")
    assert best["epoch"] == state["best_epoch"] + 1 and best["val_top1"] == state["best_top1"]
    assert f"weights {out / 'best.safetensors'}" in resumed.stdout


def test_resume_rewrites_a_missing_best_and_eval_says_when_it_falls_back(trained_run: Path, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("last.safetensors", "last.state.pt"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    # No best.safetensors (as an interrupted save of the old order left it): eval names the file it falls back to.
    assert (
        main(["eval", "--checkpoint", str(run), "--data-dir", str(trained_run.parent / "data"), "--workers", "0"]) == 0
    )
    assert "has no best.safetensors; using last.safetensors (epoch 1)" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 0
    captured = capsys.readouterr()
    assert "was missing; rewrote it from the saved epoch 1" in captured.err
    assert "nothing to train" in captured.out and "epoch 2/1" not in captured.out  # 13: a finished run
    torch.testing.assert_close(
        load_checkpoint_file(run / "best.safetensors"), load_checkpoint_file(trained_run / "best.safetensors")
    )


# ------------------------------------------------------------------------------------- 2: bit depths and modes


def test_16_bit_float_and_other_modes_load_as_the_right_8_bit_rgb(tmp_path: Path) -> None:
    ramp16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp16).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    got = np.asarray(load_image(tmp_path / "16.png"))
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp16.astype(np.float64) * 255 / 65535).astype(np.uint8))

    unit = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(unit, mode="F").save(tmp_path / "float.tiff")
    got = np.asarray(load_image(tmp_path / "float.tiff"))
    np.testing.assert_array_equal(got[..., 1], np.rint(unit.astype(np.float64) * 255).astype(np.uint8))

    Image.fromarray(unit * 1000, mode="F").save(tmp_path / "hdr.tiff")
    with pytest.raises(CorruptImageError, match=r"hdr\.tiff.*outside \[0, 1\] or \[0, 255\]"):
        load_image(tmp_path / "hdr.tiff")

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    for mode in ("P", "LA", "CMYK", "RGBA"):
        Image.fromarray(rgb).convert(mode).save(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
        out = load_image(tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
        assert out.mode == "RGB" and out.size == (8, 8)
        assert abs(int(np.asarray(out)[..., 0].mean()) - (59 if mode == "LA" else 200)) <= 3, mode


# --------------------------------------------------------------------- 3, 4, 5: discovery and odd datasets


def test_symlink_loops_and_hidden_entries_are_skipped_and_reported(image_folder: Path) -> None:
    cats = image_folder / "train" / "red"
    (cats / "loop").symlink_to(".", target_is_directory=True)
    (cats / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(cats / ".ipynb_checkpoints" / "0-checkpoint.png")
    (cats / "._0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata, not an image
    dataset = ImageFolderDataset(image_folder / "train")
    assert [sum(s.label == i for s in dataset.samples) for i in range(3)] == [12, 12, 12]
    text = " ".join(dataset.skipped)
    assert "symlink loop" in text and ".ipynb_checkpoints" in text and "._0.jpg" in text


def test_single_class_and_unbalanced_data_get_a_warning(tmp_path: Path, capsys) -> None:
    one = make_image_folder(tmp_path / "one", classes=("cat",))
    (one / "train" / "cat" / ".hidden").mkdir()
    assert main(_train(one, tmp_path / "run1")) == 0
    err = capsys.readouterr().err
    assert "a single class ('cat')" in err and "skipped 1 entry of the dataset: hidden folder" in err
    lopsided = make_image_folder(tmp_path / "two", per_class=(12, 2), classes=("cat", "dog"))
    for path in sorted((lopsided / "train" / "dog").iterdir())[1:]:
        path.unlink()
    assert main(_train(lopsided, tmp_path / "run2", "-b", "2")) == 0
    assert "very unbalanced: 'cat' has 12 images, 'dog' 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- 6: decompression bombs


def _bilevel_png(path: Path, side: int) -> Path:
    """A real, decodable 1-bit black PNG of side x side pixels: a few KB on disk, side**2 pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_refused_in_one_line_naming_the_file(
    image_folder: Path, tmp_path: Path, trained_run: Path, capsys
) -> None:
    bomb = _bilevel_png(image_folder / "train" / "red" / "bomb.png", 14000)  # over twice Pillow's limit
    assert bomb.stat().st_size < 100_000
    for workers in ("0", "2"):
        err = _one_line_error(capsys, _train(image_folder, tmp_path / f"w{workers}", "--workers", workers))
        assert str(bomb) in err and "megapixel limit" in err
    err = _one_line_error(capsys, ["predict", str(bomb), "--checkpoint", str(trained_run)])
    assert str(bomb) in err and "megapixel limit" in err
    err = _one_line_error(capsys, ["visualize", str(bomb), "--model", "dilateformer_nano"])
    assert str(bomb) in err and "megapixel limit" in err
    # Pillow only warns at 12000x12000 (144 MP) and decodes it; our limit refuses it before decoding.
    big = _bilevel_png(tmp_path / "big.png", 12000)
    assert MAX_IMAGE_PIXELS < 12000**2
    with pytest.raises(CorruptImageError, match=r"big\.png is 12000x12000 pixels, above the 100-megapixel limit"):
        load_image(big)


# --------------------------------------------------------------------------------- 7, 9: flags at parse time


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["predict", "x.png", "--checkpoint", "r", "--img-size", "100000"], "--img-size"),
        (["train", "--img-size", "5000"], "--img-size"),
        (["visualize", "x.png", "--size", "100000"], "--size"),
        (["profile", "--sizes", "1000000", "--no-timing"], "--sizes"),
        (["profile", "--memory-gb", "-1"], "--memory-gb"),
        (["train", "--opt", "foo"], "--opt"),
        (["train", "--sched", "foo"], "--sched"),
        (["train", "--aa", "garbage"], "--aa"),
        (["train", "--drop-path", "2"], "--drop-path"),
        (["train", "--workers", "-1"], "--workers"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--device", "banana"], "--device"),
        (["train", "--mixup", "-1"], "--mixup"),
        (["train", "--smoothing", "2"], "--smoothing"),
        (["train", "--hflip", "5"], "--hflip"),
        (["train", "--model-ema-decay", "2"], "--model-ema-decay"),
        (["train", "--clip-grad", "-1"], "--clip-grad"),
        (["train", "--warmup-epochs", "-1"], "--warmup-epochs"),
    ],
)
def test_bad_flag_values_fail_at_parse_time_in_one_line(argv: list[str], flag: str, capsys) -> None:
    err = _one_line_error(capsys, argv)
    assert flag in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused(capsys) -> None:
    assert "no usable CUDA GPU" in _one_line_error(capsys, ["train", "--device", "cuda"])


def test_help_states_the_allowed_ranges(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("[0, 1) [0.1", "mixup alpha, >= 0", "1..4096", "> 0 [1e-3]", "cosine, tanh, step"):
        assert piece in text, piece


def test_timm_model_of_fixed_size_at_another_size_is_one_line(image_folder: Path, tmp_path: Path, capsys) -> None:
    argv = _train(image_folder, tmp_path / "vit")
    argv[argv.index("dilateformer_nano")] = "vit_tiny_patch16_224"
    argv.remove("--model-kwargs")
    argv.remove("embed_dim=12")
    err = _one_line_error(capsys, argv)
    assert "vit_tiny_patch16_224 cannot take 32x32 input" in err


# ------------------------------------------------------------------------------------------ 8: a full disk


def test_failed_save_is_one_line_and_leaves_no_partial_file(image_folder: Path, tmp_path: Path) -> None:
    """A real write failure: the kernel refuses writes past RLIMIT_FSIZE (EFBIG), as a full disk does (ENOSPC)."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # a checkpoint of the tiny model is ~1 MB

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "dilateformer", *_train(image_folder, out)], capture_output=True,
                          text=True, env=_cli_env(), timeout=240, preexec_fn=limit_file_size)  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and "cannot save" in last and "File too large" in last
    assert not list(out.glob("*.tmp")) and not (out / "last.safetensors").exists()


# -------------------------------------------------------------------------------------- 10: --model-kwargs


def test_documented_model_kwargs_example_builds() -> None:
    kwargs = parse_model_kwargs(["embed_dim=24", "depths=1,1,1,1", "attn_types=global,global,global,global"])
    assert kwargs == {"embed_dim": 24, "depths": (1, 1, 1, 1), "attn_types": ("global",) * 4}
    model = create_model("dilateformer_nano", 3, model_kwargs=kwargs).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


# ----------------------------------------------------------------------------------------- 11: pickles


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_hostile_pickle_refusal_names_the_global_and_gives_no_unsafe_advice(
    tmp_path: Path, trained_run: Path, capsys
) -> None:
    hostile = tmp_path / "evil.pth"
    torch.save({"state_dict": _Hostile()}, hostile)
    with pytest.raises(ValueError) as refused:
        load_checkpoint_file(hostile)
    text = str(refused.value)
    assert "posix.system" in text and "weights_only" not in text and len(text.splitlines()) == 1

    text_file = tmp_path / "notes.pth"
    text_file.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        load_checkpoint_file(text_file)

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes((trained_run / "last.safetensors").read_bytes())
    with open(run / "last.state.pt", "wb") as handle:
        pickle.dump(_Hostile(), handle, protocol=2)
    err = _one_line_error(capsys, ["train", "--resume", str(run)])
    assert "posix.system" in err and "weights_only" not in err


# ------------------------------------------------------------------------------------------ 13: the rest


def test_resume_warns_on_settings_that_break_exactness_and_refuses_a_new_model(
    trained_run: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("last.safetensors", "last.state.pt", "best.safetensors"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    assert main(["train", "--resume", str(run), "-b", "2", "--workers", "1", "--img-size", "64", "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    for flag in ("--batch-size 2 instead of the run's 4", "--workers 1 instead of the run's 0", "--img-size 64"):
        assert flag in err, flag
    err = _one_line_error(capsys, ["train", "--resume", str(run), "--model", "dilateformer_tiny"])
    assert "cannot change in a resumed run" in err


def test_initial_checkpoint_with_another_head_is_refused(image_folder: Path, tmp_path: Path, capsys) -> None:
    ten = timm.create_model("dilateformer_nano", num_classes=10, embed_dim=12)
    save_weights(ten.state_dict(), tmp_path / "ten.safetensors")
    err = _one_line_error(capsys, _train(image_folder, tmp_path / "run", "--initial-checkpoint",
                                         str(tmp_path / "ten.safetensors")))  # fmt: skip
    assert "is (10,)" in err and "this model's (3,)" in err and "all keys must fit" in err


def test_models_save_weights_is_world_readable(tmp_path: Path) -> None:
    from dilateformer.models import save_weights as save_model_weights

    umask = os.umask(0o022)
    try:
        path = save_model_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
