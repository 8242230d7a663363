"""The export form of MSDA: the pure-ATen decomposition against the float64 reference, and how it is reached."""

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dilateformer.functional import multi_scale_dilated_attention
from dilateformer.ops import eager
from dilateformer.ops.decomposition import msda_decomposed
from dilateformer.ops.reference import msda_reference
from tests.ops.helpers import random_qkv

CASES = [
    # (shape (B, H, W, heads, head_dim), kernel_size, dilations)
    ((2, 7, 9, 6, 4), 3, (1, 2, 3)),
    ((1, 11, 6, 4, 3), 5, (1, 2)),
    ((2, 5, 4, 2, 8), 1, (1,)),
    ((1, 3, 2, 6, 4), 3, (1, 2, 3)),  # image smaller than the dilated window
    ((1, 2, 9, 2, 4), 7, (4,)),  # window larger than the image on both axes
]


@pytest.mark.parametrize(("border", "case"), itertools.product(("zero", "clamp"), CASES))
def test_decomposition_equals_the_reference_and_the_op_lse(border, case):
    shape, kernel_size, dilations = case
    q, k, v = random_qkv(shape, seed=sum(shape), requires_grad=False)
    out, lse = msda_decomposed(q, k, v, kernel_size, list(dilations), 0.7, border)
    expected = msda_reference(q, k, v, kernel_size, dilations, 0.7, border)
    _, expected_lse = eager.msda_forward(q, k, v, kernel_size, list(dilations), 0.7, border)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decomposition_keeps_the_op_dtypes_for_half_inputs(dtype):
    q, k, v = (t.to(dtype) for t in random_qkv((1, 5, 6, 4, 8), requires_grad=False))
    out, lse = msda_decomposed(q, k, v, 3, [1, 2], 0.35, "clamp")
    fake_out, fake_lse = torch.ops.dilateformer.msda_forward(q, k, v, 3, [1, 2], 0.35, "clamp", "eager")
    assert (out.dtype, lse.dtype) == (fake_out.dtype, fake_lse.dtype) == (dtype, torch.float32)
    expected = msda_reference(*(t.double() for t in (q, k, v)), 3, (1, 2), 0.35, "clamp")
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-2)


class _Attention(torch.nn.Module):
    def __init__(self, border):
        super().__init__()
        self.border = border

    def forward(self, q, k, v):
        return multi_scale_dilated_attention(q, k, v, 3, (1, 2), border=self.border)


def _targets(graph) -> set[str]:
    return {str(node.target) for node in graph.nodes if node.op == "call_function"}


def test_export_keeps_one_op_and_run_decompositions_replaces_it():
    # The clamp border builds its window tables from the symbolic sizes; tests/models covers both borders.
    border = "clamp"
    q, k, v = random_qkv((2, 6, 7, 4, 8), dtype=torch.float32, requires_grad=False)
    dim = torch.export.Dim.DYNAMIC
    sizes = {0: dim, 1: dim, 2: dim}
    program = torch.export.export(_Attention(border), (q, k, v), dynamic_shapes=(sizes, sizes, sizes))
    assert sum(node.target is torch.ops.dilateformer.msda_forward.default for node in program.graph.nodes) == 1
    decomposed = program.run_decompositions()
    assert not any(t.startswith("dilateformer") for t in _targets(decomposed.graph))
    for shape in [(2, 6, 7, 4, 8), (3, 11, 5, 4, 8)]:  # another, non-square size through the symbolic sizes
        q, k, v = random_qkv(shape, dtype=torch.float32, seed=1, requires_grad=False)
        expected = msda_reference(q.double(), k.double(), v.double(), 3, (1, 2), 8**-0.5, border)
        torch.testing.assert_close(decomposed.module()(q, k, v).double(), expected, rtol=0, atol=1e-5)


def test_eager_calls_and_jit_traces_take_their_own_routes(monkeypatch):
    calls = []
    import dilateformer.functional as functional

    def spy(*args):
        calls.append(torch.jit.is_tracing())
        return msda_decomposed(*args)

    monkeypatch.setattr(functional, "msda_decomposed", spy)
    q, k, v = random_qkv((1, 5, 6, 4, 8), dtype=torch.float32, requires_grad=False)
    eager = _Attention("zero")(q, k, v)
    assert calls == []  # eager dispatch runs the op's kernels, not the decomposition
    traced = torch.jit.trace(_Attention("zero"), (q, k, v))
    assert calls and all(calls)  # the trace (and its check run) took the decomposition
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::softmax" in kinds and not any(kind.startswith("dilateformer::") for kind in kinds)
    q, k, v = random_qkv((2, 9, 4, 4, 8), dtype=torch.float32, seed=3, requires_grad=False)
    torch.testing.assert_close(traced(q, k, v), _Attention("zero")(q, k, v), rtol=0, atol=1e-5)
    assert eager.shape == (1, 5, 6, 4, 8)


@pytest.mark.slow
def test_inductor_compiles_the_op_when_dilateformer_is_imported_first(tmp_path):
    # Inductor's decomposition table, built at its first import, lists the op's export kernel; without the
    # fallback allowance torch.compile fails with "both a fallback and a decomp for same op". A fresh process
    # gives the order a user script has: dilateformer first, an eager call, inductor at the first compile.
    script = """
        import sys
        import torch
        from dilateformer.nn import MultiScaleDilatedAttention
        assert "torch._inductor.decomposition" not in sys.modules
        model = MultiScaleDilatedAttention(24, 3, layout="nchw").eval()
        x = torch.randn(1, 24, 12, 12)
        with torch.inference_mode():
            expected = model(x)  # an eager call first, as benchmarks make
        with torch.no_grad():
            out = torch.compile(model, fullgraph=True)(x)
            from torch._inductor.decomposition import decompositions
            assert torch.ops.dilateformer.msda_forward.default in decompositions  # the order that used to fail
            print(float((out - expected).abs().max()))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        # No inductor cache: a cached graph skips the lowering that used to fail.
        env={
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5
