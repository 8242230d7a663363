"""Export through the standard calls on a plain model: torch.export, torch.onnx.export (both exporters),
torch.jit.trace and torch.compile. The files run where dilateformer is not installed."""

import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
from torch._dynamo.backends.common import aot_autograd

import dilateformer  # noqa: F401  (registers the models)
from dilateformer.nn import MultiScaleDilatedAttention
from dilateformer.ops import BACKENDS
from dilateformer.ops.context import select_backend
from tests.fresh_process import run_without_dilateformer

pytest.importorskip("onnxruntime", reason="ONNX export tests need the optional extra dilateformer[export]")

BORDERS = ("zero", "clamp")
# The export size, then another, non-square one: the files must hold symbolic batch, height and width.
SIZES = [(2, 3, 64, 64), (1, 3, 48, 80)]
MSDA = torch.ops.dilateformer.msda_forward.default


def _nano(border: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("dilateformer_nano", num_classes=7, border=border).eval()


def _dynamic_shapes():
    # DYNAMIC rather than named Dims: the graph holds guards that are always true, such as
    # (2 + 2 * n) % (1 + n) == 0, that the symbolic solver cannot prove and named Dims would refuse.
    dim = torch.export.Dim.DYNAMIC
    return {"x": {0: dim, 2: dim, 3: dim}}


def _clamp_layer() -> torch.nn.Module:
    torch.manual_seed(0)
    return MultiScaleDilatedAttention(16, 4, dilations=(1, 2), border="clamp", layout="nchw").eval()


def _save_io(folder, name: str, model: torch.nn.Module, channels: int) -> torch.Tensor:
    """Save SIZES-shaped inputs and the model's outputs under ``name``; return the example (the first input)."""
    inputs = []
    for i, (batch, _, height, width) in enumerate(SIZES):
        x = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            np.save(folder / f"{name}_expected{i}.npy", model(x).numpy())
        np.save(folder / f"{name}_input{i}.npy", x.numpy())
        inputs.append(x)
    return inputs[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The artifacts, exported at SIZES[0], with the inputs and PyTorch's outputs.

    The dynamo exporter takes minutes for a whole model on a small CI machine, so it runs once on the nano model
    (border "zero") and once on a single clamp-border layer; the TorchScript-based files cover both borders on
    the model. tests/ops covers torch.export of the clamp border with symbolic sizes.
    """
    folder = tmp_path_factory.mktemp("export")
    cases, programs = [], {}
    for border in BORDERS:
        model = _nano(border)
        example = _save_io(folder, f"nano_{border}", model, channels=3)
        torch.onnx.export(
            model,
            (example,),
            folder / f"nano_{border}_torchscript.onnx",
            dynamo=False,
            input_names=["images"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}},
        )
        torch.jit.trace(model, (example,)).save(folder / f"nano_{border}_trace.pt")
        cases += [
            ("onnx", f"nano_{border}_torchscript.onnx", f"nano_{border}"),
            ("jit", f"nano_{border}_trace.pt", f"nano_{border}"),
        ]
        if border == "zero":
            program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes())
            programs["exported"], programs["decomposed"] = program, program.run_decompositions()
            torch.export.save(programs["decomposed"], folder / "nano_zero.pt2")
            torch.onnx.export(program, (example,), dynamo=True).save(str(folder / "nano_zero_dynamo.onnx"))
            cases += [("program", "nano_zero.pt2", "nano_zero"), ("onnx", "nano_zero_dynamo.onnx", "nano_zero")]
    layer = _clamp_layer()
    example = _save_io(folder, "layer_clamp", layer, channels=16)
    program = torch.onnx.export(layer, (example,), dynamo=True, dynamic_shapes=_dynamic_shapes())
    program.save(str(folder / "layer_clamp_dynamo.onnx"))
    cases.append(("onnx", "layer_clamp_dynamo.onnx", "layer_clamp"))
    (folder / "cases.json").write_text(json.dumps([dict(zip(("kind", "file", "io"), c, strict=True)) for c in cases]))
    return folder, programs


_RUN_ARTIFACTS = """
import json
import numpy as np
import onnxruntime as ort
import torch

def runner(kind, file):
    if kind == "onnx":
        session = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    module = torch.jit.load(file) if kind == "jit" else torch.export.load(file).module()
    return lambda x: module(torch.from_numpy(x)).detach().numpy()

for case in json.load(open("cases.json")):
    run = runner(case["kind"], case["file"])
    for i in range(NUM_SIZES):
        x, expected = np.load(f"{case['io']}_input{i}.npy"), np.load(f"{case['io']}_expected{i}.npy")
        actual = run(x)
        assert actual.shape == expected.shape, (case, actual.shape)
        error = float(abs(actual - expected).max())
        assert error < 1e-4, (case, x.shape, error)
        print(case["file"], x.shape, error)
"""


@pytest.mark.slow
def test_artifacts_run_without_dilateformer_at_the_export_size_and_another(exported):
    folder, _ = exported
    stdout = run_without_dilateformer(_RUN_ARTIFACTS.replace("NUM_SIZES", str(len(SIZES))), cwd=folder)
    assert len(stdout.splitlines()) == len(json.loads((folder / "cases.json").read_text())) * len(SIZES)


@pytest.mark.slow
def test_torch_export_keeps_msda_one_node_until_decomposed(exported):
    program, decomposed = exported[1]["exported"], exported[1]["decomposed"]
    assert sum(node.target is MSDA for node in program.graph.nodes) == 2  # nano: one MSDA block in each of 2 stages
    args = next(node.args for node in program.graph.nodes if node.target is MSDA)
    assert args[-1] == "auto"  # no backend baked in: resolved from the device when the program runs
    targets = {str(node.target) for node in decomposed.graph.nodes if node.op == "call_function"}
    assert not any(t.startswith("dilateformer") for t in targets)
    assert "aten._softmax.default" in targets


@pytest.mark.slow
def test_compile_fullgraph_keeps_msda_one_node_running_the_fast_kernels(monkeypatch):
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module.graph)
        return graph_module

    fast = select_backend("auto", torch.device("cpu"), torch.float32)
    forward = BACKENDS[fast].forward
    runs = []

    def counting_forward(*args):
        runs.append(fast)
        return forward(*args)

    monkeypatch.setitem(BACKENDS, fast, dataclasses.replace(BACKENDS[fast], forward=counting_forward))
    model = _nano("zero")
    torch._dynamo.reset()
    # The forward graph AOT autograd hands to the compiler backend: what inductor would get.
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    x = torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    assert sum(node.target is MSDA for node in graphs[0].nodes) == 2
    assert runs  # the op ran its fast kernels inside the compiled graph, not the export decomposition
    torch._dynamo.reset()
    train_model = _nano("zero").train()
    compiled_train = torch.compile(train_model, fullgraph=True, backend="aot_eager")
    compiled_train(x).sum().backward()
    assert train_model.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
