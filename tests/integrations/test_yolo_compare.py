"""``dilateformer yolo-compare``: the --quick run end to end, resuming, refusals, the CBAM/PSA YAMLs, the test."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics", reason="the [yolo] extra (Ultralytics) is not installed")

from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.modules import CBAM, PSA  # noqa: E402

import dilateformer.integrations.ultralytics as plugin  # noqa: E402
from dilateformer.cli import main  # noqa: E402
from dilateformer.integrations import yolo_compare as yc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICK_VARIANTS = yc.QUICK["variants"]
QUICK_SEEDS = yc.QUICK["seeds"]


def _quick(output: Path) -> subprocess.CompletedProcess:
    """``--quick`` in a fresh process (Ultralytics' trainer leaves global torch flags set in its process)."""
    return subprocess.run(
        [sys.executable, "-m", "dilateformer", "yolo-compare", "--quick", "--output", str(output)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("yolo-compare") / "out"
    start = time.perf_counter()
    done = _quick(output)
    assert done.returncode == 0, done.stderr[-3000:]
    return output, done, time.perf_counter() - start


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_quick_run_writes_every_run_the_table_and_the_pngs(quick_run):
    output, done, _ = quick_run
    payload = json.loads((output / "yolo-compare.json").read_text())
    runs = {(r["variant"], r["seed"]): r for r in payload["runs"]}
    assert set(runs) == {(v, s) for v in QUICK_VARIANTS for s in QUICK_SEEDS}
    for run in runs.values():
        for key in ("map50", "map50_95", "params", "gflops", "train_memory_bytes", "train_img_s", "inference_ms"):
            assert _finite(run[key]), (run["variant"], key, run[key])
        assert 0 <= run["map50_95"] <= run["map50"] <= 1
        assert run["params"] > 0 and run["gflops"] > 0 and run["train_memory_bytes"] > 0
        assert (output / "runs" / f"{run['variant']}-s{run['seed']}" / "result.json").is_file()
    assert [r["variant"] for r in payload["rows"]] == list(QUICK_VARIANTS)
    # The printed table is the JSON's, with a row per variant and the test's verdict column.
    assert payload["table"] in done.stdout
    for variant in QUICK_VARIANTS:
        assert any(line.startswith(variant + " ") for line in payload["table"].splitlines())
    assert "Welch" in payload["table"] and "count_macs" in payload["table"]
    # Global attention costs more compute than MSDA at the same places, and both more than the plain network.
    gflops = {r["variant"]: r["gflops"] for r in payload["rows"]}
    assert gflops["yolov8n"] < gflops["yolov8n-msda"] < gflops["yolov8n-global"]
    assert Path(payload["png"]).stat().st_size > 10_000
    locality = payload["locality"]
    assert locality["variant"] == "yolov8n-global" and locality["seed"] == QUICK_SEEDS[0]
    assert locality["layers"] and locality["table"] in done.stdout
    assert Path(locality["png"]).stat().st_size > 10_000
    assert _finite(payload["total_wall_s"]) and payload["runs_wall_s"] > 0
    # One progress line per finished run.
    assert sum(" done)" in line for line in done.stderr.splitlines()) == len(runs)


def test_rerun_skips_finished_runs_and_retrains_an_unfinished_one(quick_run, capsys):
    output, _, first_wall = quick_run
    before = json.loads((output / "yolo-compare.json").read_text())
    start = time.perf_counter()
    assert main(["yolo-compare", "--quick", "--output", str(output)]) == 0
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    assert err.count("finished earlier, skipped") == len(QUICK_VARIANTS) * len(QUICK_SEEDS)
    assert "Epoch" not in err and took < first_wall
    after = json.loads((output / "yolo-compare.json").read_text())
    assert [r["map50_95"] for r in after["runs"]] == [r["map50_95"] for r in before["runs"]]
    # A run killed before its result.json: its folder is there, half written; the rerun trains it (only it) again.
    unfinished = output / "runs" / f"{QUICK_VARIANTS[1]}-s{QUICK_SEEDS[1]}"
    (unfinished / "result.json").unlink()
    (unfinished / "weights" / "best.pt").write_bytes(b"half a file")
    done = _quick(output)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("finished earlier, skipped") == len(QUICK_VARIANTS) * len(QUICK_SEEDS) - 1
    assert f"{QUICK_VARIANTS[1]} seed {QUICK_SEEDS[1]}: mAP50-95" in done.stderr
    assert json.loads((unfinished / "result.json").read_text())["seed"] == QUICK_SEEDS[1]


def test_a_changed_setting_is_refused_in_one_line(quick_run, capsys):
    output, _, _ = quick_run
    assert main(["yolo-compare", "--quick", "--epochs", "2", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "other settings" in err and "epochs 1 -> 2" in err


def test_bad_variants_are_one_line_errors(tmp_path, capsys):
    assert main(["yolo-compare", "--variants", "yolov8n,no-such-net", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-net" in err
    assert main(["yolo-compare", "--variants", str(tmp_path / "missing.yaml"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such YAML file" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["yolo-compare", "--variants", "yolov8n,yolov8n"])
    assert exit_info.value.code == 2
    assert "named twice" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_variants_resolve_names_and_own_yaml_files(tmp_path):
    assert yc.resolve_variant("yolov8n") == yc.Variant("yolov8n", "yolov8n.yaml")
    assert yc.resolve_variant("yolov8s-psa.yaml") == yc.Variant("yolov8s-psa", "yolov8s-psa.yaml")
    own = tmp_path / "my-detector.yaml"
    shutil.copy(plugin.yaml_path("yolov8n-cbam.yaml"), own)
    assert yc.resolve_variant(str(own)) == yc.Variant("my-detector", str(own.resolve()))
    with pytest.raises(ValueError, match="segment model"):
        yc.resolve_variant("yolov8n-seg")


def _attention_rows(model, cls):
    return [m for m in model.model if isinstance(m, cls)]


def test_cbam_and_psa_yamls_build_at_the_msda_places():
    x = torch.zeros(1, 3, 64, 64)
    base = YOLO("yolov8n.yaml").model.eval()
    msda = YOLO("yolov8n-msda.yaml").model
    msda_places = [m.i for m in msda.model if isinstance(m, plugin.MSDA)]
    for name, cls in (("yolov8n-cbam.yaml", CBAM), ("yolov8n-psa.yaml", PSA)):
        model = YOLO(name).model.eval()
        rows = _attention_rows(model, cls)
        assert [m.i for m in rows] == msda_places, name
        assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in base.parameters())
        with torch.no_grad():
            assert model(x)[0].shape == base(x)[0].shape
    # c1 filled in from the previous layer: the P3/P4/P5 widths of YOLOv8n (and doubled for the s scale).
    for name, scale in (("yolov8n-cbam.yaml", 1), ("yolov8s-cbam.yaml", 2)):
        cbam = _attention_rows(YOLO(name).model, CBAM)
        assert [m.channel_attention.fc.in_channels for m in cbam] == [64 * scale, 128 * scale, 256 * scale]
    psa = _attention_rows(YOLO("yolov8n-psa.yaml").model, PSA)
    assert [m.cv2.conv.out_channels for m in psa] == [64, 128, 256]


def _welch_p(a, b):
    from scipy.stats import t

    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return 2 * t.sf(abs(mb - ma) / math.sqrt(se2), df)


def test_significance_rule_on_hand_made_numbers():
    base = [0.20, 0.26, 0.14]
    noise = [0.26, 0.32, 0.20]  # +0.06 with a seed spread of 0.06: noise
    real = [0.40, 0.41, 0.42]
    d = yc.compare_to_baseline(base, noise)
    assert d.diff == pytest.approx(0.06) and d.significant is False
    assert d.p == pytest.approx(_welch_p(base, noise), rel=1e-9)
    d = yc.compare_to_baseline(base, real)
    assert d.diff == pytest.approx(0.21) and d.significant is True
    assert d.p == pytest.approx(_welch_p(base, real), rel=1e-9) and d.p < 0.05
    one = yc.compare_to_baseline([0.2], [0.5])
    assert one.p is None and one.significant is None and "n/a" in one.label()
    assert yc.compare_to_baseline([0.3, 0.3], [0.3, 0.3]).significant is False
    assert yc.compare_to_baseline([0.3, 0.3], [0.4, 0.4]).significant is True
    with pytest.raises(ValueError, match="at least one value"):
        yc.compare_to_baseline([], [0.1])
