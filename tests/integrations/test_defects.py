"""The synthetic industrial-defect dataset: deterministic, valid YOLO labels that bound exactly what was drawn,
safe on reruns and on directories it did not write, readable by Ultralytics, and its ``defects`` command."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dilateformer.cli import main
from dilateformer.integrations import defects
from dilateformer.integrations.defects import (
    DEFECT_CLASSES,
    MARKER,
    MIN_BOX_PIXELS,
    VISIBLE_CHANGE,
    dataset_stats,
    make_defect_dataset,
    sample_grid,
)

SMALL = {"num_train": 6, "num_val": 3, "image_size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for sub in ("images", "labels")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    a = _files(make_defect_dataset(tmp_path / "a", seed=3, **SMALL).parent)
    b = _files(make_defect_dataset(tmp_path / "b", seed=3, **SMALL).parent)
    c = _files(make_defect_dataset(tmp_path / "c", seed=4, **SMALL).parent)
    assert len(a) == 2 * (SMALL["num_train"] + SMALL["num_val"])
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.startswith("images")]
    assert all(a[k] != c[k] for k in images)
    # Each image has its own stream: the training images do not depend on how many validation images follow.
    d = _files(make_defect_dataset(tmp_path / "d", seed=3, **{**SMALL, "num_val": 1}).parent)
    assert {k: v for k, v in d.items() if "train" in k} == {k: v for k, v in a.items() if "train" in k}


def test_labels_are_valid_yolo_and_pair_with_images(tmp_path):
    data_yaml = make_defect_dataset(tmp_path / "ds", seed=1, num_train=10, num_val=4, image_size=96)
    root = data_yaml.parent
    text = data_yaml.read_text()
    assert f'path: "{root.resolve()}"' in text
    assert "train: images/train" in text and "val: images/val" in text
    assert all(f"  {i}: {name}" in text for i, name in enumerate(DEFECT_CLASSES))
    lines = 0
    for split, count in (("train", 10), ("val", 4)):
        images = sorted((root / "images" / split).glob("*.png"))
        labels = sorted((root / "labels" / split).glob("*.txt"))
        assert len(images) == count
        assert [p.stem for p in images] == [p.stem for p in labels]
        for image, label in zip(images, labels, strict=True):
            with Image.open(image) as im:
                assert (im.mode, im.size) == ("RGB", (96, 96))
            for line in label.read_text().splitlines():
                fields = line.split()
                assert len(fields) == 5, line
                cls, (cx, cy, w, h) = int(fields[0]), map(float, fields[1:])
                assert 0 <= cls < len(DEFECT_CLASSES)
                assert w * 96 >= MIN_BOX_PIXELS - 1e-3 and h * 96 >= MIN_BOX_PIXELS - 1e-3
                assert -1e-6 <= cx - w / 2 <= cx + w / 2 <= 1 + 1e-6
                assert -1e-6 <= cy - h / 2 <= cy + h / 2 <= 1 + 1e-6
                lines += 1
    assert lines > 0
    stats = dataset_stats(root)
    assert stats["train"]["boxes"] + stats["val"]["boxes"] == lines
    assert sum(stats["train"]["per_class"].values()) == stats["train"]["boxes"]


@pytest.mark.parametrize("cls", range(len(DEFECT_CLASSES)))
def test_each_box_bounds_exactly_the_pixels_its_defect_changed(cls):
    name, size, checked = DEFECT_CLASSES[cls], 128, 0
    for seed in range(30):
        rng = np.random.default_rng([seed, cls])
        background = defects._background(rng, size)
        original = background.copy()
        painted = defects.PAINTERS[name](rng, background)
        np.testing.assert_array_equal(background, original)  # painters return new pixels, never write in place
        if painted is None:
            continue
        window, after = painted
        full = background.copy()
        full[window.slices] = np.clip(after, 0, 1)
        changed = np.abs(full - background).max(axis=2) > VISIBLE_CHANGE
        box = defects._changed_box(window, background[window.slices], full[window.slices], cls, size)
        if box is None:
            assert changed.sum() < 4 or np.abs(full - background).max() < defects.MIN_PEAK_CHANGE
            continue
        assert np.abs(full - background).max() >= defects.MIN_PEAK_CHANGE
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        tight = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        assert box.cls == cls
        assert (box.x0, box.y0) <= (tight[0], tight[1]) and box.x1 >= tight[2] and box.y1 >= tight[3]
        assert 0 <= box.x0 < box.x1 <= size and 0 <= box.y0 < box.y1 <= size
        # Widened only where the defect is thinner than MIN_BOX_PIXELS, else exactly the changed pixels.
        for lo, hi, (tlo, thi) in ((box.x0, box.x1, tight[::2]), (box.y0, box.y1, tight[1::2])):
            assert (lo, hi) == (tlo, thi) if thi - tlo >= MIN_BOX_PIXELS else hi - lo == MIN_BOX_PIXELS
        checked += 1
    assert checked >= 15


def test_written_pixels_change_only_inside_boxes():
    size = 128
    for seed in range(12):
        image, background, boxes = defects._render(np.random.default_rng([seed]), size)
        inside = np.zeros((size, size), bool)
        for b in boxes:
            inside[b.y0 : b.y1, b.x0 : b.x1] = True
        diff = np.abs(image.astype(int) - background.astype(int)).max(axis=2)
        # Overlapping soft edges can add up outside both boxes, hence twice the one-defect threshold.
        assert diff[~inside].max(initial=0) <= 2 * VISIBLE_CHANGE * 255 + 1
        for b in boxes:
            assert diff[b.y0 : b.y1, b.x0 : b.x1].max() > VISIBLE_CHANGE * 255 - 1


def test_default_size_has_small_and_large_defects_of_every_class():
    size, boxes, empty = 256, [], 0
    for i in range(60):
        _, _, found = defects._render(np.random.default_rng([0, 0, i]), size)
        boxes += found
        empty += not found
    areas = np.array([(b.x1 - b.x0) * (b.y1 - b.y0) for b in boxes])
    assert {b.cls for b in boxes} == set(range(len(DEFECT_CLASSES)))
    assert 0.3 <= (areas < defects.SMALL_AREA).mean() <= 0.95
    assert min(max(b.x1 - b.x0, b.y1 - b.y0) for b in boxes) <= 8
    assert max(max(b.x1 - b.x0, b.y1 - b.y0) for b in boxes) >= size // 5
    assert 0 < empty < 60


def test_rerun_is_cheap_other_settings_raise_overwrite_replaces(tmp_path):
    root = tmp_path / "ds"
    data_yaml = make_defect_dataset(root, **SMALL)
    image = root / "images" / "train" / "train_00000.png"
    stamp, before = image.stat().st_mtime_ns, _files(root)
    assert make_defect_dataset(root, **SMALL) == data_yaml
    assert image.stat().st_mtime_ns == stamp and _files(root) == before
    with pytest.raises(ValueError, match=r"seed=0 \(asked 5\).*overwrite"):
        make_defect_dataset(root, seed=5, **SMALL)
    assert _files(root) == before
    make_defect_dataset(root, seed=5, overwrite=True, **SMALL)
    assert _files(root) != before
    assert _files(root) == _files(make_defect_dataset(tmp_path / "fresh", seed=5, **SMALL).parent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "fresh"]  # no temp dirs left behind
    # A moved dataset is still ours, and its YAML follows it.
    moved = tmp_path / "moved"
    root.rename(moved)
    assert f'path: "{moved.resolve()}"' in make_defect_dataset(moved, seed=5, **SMALL).read_text()


def test_never_touches_a_directory_it_did_not_write(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not written by make_defect_dataset"):
            make_defect_dataset(foreign, overwrite=overwrite, **SMALL)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        make_defect_dataset(tmp_path / "file", **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_defect_dataset(empty, **SMALL).is_file()


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(defects, "dataset_stats", fail)  # runs after every image is written, before the marker
    with pytest.raises(KeyboardInterrupt):
        make_defect_dataset(tmp_path / "ds", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_a_concurrent_run_with_the_same_settings_that_finishes_first_wins(tmp_path, monkeypatch):
    root, generate = tmp_path / "ds", defects._generate

    def generate_while_another_run_finishes(directory, settings):
        generate(directory, settings)
        monkeypatch.setattr(defects, "_generate", generate)
        make_defect_dataset(root, **SMALL)  # the other run: it moves its dataset into place first

    reference = _files(make_defect_dataset(tmp_path / "reference", **SMALL).parent)
    monkeypatch.setattr(defects, "_generate", generate_while_another_run_finishes)
    assert make_defect_dataset(root, **SMALL) == root.resolve() / "data.yaml"
    assert defects._generate is generate  # the other run did happen inside ours
    assert _files(root) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "reference"]
    with pytest.raises(ValueError, match="other settings"):  # and a different one would not be taken for ours
        make_defect_dataset(root, seed=9, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image_size": 100}, ValueError, "image_size"),
        ({"image_size": 32}, ValueError, "image_size"),
        ({"image_size": 4096}, ValueError, "image_size"),
        ({"num_train": 0}, ValueError, "num_train"),
        ({"num_val": 0}, ValueError, "num_val"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"num_train": True}, TypeError, "num_train"),
        ({"overwrite": "yes"}, TypeError, "overwrite"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_defect_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_root_must_be_a_path():
    with pytest.raises(TypeError, match="root"):
        make_defect_dataset(3)


def test_sample_grid_draws_the_boxes(tmp_path):
    root = make_defect_dataset(tmp_path / "ds", seed=2, num_train=5, num_val=1, image_size=64).parent
    png = sample_grid(root, tmp_path / "grid.png", n=5, columns=3)
    with Image.open(png) as grid:
        assert grid.size == (3 * 64 + 2 * 4, 2 * 64 + 4)
        tile = np.asarray(grid.convert("RGB"))[:64, :64]
    raw = np.asarray(Image.open(root / "images" / "train" / "train_00000.png"))
    boxes = (root / "labels" / "train" / "train_00000.txt").read_text().strip()
    assert (tile != raw).any() == bool(boxes)  # outlines and names drawn exactly where there are labels
    with pytest.raises(ValueError, match="split"):
        sample_grid(root, tmp_path / "x.png", split="test")


def test_module_imports_neither_ultralytics_nor_matplotlib():
    """It only writes files: usable without the [yolo] extra, and it never switches a notebook's plot backend."""
    tree = ast.parse(Path(defects.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "PIL" in imported  # the walk does see the imports inside functions
    assert not {name for name in imported if name.split(".")[0] in ("ultralytics", "matplotlib", "torch")}


def test_command_writes_the_dataset_and_grid_and_prints_one_line(tmp_path, capsys):
    out_dir, grid = tmp_path / "ds", tmp_path / "grid.png"
    argv = ["defects", "--output", str(out_dir), "--num-train", "4", "--num-val", "2", "--image-size", "64"]
    assert main([*argv, "--grid", str(grid)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    assert str(out_dir.resolve() / "data.yaml") in line and str(grid) in line
    assert all(name in line for name in DEFECT_CLASSES) and "4 train + 2 val" in line
    assert grid.is_file() and (out_dir / MARKER).is_file()
    assert main(argv) == 0  # the default grid goes into the dataset directory, which stays ours
    assert (out_dir / "sample_grid.png").is_file()
    capsys.readouterr()
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dilateformer defects: error: ") and err.count("\n") == 1 and "seed=0" in err


@pytest.mark.parametrize("flag", [["--image-size", "100"], ["--num-train", "0"], ["--seed", "-2"], ["--seed", "x"]])
def test_command_rejects_bad_flags_in_one_line(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["defects", "--output", str(tmp_path / "ds"), *flag])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag[0] in err
    assert not (tmp_path / "ds").exists()


def test_ultralytics_reads_the_dataset_with_our_label_counts(tmp_path):
    pytest.importorskip("ultralytics", reason="the YOLO check needs the optional extra dilateformer[yolo]")
    from ultralytics.data import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data_yaml = make_defect_dataset(tmp_path / "ds", seed=0, num_train=8, num_val=4, image_size=64)
    data = check_det_dataset(str(data_yaml))  # offline: the conftest turned Ultralytics' downloads off
    assert data["nc"] == len(DEFECT_CLASSES) and list(data["names"].values()) == list(DEFECT_CLASSES)
    stats = dataset_stats(data_yaml.parent)
    for split in ("train", "val"):
        dataset = YOLODataset(img_path=data[split], data=data, task="detect", imgsz=64, augment=False)
        assert len(dataset) == stats[split]["images"]
        assert sum(len(label["cls"]) for label in dataset.labels) == stats[split]["boxes"]
        classes = np.concatenate([label["cls"].ravel() for label in dataset.labels])
        assert [int((classes == i).sum()) for i in range(len(DEFECT_CLASSES))] == list(
            stats[split]["per_class"].values()
        )
