"""The triton backend against the float64 reference: forward and all three gradients, both borders.

On a machine with a GPU these run the compiled kernels on CUDA tensors. Without one they run the same kernels in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by tests/conftest.py before anything imports triton),
which is slow: the shapes here are tiny on purpose.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the triton backend needs the triton package")

import dilateformer.ops.triton as triton_backend  # noqa: E402
from dilateformer.functional import multi_scale_dilated_attention as msda  # noqa: E402
from dilateformer.ops.context import select_backend  # noqa: E402
from tests.ops.helpers import random_qkv  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(scope="module", autouse=True)
def triton_kernels():
    """The kernel module: compiled on a GPU, else interpreted (tests/conftest.py sets TRITON_INTERPRET=1 early)."""
    kernels = triton_backend.load_kernels()
    if kernels.INTERPRETED is ON_GPU:
        mode = "interpreted on a machine with" if ON_GPU else "compiled on a machine without"
        pytest.fail(f"the triton kernels are {mode} a GPU: TRITON_INTERPRET=1 belongs to GPU-less machines only")
    return kernels


def assert_relative(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Largest error within ``tolerance`` of the largest magnitude: relative error the way a norm sees it."""
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    error = (got.double().cpu() - expected.double().cpu()).abs().max().item()
    size = expected.abs().max().item()
    assert error <= tolerance * max(size, 1e-30), f"max error {error:.3g} against max magnitude {size:.3g}"


def check_against_reference(shape, kernel_size, dilations, border, dtype=torch.float32, seed=0, tolerance=1e-5):
    """Forward and dq, dk, dv of the triton backend in ``dtype`` against the reference in float64."""
    q64, k64, v64 = random_qkv(shape, seed=seed)
    options = dict(kernel_size=kernel_size, dilations=dilations, border=border)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    # The reference sees the inputs rounded to dtype, so only the kernels' own arithmetic is compared.
    q, k, v = (t.detach().to(dtype).to(DEVICE).requires_grad_() for t in (q64, k64, v64))
    q64, k64, v64 = (t.detach().to(dtype).double().requires_grad_() for t in (q, k, v))
    expected = msda(q64, k64, v64, **options, backend="reference")
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad)
    out = msda(q, k, v, **options, backend="triton")
    assert out.dtype == dtype and out.device.type == DEVICE.type
    grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype).to(DEVICE))
    assert_relative(out, expected, tolerance)
    for got, want in zip(grads, expected_grads, strict=True):
        if want.abs().max() == 0:  # kernel size 1: q and k get no gradient at all
            assert got.abs().max() == 0
        else:
            assert_relative(got, want, tolerance)


# (shape, kernel size, dilations): head dims 1, 24, 32 and 100, kernel sizes 1 to 7, dilations up to 4, images
# smaller than the window and a 1x1 image.
CASES = [
    ((1, 3, 4, 2, 1), 1, (1,)),
    ((2, 5, 6, 2, 24), 3, (1, 2)),
    ((1, 6, 5, 2, 32), 5, (2, 4)),
    ((1, 4, 7, 2, 100), 3, (1, 3)),
    ((1, 5, 4, 2, 3), 7, (1, 2)),
    ((1, 3, 2, 2, 4), 5, (1, 2)),
    ((2, 1, 1, 1, 8), 3, (1,)),
]


@pytest.mark.parametrize("border", ["zero", "clamp"])
@pytest.mark.parametrize("shape,kernel_size,dilations", CASES, ids=[str(c[0]) for c in CASES])
def test_float32_matches_float64_reference(shape, kernel_size, dilations, border):
    check_against_reference(shape, kernel_size, dilations, border)


@pytest.mark.parametrize("border", ["zero", "clamp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(dtype, border):
    check_against_reference((1, 5, 6, 2, 8), 3, (1, 2), border, dtype=dtype, tolerance=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_has_no_overflow_for_huge_logits(dtype):
    q, k, v = random_qkv((1, 4, 5, 2, 4), requires_grad=False)
    q, k, v = (t.to(dtype).to(DEVICE).requires_grad_() for t in (100 * q, 100 * k, v))
    out = msda(q, k, v, dilations=(1, 2), scale=1.0, backend="triton")  # logits of about +-1e4
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    expected = msda(*(t.detach().cpu().double() for t in (q, k, v)), dilations=(1, 2), scale=1.0, backend="reference")
    assert_relative(out, expected, 2e-2)


def test_strided_views_of_a_fused_projection_and_permuted_inputs():
    qkv = torch.randn(2, 4, 5, 3, 2, 8, dtype=torch.float64)
    views = qkv.to(DEVICE, torch.float32).unbind(3)  # shared strides: read in place
    permuted = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in views]  # other strides: copied
    expected = msda(*qkv.unbind(3), dilations=(1, 2), backend="reference")
    for q, k, v in (views, permuted):
        assert not q.is_contiguous()
        assert_relative(msda(q, k, v, dilations=(1, 2), backend="triton"), expected, 1e-5)


def test_empty_batch_and_nan_propagation():
    empty = torch.zeros(0, 3, 3, 2, 4, device=DEVICE)
    out, lse = triton_backend.msda_triton_forward(empty, empty, empty, 3, [1], 0.5, "zero")
    assert out.shape == empty.shape and lse.shape == (0, 3, 3, 2)
    grads = triton_backend.msda_triton_backward(empty, empty, empty, empty, out, lse, 3, [1], 0.5, "zero")
    assert [g.shape for g in grads] == [empty.shape] * 3
    q, k, v = (t.to(DEVICE, torch.float32) for t in random_qkv((1, 5, 5, 1, 4), requires_grad=False))
    q[0, 2, 2, 0, 0] = float("nan")
    out = msda(q, k, v, dilations=(1,), backend="triton")
    assert torch.isnan(out[0, 2, 2]).all()
    assert torch.isfinite(out[0, 0, 0]).all()


SIZES = st.integers(1, 5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    height=SIZES,
    width=SIZES,
    heads_per_group=st.integers(1, 2),
    head_dim=st.integers(1, 4),
    kernel_size=st.sampled_from([1, 3]),
    dilations=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    border=st.sampled_from(["zero", "clamp"]),
    seed=st.integers(0, 2**16),
)
def test_agrees_with_reference_on_random_small_problems(
    batch, height, width, heads_per_group, head_dim, kernel_size, dilations, border, seed
):
    shape = (batch, height, width, heads_per_group * len(dilations), head_dim)
    check_against_reference(shape, kernel_size, tuple(dilations), border, seed=seed)


class _Recorder:
    """Stands in for a kernel: records the arguments of each launch instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _specialization_keys(kernel, launches) -> set[str]:
    """Triton's kernel-cache keys for these launches, computed for an sm_90 GPU as the JIT computes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    if not isinstance(kernel, JITFunction):  # the interpreter's stand-in: rebuild the JIT with the same options
        kernel = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs["do_not_specialize"])
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    keys = set()
    for args, kwargs in launches:
        _, specialization, options = binder(*args, **kwargs)
        keys.add(compute_cache_key({}, specialization, options))
    return keys


def test_new_sizes_reuse_the_compiled_kernels(monkeypatch, triton_kernels):
    names = ("msda_forward_kernel", "msda_backward_queries_kernel", "msda_backward_keys_kernel")
    recorders = {name: _Recorder(getattr(triton_kernels, name)) for name in names}
    for name, recorder in recorders.items():
        monkeypatch.setattr(triton_kernels, name, recorder)

    def launch(shape, kernel_size=3):
        q = torch.zeros(shape, device=DEVICE)
        out, lse = triton_backend.msda_triton_forward(q, q, q, kernel_size, [1, 2], 0.5, "zero")
        triton_backend.msda_triton_backward(q, q, q, q, out, lse, kernel_size, [1, 2], 0.5, "zero")

    # Sizes of 1, multiples of 16 and odd sizes: each would be its own specialisation without do_not_specialize.
    for shape in [(1, 1, 1, 2, 8), (2, 16, 32, 4, 8), (3, 17, 5, 6, 8), (1, 1, 48, 2, 8)]:
        launch(shape)
    for recorder in recorders.values():
        assert len(recorder.launches) == 4
        assert len(_specialization_keys(recorder.kernel, recorder.launches)) == 1
    # A new configuration does compile: the check above can tell keys apart.
    launch((1, 4, 4, 2, 8), kernel_size=5)
    forward = recorders["msda_forward_kernel"]
    assert len(_specialization_keys(forward.kernel, forward.launches)) == 2


@pytest.mark.skipif(not ON_GPU, reason="no GPU: Triton's kernel cache exists only for compiled kernels")
def test_new_sizes_add_no_cache_entries_on_the_gpu(triton_kernels):
    kernel = triton_kernels.msda_forward_kernel
    device = torch.cuda.current_device()

    def entries() -> int:
        return len(kernel.device_caches[device][0])

    q = torch.randn(2, 9, 11, 3, 24, device="cuda")
    msda(q, q, q, backend="triton")
    before = entries()
    for shape in [(1, 1, 1, 3, 24), (4, 32, 16, 3, 24), (3, 17, 33, 6, 24)]:
        q = torch.randn(shape, device="cuda")
        msda(q, q, q, backend="triton")
    assert entries() == before


def test_auto_picks_triton_on_cuda_except_for_float64(monkeypatch):
    monkeypatch.delenv("DILATEFORMER_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert select_backend("auto", cuda, torch.float16) == "triton"
    assert select_backend("auto", cuda, torch.float64) == "compiled"
    assert select_backend("compiled", cuda, torch.float32) == "compiled"
    with pytest.raises(ValueError, match="'triton' runs float32, float16, bfloat16, got torch.float64"):
        select_backend("triton", cuda, torch.float64)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16.*got torch.float64"):
        q = torch.zeros(1, 2, 2, 1, 2, dtype=torch.float64)
        triton_backend.msda_triton_forward(q, q, q, 3, [1], 1.0, "zero")


def test_unavailable_reasons_say_why(monkeypatch):
    monkeypatch.setattr(triton_backend, "interpreted", lambda: False)
    assert "run on CUDA tensors, got device type 'cpu'" in triton_backend.unavailable_reason(torch.device("cpu"))
    assert triton_backend.unavailable_reason(torch.device("cuda")) is None
    monkeypatch.setattr(triton_backend, "_HAS_TRITON", False)
    assert "triton package is not installed" in triton_backend.unavailable_reason(torch.device("cuda"))
    assert select_backend("auto", torch.device("cuda"), torch.float32) == "compiled"
    with pytest.raises(ValueError, match="'triton' is not available on cuda: the triton package"):
        select_backend("triton", torch.device("cuda"), torch.float32)
