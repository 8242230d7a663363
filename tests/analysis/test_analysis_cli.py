"""The ``visualize``, ``profile`` and ``benchmark`` commands: outputs written, bad input as one clear line."""

from __future__ import annotations

import json

import pytest

from dilateformer.cli import main


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory):
    import skimage.data
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    return path


def _one_line_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dilateformer")]
    assert rc == 2
    assert "Traceback" not in err
    assert len(lines) == 1 and match in lines[0], err
    return lines[0]


def test_visualize_bad_input(capsys, tmp_path, chelsea):
    _one_line_error(capsys, ["visualize", str(tmp_path / "missing.png")], "image not found")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    _one_line_error(capsys, ["visualize", str(garbage)], "cannot read image")
    _one_line_error(capsys, ["visualize", str(chelsea), "--model", "dilateformer_nano", "--query", "10,999"], "outside")
    _one_line_error(capsys, ["visualize", str(chelsea), "--model", "dilateformer_nano", "--query", "1;2"], "y,x")
    line = _one_line_error(capsys, ["visualize", str(chelsea), "--model", "dilateformer_nano", "--stage", "3"], "MSDA")
    assert "stages with MSDA: 0, 1" in line
    _one_line_error(capsys, ["visualize", str(chelsea), "--model", "dilateformer_tiney"], "dilateformer_tiny")


def test_visualize_writes_the_figure(capsys, tmp_path, chelsea, check_png):
    out = tmp_path / "attention.png"
    argv = ["visualize", str(chelsea), "--model", "dilateformer_nano", "--query", "100,200", "--output", str(out)]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    check_png(out, (1740, 490))


@pytest.mark.parametrize("sizes", ["224,0", "-224", "abc", "224,,512", "22.4"])
def test_profile_rejects_sizes_that_are_not_positive_ints(capsys, sizes):
    _one_line_error(capsys, ["profile", "--sizes", sizes, "--no-timing"], "positive integers")


def test_profile_flops_only_prints_tiny_gmacs_and_writes_json_and_png(capsys, tmp_path, check_png):
    out_json, out_png = tmp_path / "p.json", tmp_path / "p.png"
    argv = ["profile", "--sizes", "224,448", "--no-timing", "--json", str(out_json), "--plot", str(out_png)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "[4/4]" in captured.err  # progress for the sweep
    table = captured.out.splitlines()
    assert table[0].split()[:5] == ["model", "attention", "size", "params", "(M)"]
    tiny_224 = next(line for line in table if "msda" in line and "224x224" in line)
    assert "3.162" in tiny_224 and "17.24" in tiny_224
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 4
    assert {(r["attention"], r["size"]) for r in rows} == {(a, s) for a in ("msda", "global") for s in (224, 448)}
    assert next(r for r in rows if r["attention"] == "msda" and r["size"] == 224)["gmacs"] == pytest.approx(3.162, 0.01)
    check_png(out_png, (1080, 470))


def test_benchmark_quick_op_part(capsys, tmp_path, check_png):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["benchmark", "--part", "op", "--quick", "--backends", "eager", "--sizes", "8,16", "--repeats", "1"]
    assert main([*argv, "--json", str(out_json), "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    payload = json.loads(out_json.read_text())
    impls = {r["impl"] for r in payload["op"]}
    assert {"eager", "unfold (official-style)", "sdpa-global", "byte-floor"} <= impls
    assert {r["size"] for r in payload["sweep"]} == {8, 16}
    assert "unfold (official-style)" in out
    check_png(out_png, (1800, 510))


def test_benchmark_rejects_bad_sizes(capsys):
    _one_line_error(capsys, ["benchmark", "--part", "op", "--sizes", "0"], "positive integers")


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("imgs")
    Image.fromarray(skimage.data.chelsea()).save(folder / "a.png")
    Image.fromarray(skimage.data.coffee()).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_locality_bad_input(capsys, tmp_path, two_images):
    _one_line_error(capsys, ["locality", "--images", str(tmp_path / "missing.png")], "image not found")
    _one_line_error(capsys, ["locality", "--images", str(tmp_path)], "holds no image file")
    _one_line_error(capsys, ["locality", "--images", str(two_images), "--model", "vit_tiy_patch16_224"], "unknown")
    _one_line_error(capsys, ["locality", "--images", str(two_images), "--kernel-size", "4"], "odd")
    _one_line_error(capsys, ["locality", "--model", "vit_tiny_patch16_224", "--twin"], "DilateFormer")
    missing = ["locality", "--images", str(two_images), "--model", "vit_tiny_patch16_224", "--checkpoint", "nope.pt"]
    _one_line_error(capsys, missing, "nope.pt does not exist")
    # A timm model without dynamic_img_size is still built; it just has nothing to measure.
    resnet = ["locality", "--images", str(two_images), "--model", "resnet18", "--size", "32"]
    _one_line_error(capsys, resnet, "ResNet has no global attention layer")
    with pytest.raises(SystemExit):
        main(["locality", "--dilations", "1,0"])
    assert "distinct positive integers" in capsys.readouterr().err


def test_locality_of_a_vit_checkpoint_writes_table_json_and_png(capsys, tmp_path, two_images, check_png):
    import timm
    import torch

    from dilateformer.analysis.locality import images_tensor, measure_locality
    from dilateformer.analysis.visualize import load_image
    from dilateformer.models import save_weights

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, dynamic_img_size=True).eval()
    save_weights(vit, tmp_path / "vit.safetensors")
    out = tmp_path / "out"
    weights = str(tmp_path / "vit.safetensors")
    argv = ["locality", "--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=2", "--checkpoint", weights,
            "--images", str(two_images), "--size", "64", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "blocks.1.attn" in printed and "x chance" in printed
    payload = json.loads((out / "locality.json").read_text())
    assert [layer["name"] for layer in payload["layers"]] == ["blocks.0.attn", "blocks.1.attn"]
    assert len(payload["images"]) == 2  # the text file in the folder is not an image
    # The command measured the checkpoint's weights: the same numbers as the model in memory.
    cfg = vit.pretrained_cfg
    images = images_tensor([load_image(p) for p in sorted(two_images.glob("*.[pj]*g"))], 64, cfg["mean"], cfg["std"])
    expected = measure_locality(vit, images)
    for got, want in zip(payload["layers"], expected, strict=True):
        assert got["mean_distance_px"] == pytest.approx(want.mean_distance_px, rel=1e-5)
        assert got["prefix_share"] == pytest.approx(want.prefix_share, rel=1e-5)
    check_png(out / "locality.png", (1600, 520))
