"""The Ultralytics YOLO plug-in: layers, YAML parsing, training, checkpoints in a fresh process, DDP scripts.

Offline throughout: Ultralytics' online checks are off (YOLO_OFFLINE), its settings and DDP scratch files live in
a temporary config dir, plots are off (no font download), and models are built from YAML (no weight download).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics", reason="the YOLO plug-in needs the optional extra dilateformer[yolo]")

from ultralytics import YOLO  # noqa: E402
from ultralytics.nn import tasks  # noqa: E402

from dilateformer.integrations import ultralytics as plugin  # noqa: E402
from dilateformer.integrations.ultralytics import (  # noqa: E402
    C2PSA_MSDA,
    MSDA,
    C2f_MSDA,
    GlobalAttn,
    default_num_heads,
    yaml_path,
)
from dilateformer.nn import GlobalAttention, MultiScaleDilatedAttention  # noqa: E402
from tests.nn.test_amp import LOSS_RTOL, autocast_step  # noqa: E402

SHIPPED = ["yolov8n-msda.yaml", "yolo11n-msda.yaml", "yolov8n-global.yaml"]
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """Environment for a fresh Python process: offline, eager MSDA backend, same config dir."""
    return {**os.environ, "YOLO_OFFLINE": "1", "DILATEFORMER_BACKEND": os.environ.get("DILATEFORMER_BACKEND", "eager")}


def _run(code: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result.stdout


def _layers(model: torch.nn.Module, cls: type) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


# ------------------------------------------------------------------------------------------------------ layers


def test_msda_layer_equals_the_core_layer_on_the_same_weights():
    torch.manual_seed(0)
    layer = MSDA(64).eval()
    core = MultiScaleDilatedAttention(64, layer.num_heads, dilations=layer.dilations, layout="nchw").eval()
    core.load_state_dict(layer.state_dict())
    x = torch.randn(2, 64, 10, 12)
    torch.testing.assert_close(layer(x), core(x))
    assert layer(x).shape == x.shape


def test_msda_in_a_built_model_equals_the_core_layer():
    torch.manual_seed(0)
    model = YOLO("yolov8n-msda.yaml").model.eval()
    msda = _layers(model, MSDA)
    assert [m.dim for m in msda] == [64, 128, 256]  # the n-scale P3, P4, P5 widths, from the previous layers
    for layer in msda:
        core = MultiScaleDilatedAttention(layer.dim, layer.num_heads, dilations=layer.dilations).eval()
        core.load_state_dict(layer.state_dict())
        x = torch.randn(1, layer.dim, 8, 8)
        torch.testing.assert_close(layer(x), core(x))


def test_global_attention_layer_equals_the_core_layer():
    torch.manual_seed(0)
    layer = GlobalAttn(64).eval()
    core = GlobalAttention(64, layer.num_heads, layout="nchw").eval()
    core.load_state_dict(layer.state_dict())
    x = torch.randn(1, 64, 6, 7)
    torch.testing.assert_close(layer(x), core(x))


def test_blocks_keep_the_shapes_of_their_ultralytics_twins():
    torch.manual_seed(0)
    x = torch.randn(1, 32, 8, 8)
    assert C2f_MSDA(32, 48, n=2, shortcut=True)(x).shape == (1, 48, 8, 8)
    block = C2PSA_MSDA(32, 32, n=2)
    assert block(x).shape == x.shape
    assert all(isinstance(b.attn, MSDA) and b.attn.dim == 16 for b in block.m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "make",
    [lambda: MSDA(32), lambda: GlobalAttn(32), lambda: C2f_MSDA(32, 32, n=1), lambda: C2PSA_MSDA(32, 32, n=1)],
    ids=["MSDA", "GlobalAttn", "C2f_MSDA", "C2PSA_MSDA"],
)
def test_modules_train_under_cpu_autocast(make, dtype):
    torch.manual_seed(0)
    module = make().train()
    x = torch.randn(2, 32, 8, 10)
    reference, _ = autocast_step(module, x, None)
    loss, grads = autocast_step(module, x, dtype)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert loss == pytest.approx(reference, rel=LOSS_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SHIPPED)
def test_half_precision_model_runs_inference(name, dtype):
    """Ultralytics validates with ``model.half()`` on GPU; the same cast must work for our layers."""
    torch.manual_seed(0)
    model = YOLO(name).model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)[0]
        got = model.to(dtype)(x.to(dtype))[0]
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("channels", [16, 32, 40, 48, 64, 80, 96, 120, 128, 160, 192, 256, 320, 384, 512, 640, 768])
def test_default_heads_divide_every_yolo_width(channels):
    heads = default_num_heads(channels, 4)
    assert channels % heads == 0 and heads % 4 == 0
    MSDA(channels)  # and the layer accepts them


def test_head_and_width_errors_say_why():
    with pytest.raises(ValueError, match=r"num_heads=5 must divide the channels.*len\(dilations\)=4"):
        MSDA(64, num_heads=5)
    with pytest.raises(ValueError, match="divisible by 3"):
        MSDA(64, dilations=[1, 2, 3])
    with pytest.raises(ValueError, match=r"C2f_MSDA\(c2=24, e=0.5\).*hidden width"):
        C2f_MSDA(16, 24, num_heads=8)
    with pytest.raises(ValueError, match="c2 .* must equal the input channels"):
        C2PSA_MSDA(64, 128)
    with pytest.raises(TypeError, match="input channels c1 must be a positive int"):
        MSDA("64")


# ---------------------------------------------------------------------------------------------------- YAMLs


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_builds_and_runs_at_64_and_320(name):
    torch.manual_seed(0)
    model = YOLO(name).model.eval()
    by_path = YOLO(str(yaml_path(name))).model
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in by_path.parameters())
    expected = {"yolov8n-msda.yaml": MSDA, "yolo11n-msda.yaml": C2PSA_MSDA, "yolov8n-global.yaml": GlobalAttn}[name]
    assert _layers(model, expected)
    with torch.no_grad():
        for size in (64, 320):
            out = model(torch.rand(1, 3, size, size))[0]
            cells = sum((size // s) ** 2 for s in (8, 16, 32))
            assert out.shape == (1, 84, cells) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["yolov8{}-msda.yaml", "yolo11{}-msda.yaml"])
def test_every_scale_parses_with_default_heads(family):
    """n/s/m/l/x widths: the attention widths follow the previous layers' scaled widths."""
    for scale in "nslmx":
        d = tasks.yaml_model_load(family.format(scale))
        assert d["scale"] == scale
        layers, _ = tasks.parse_model(copy.deepcopy(d), ch=3, verbose=False)
        attn = [m for m in layers.modules() if isinstance(m, MSDA)]
        assert attn and all(m.dim % m.num_heads == 0 and m.num_heads % len(m.dilations) == 0 for m in attn)
        if family.startswith("yolov8"):  # MSDA rows sit right after the layer whose width they take
            for i in (5, 8, 12):
                previous = layers[i - 1]
                width = previous.cv2.conv.out_channels
                assert layers[i].dim == width


def test_custom_yaml_channel_changes_absolute_from_and_repeats():
    d = {
        "nc": 2,
        "scales": {"n": [0.5, 0.25, 1024], "s": [0.5, 0.5, 1024]},
        "scale": "s",
        "activation": "nn.ReLU()",
        "backbone": [
            [-1, 1, "Conv", [64, 3, 2]],  # 0
            [-1, 1, "Conv", [128, 3, 2]],  # 1
            [-1, 4, "C2f_MSDA", [128, True]],  # 2: depth 0.5 -> 2 bottlenecks, width 0.5 -> 64
            [-1, 1, "Conv", [256, 3, 2]],  # 3
            [2, 4, "MSDA", [8, 3, [1, 2]]],  # 4: absolute from, explicit heads and dilations, 2 repeats
            [-1, 1, "Conv", [256, 3, 2]],  # 5
        ],
        "head": [
            [[-1, 3], 1, "Concat", [1]],  # 6: 128 + 128
            [-1, 2, "C2f_MSDA", [96]],  # 7: 256 -> 48
            [[7, 7, 7], 1, "Detect", [2]],
        ],
    }
    layers, _ = tasks.parse_model(copy.deepcopy(d), ch=3, verbose=True)
    c2f = layers[2]
    assert isinstance(c2f, C2f_MSDA) and len(c2f.m) == 2 and c2f.cv2.conv.out_channels == 64
    assert isinstance(c2f.m[0].cv1.act, torch.nn.ReLU)  # the YAML's activation reaches our blocks' convs
    assert isinstance(layers[4], torch.nn.Sequential) and len(layers[4]) == 2
    assert layers[4][0].dim == 64 and layers[4][0].num_heads == 8 and layers[4][0].dilations == (1, 2)
    assert layers[7].cv1.conv.in_channels == 256 and layers[7].cv2.conv.out_channels == 48
    assert layers[7].i == 7 and layers[7].f == -1 and layers[4].f == 2


def test_yaml_errors_name_the_layer():
    d = {"nc": 1, "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "MSDA", [5]]], "head": []}
    with pytest.raises(ValueError, match=r"layer 1 \[-1, \.\.\., MSDA, \[5\]\].*num_heads=5"):
        tasks.parse_model(copy.deepcopy(d), ch=3, verbose=False)


def test_yaml_path_and_names():
    assert yaml_path("yolo11n-msda.yaml").is_file()
    assert set(SHIPPED) <= set(plugin.available_yamls())
    with pytest.raises(ValueError, match="pass the bare name"):
        yaml_path("yolov8s-msda.yaml")
    with pytest.raises(ValueError, match="name must be one of"):
        yaml_path("yolov9n-msda.yaml")
    with pytest.raises(TypeError, match="name must be"):
        yaml_path(Path("yolov8n-msda.yaml"))


def test_register_is_idempotent():
    parse_model, check_yaml = tasks.parse_model, tasks.check_yaml
    safe = list(torch.serialization.get_safe_globals())
    plugin.register()
    assert tasks.parse_model is parse_model and tasks.check_yaml is check_yaml
    assert list(torch.serialization.get_safe_globals()) == safe and MSDA in safe
    assert tasks.parse_model.__wrapped__.__module__ == "ultralytics.nn.tasks"


def test_core_package_never_imports_ultralytics(tmp_path):
    out = _run(
        """
        import pkgutil, importlib, sys
        import dilateformer
        names = [m.name for m in pkgutil.walk_packages(dilateformer.__path__, "dilateformer.")]
        for name in names:
            if not name.startswith("dilateformer.integrations.ultralytics") and not name.endswith("__main__"):
                importlib.import_module(name)
        print(len(names), "ultralytics" in sys.modules)
        """,
        tmp_path,
    )
    assert out.split()[-1] == "False"


# ------------------------------------------------------------------------------- train, reload, predict, DDP


def _write_dataset(root: Path) -> Path:
    """Four 64x64 images per split, each with one red box, as YOLO labels, and the data YAML."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(4):
            image = np.full((64, 64, 3), 114, np.uint8)
            x0, y0 = rng.integers(4, 30, 2)
            w, h = rng.integers(12, 30, 2)
            image[y0 : y0 + h, x0 : x0 + w] = (200, 30, 30)
            Image.fromarray(image).save(root / "images" / split / f"{k}.jpg")
            box = f"0 {(x0 + w / 2) / 64:.6f} {(y0 + h / 2) / 64:.6f} {w / 64:.6f} {h / 64:.6f}\n"
            (root / "labels" / split / f"{k}.txt").write_text(box)
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """yolov8n-msda trained for one epoch at 64x64 on CPU: (best.pt, data.yaml)."""
    root = tmp_path_factory.mktemp("yolo")
    data = _write_dataset(root / "data")
    model = YOLO("yolov8n-msda.yaml")
    model.train(
        data=str(data),
        epochs=1,
        imgsz=64,
        batch=4,
        workers=0,
        device="cpu",
        plots=False,
        amp=False,
        project=str(root / "runs"),
        name="msda",
        verbose=False,
    )
    best = Path(model.trainer.best)
    assert best.is_file()
    return best, data


@pytest.mark.slow
def test_train_one_epoch(trained):
    best, _ = trained
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert _layers(ckpt["model"], MSDA) and ckpt["model"].yaml["backbone"][5][2] == "MSDA"


@pytest.mark.slow
def test_checkpoint_loads_and_predicts_in_a_fresh_process(trained):
    """No import of dilateformer in the script: unpickling the model imports (and registers) the layers."""
    best, data = trained
    image = data.parent / "images" / "val" / "0.jpg"
    out = _run(
        f"""
        import sys
        from ultralytics import YOLO
        model = YOLO({str(best)!r})
        results = model.predict({str(image)!r}, imgsz=64, device="cpu", conf=0.0, verbose=False)
        kinds = {{type(m).__name__ for m in model.model.modules()}}
        print("MSDA" in kinds, len(results), results[0].boxes.data.shape[-1])
        # a rebuild from the checkpoint's own YAML (what fine-tuning does) works in this process too
        from ultralytics.nn.tasks import DetectionModel
        DetectionModel(model.model.yaml, verbose=False)
        print("ok")
        """,
        best.parent,
    )
    assert out.split()[-4:] == ["True", "1", "6", "ok"]


@pytest.mark.slow
def test_ddp_worker_script_registers_our_layers(trained, tmp_path):
    """What a DDP launch can be checked for on one CPU: the generated worker script, run in a fresh process.

    Ultralytics writes a script (plus pickled trainer state) that every DDP rank runs; here it runs once, with
    the final ``trainer.train()`` replaced by checks, since DDP itself needs several GPUs.
    """
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import dist

    _, data = trained
    trainer = DetectionTrainer(
        overrides={
            "model": "yolov8n-msda.yaml",
            "data": str(data),
            "imgsz": 64,
            "device": "cpu",
            "plots": False,
            "project": str(tmp_path),
            "name": "ddp",
        }
    )
    trainer.model = trainer.get_model(cfg="yolov8n-msda.yaml", verbose=False)
    script = Path(dist.generate_ddp_file(trainer))
    try:
        text = script.read_text()
        assert plugin.__name__ in text
        assert text.index(plugin.__name__) > text.find("sys.path =")  # after the worker's sys.path setup
        assert "trainer.train()" in text
        check = text.replace(
            "trainer.train()",
            "from ultralytics.nn import tasks\n"
            "    assert 'MSDA' in vars(tasks) and tasks.parse_model._dilateformer\n"
            "    assert 'MSDA' in {type(m).__name__ for m in trainer.model.modules()}\n"
            "    trainer.get_model(cfg='yolov8s-msda.yaml', verbose=False)  # a rebuild from the YAML name\n"
            "    print('worker ok')",
        )
        worker = tmp_path / "worker.py"
        worker.write_text(check)
        result = subprocess.run(
            [sys.executable, str(worker)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "worker ok" in result.stdout
    finally:
        dist.ddp_cleanup(trainer, str(script))


# ------------------------------------------------------------------------------------------------ FLOP counts


def _hand_count(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds from each conv's and attention layer's shapes, read off hooks during one forward."""
    macs = []

    def conv(module, inputs, output):
        macs.append(
            output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        )

    def attention(module, inputs):
        batch, channels, height, width = inputs[0].shape
        tokens = height * width
        products = 2 * tokens * channels * (module.kernel_size**2 if isinstance(module, MSDA) else tokens)
        macs.append(batch * (tokens * 4 * channels * channels + products))  # qkv, proj, q.k and p.v

    handles = [m.register_forward_hook(conv) for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    handles += [m.register_forward_pre_hook(attention) for m in _layers(block, (MSDA, GlobalAttn))]
    with torch.no_grad():
        block.eval()(x)
    for handle in handles:
        handle.remove()
    return sum(macs)


@pytest.mark.parametrize(
    "build",
    [
        lambda: MSDA(32),
        lambda: GlobalAttn(32),
        lambda: C2f_MSDA(32, 48, n=2, shortcut=True),
        lambda: C2PSA_MSDA(32, 32, n=2),
    ],
    ids=["MSDA", "GlobalAttn", "C2f_MSDA", "C2PSA_MSDA"],
)
def test_flop_counter_counts_the_layers_by_hand_on_cpu_and_on_meta(build):
    from dilateformer.analysis.measure import count_macs

    torch.manual_seed(0)
    block = build()
    x = torch.randn(1, 32, 8, 12)
    expected = _hand_count(block, x)
    assert len(_layers(block, (MSDA, GlobalAttn))) >= 1
    assert count_macs(block, x) == count_macs(block, x, on_meta=True) == expected
