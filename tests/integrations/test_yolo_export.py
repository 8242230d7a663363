"""YOLO with MSDA layers through Ultralytics' own export: ONNX, OpenVINO and TorchScript files that match PyTorch
and run in a process that never imports dilateformer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("ultralytics", reason="the YOLO plug-in needs the optional extra dilateformer[yolo]")
pytest.importorskip("onnxruntime", reason="ONNX export needs the optional extra dilateformer[export]")
pytest.importorskip("openvino", reason="OpenVINO export needs the optional extra dilateformer[export]")

from ultralytics import YOLO  # noqa: E402

from dilateformer.integrations.ultralytics import available_yamls, yaml_path  # noqa: E402
from tests.fresh_process import run_without_dilateformer  # noqa: E402

IMGSZ = 64
FORMATS = ("onnx", "openvino", "torchscript")

_RUN_ARTIFACTS = """
import json
from pathlib import Path
import numpy as np
import onnxruntime as ort
import openvino as ov
import torch

def run(kind, path, x):
    if kind == "onnx":
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    if kind == "openvino":
        xml = next(Path(path).glob("*.xml"))
        # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise infer in bf16.
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled(x)[0]
    return torch.jit.load(path)(torch.from_numpy(x)).numpy()

x = np.load("input.npy")
for case in json.load(open("cases.json")):
    expected = np.load(case["expected"])
    actual = run(case["format"], case["file"], x)
    assert actual.shape == expected.shape, (case, actual.shape, expected.shape)
    error = float(abs(actual - expected).max())
    assert error < 1e-4, (case, error)
    print(case["file"], error)
"""


@pytest.mark.slow
def test_shipped_yamls_export_to_onnx_openvino_and_torchscript(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ultralytics writes the files next to the working directory's model name
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "input.npy", x.numpy())
    cases = []
    for name in available_yamls():
        torch.manual_seed(0)
        yolo = YOLO(str(yaml_path(name)))
        with torch.no_grad():
            expected = yolo.model.eval()(x)
        expected = expected[0] if isinstance(expected, (tuple, list)) else expected  # raw predictions
        np.save(tmp_path / f"{name}.npy", expected.numpy())
        for fmt in FORMATS:
            file = yolo.export(format=fmt, imgsz=IMGSZ, device="cpu")
            cases.append({"format": fmt, "file": str(file), "expected": f"{name}.npy"})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    stdout = run_without_dilateformer(_RUN_ARTIFACTS, cwd=tmp_path)
    assert len(stdout.splitlines()) == len(available_yamls()) * len(FORMATS)
