"""Export: torch.export with symbolic sizes, torch.compile(fullgraph=True), ONNX run in onnxruntime."""

import pytest
import timm
import torch

import dilateformer  # noqa: F401  (registers the models)
from dilateformer.models.export import MIN_DYNAMIC_SIZE, export_onnx, export_program


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return timm.create_model("dilateformer_nano", num_classes=7).eval()


@pytest.mark.slow
def test_torch_export_with_dynamic_batch_height_width(nano):
    program = export_program(nano, torch.randn(2, 3, 64, 64))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "dilateformer.msda_forward.default" in targets  # MSDA stays one fast op
    module = program.module()
    for shape in [(1, 3, 45, 150), (3, 3, 96, 33)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(module(x), nano(x), atol=1e-5, rtol=0)
    static = export_program(nano, torch.randn(1, 3, 16, 16), dynamic=False)
    with torch.no_grad():
        x = torch.randn(1, 3, 16, 16)
        torch.testing.assert_close(static.module()(x), nano(x), atol=1e-5, rtol=0)


def test_export_refuses_examples_that_would_specialise(nano, tmp_path):
    with pytest.raises(ValueError, match=f"at least {MIN_DYNAMIC_SIZE}"):
        export_program(nano, torch.randn(2, 3, 32, 64))
    with pytest.raises(ValueError, match="2 or more images"):
        export_onnx(nano, tmp_path / "x.onnx", torch.randn(1, 3, 64, 64))


@pytest.mark.slow
def test_compile_fullgraph_has_no_graph_breaks(nano):
    # aot_eager traces exactly what inductor would get (dynamo + AOT autograd) without the minutes of C++
    # code generation; the benchmark covers the inductor backend.
    torch._dynamo.reset()
    compiled = torch.compile(nano, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), nano(x), atol=1e-5, rtol=0)
    train_model = timm.create_model("dilateformer_nano", num_classes=7).train()
    compiled_train = torch.compile(train_model, fullgraph=True, backend="aot_eager")
    compiled_train(x).sum().backward()
    assert train_model.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_onnx_export_of_tiny_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = timm.create_model("dilateformer_tiny").eval()
    path = export_onnx(model, tmp_path / "tiny.onnx", torch.randn(2, 3, 64, 64), dynamic=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for shape in [(2, 3, 64, 64), (1, 3, 45, 100)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x).numpy()
        (actual,) = session.run(None, {"images": x.numpy()})
        assert actual.shape == expected.shape
        assert abs(actual - expected).max() < 1e-4
