"""The MSDA op against the official code's float64 output and against the reference backend."""

from __future__ import annotations

import functools

import pytest
import torch

import dilateformer
from dilateformer.functional import multi_scale_dilated_attention as msda
from tests.ops.helpers import (
    COMPILED_SHAPES,
    assert_backend_matches_reference,
    forward_backward,
    official_cases,
    random_qkv,
)

FAST_BACKENDS = ["reference", "eager", "native"]
CASES = official_cases()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_official_code_forward_and_gradients(case, backend):
    q, k, v = (case[n].clone().requires_grad_() for n in "qkv")
    fn = functools.partial(msda, kernel_size=case["kernel_size"], dilations=(case["dilation"],), backend=backend)
    out, grads = forward_backward(fn, q, k, v, case["grad_out"])
    torch.testing.assert_close(out, case["out"], rtol=0, atol=1e-9)
    for grad, name in zip(grads, "qkv", strict=True):
        torch.testing.assert_close(grad, case[f"grad_{name}"], rtol=0, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("border", ["zero", "clamp"])
def test_compiled_backend_matches_reference_in_float64(border, static_compiled_shapes):
    for seed, shape in enumerate(COMPILED_SHAPES):
        problem = dict(shape=shape, seed=seed, kernel_size=3, dilations=(1, 3), border=border)
        assert_backend_matches_reference(problem, "compiled")


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("border", ["zero", "clamp"])
@pytest.mark.parametrize("kernel_size,dilations", [(1, (1,)), (3, (1, 2, 3)), (5, (2, 4)), (7, (1,))])
def test_backend_matches_reference_in_float64(backend, border, kernel_size, dilations):
    problem = dict(shape=(2, 11, 6, 6, 5), seed=0, kernel_size=kernel_size, dilations=dilations, border=border)
    assert_backend_matches_reference(problem, backend)


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("border", ["zero", "clamp"])
def test_gradcheck(backend, border):
    q, k, v = random_qkv((1, 4, 5, 2, 3))
    fn = functools.partial(msda, kernel_size=3, dilations=(1, 2), border=border, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.slow
def test_gradcheck_compiled(static_compiled_shapes):
    # Same configuration and size as the float64 test above, so the compiled kernels are reused.
    q, k, v = random_qkv(COMPILED_SHAPES[0])
    fn = functools.partial(msda, kernel_size=3, dilations=(1, 3), backend="compiled")
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float32_within_1e5_relative_of_float64(backend):
    q, k, v = random_qkv((2, 10, 9, 6, 8), requires_grad=False)
    expected = msda(q, k, v, backend="reference")
    got = msda(q.float(), k.float(), v.float(), backend=backend)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision_has_no_overflow_for_huge_logits(dtype, backend):
    # logits of about +-1e4: an fp16 softmax without fp32 accumulation would overflow to inf/nan
    q, k, v = random_qkv((1, 6, 6, 3, 4), requires_grad=False)
    q = (q * 100).to(dtype).requires_grad_()
    k = (k * 100).to(dtype).requires_grad_()
    v = v.to(dtype).requires_grad_()
    out = msda(q, k, v, scale=1.0, backend=backend)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    expected = msda(q.double(), k.double(), v.double(), scale=1.0, backend="reference")
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=3e-2)


def test_autocast_bfloat16_layer_runs_in_fp32_accumulation():
    layer = dilateformer.nn.MultiScaleDilatedAttention(24, 3, backend="eager")
    x = torch.randn(2, 24, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_empty_batch_returns_empty_result(backend):
    q, k, v = random_qkv((0, 5, 5, 3, 4))
    out = msda(q, k, v, backend=backend)
    assert out.shape == (0, 5, 5, 3, 4)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_nan_propagates_without_crashing(backend):
    q, k, v = random_qkv((1, 5, 5, 3, 4), requires_grad=False)
    q[0, 2, 2, 0, 0] = float("nan")
    out = msda(q, k, v, backend=backend)
    assert torch.isnan(out[0, 2, 2, 0]).all()
    assert torch.isfinite(out[0, 0, 0]).all()


def test_one_pixel_image_with_zero_border_attends_to_itself_and_zeros():
    q, k, v = random_qkv((2, 1, 1, 3, 4), requires_grad=False)
    out = msda(q, k, v, kernel_size=3, dilations=(1,), backend="eager")
    logit = (q * k).sum(-1, keepdim=True) * 4**-0.5
    weight = logit.exp() / (logit.exp() + 8)  # the eight zero keys have logit 0
    torch.testing.assert_close(out, weight * v)


def test_native_accepts_strided_qkv_views_of_a_fused_projection():
    qkv = torch.randn(2, 7, 9, 3, 6, 4, dtype=torch.float64)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    expected = msda(q.contiguous(), k.contiguous(), v.contiguous(), backend="reference")
    torch.testing.assert_close(msda(q, k, v, backend="native"), expected, rtol=0, atol=1e-12)


def test_auto_picks_the_native_kernel_on_cpu(monkeypatch):
    from dilateformer.ops.context import select_backend

    monkeypatch.delenv("DILATEFORMER_BACKEND", raising=False)
    assert select_backend("auto", torch.device("cpu"), torch.float32) == "native"


def test_clamp_border_on_one_pixel_image_returns_the_value():
    q, k, v = random_qkv((2, 1, 1, 3, 4), requires_grad=False)
    for backend in FAST_BACKENDS:
        torch.testing.assert_close(msda(q, k, v, border="clamp", backend=backend), v)


def test_heads_are_grouped_by_dilation():
    # Each group must see only its own dilation: perturbing a key two pixels away changes only the d=2 group.
    q, k, v = random_qkv((1, 9, 9, 2, 4), requires_grad=False)
    base = msda(q, k, v, kernel_size=3, dilations=(1, 2), backend="eager")
    k2 = k.clone()
    k2[0, 4, 6] += 10.0
    moved = msda(q, k2, v, kernel_size=3, dilations=(1, 2), backend="eager")
    changed = (moved - base).abs()[0, 4, 4]
    assert changed[0].max() == 0  # dilation 1 window of (4, 4) reaches column 5 only
    assert changed[1].max() > 0


def test_use_backend_forces_and_env_var_is_validated(monkeypatch):
    q, k, v = random_qkv((1, 4, 4, 3, 2), requires_grad=False)
    calls = []
    import dilateformer.functional as functional

    original = functional.msda_reference
    monkeypatch.setattr(functional, "msda_reference", lambda *a: calls.append(1) or original(*a))
    with dilateformer.use_backend("reference"):
        msda(q, k, v)
    assert calls == [1]
    monkeypatch.setenv("DILATEFORMER_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DILATEFORMER_BACKEND"):
        msda(q, k, v)


def test_forcing_an_unavailable_backend_says_why(monkeypatch):
    from dilateformer.ops import compiled

    monkeypatch.setitem(compiled._UNAVAILABLE_REASONS, "cpu", "no C++ compiler on PATH")
    q, k, v = random_qkv((1, 4, 4, 3, 2), requires_grad=False)
    with pytest.raises(ValueError, match="'compiled' is not available on cpu: no C\\+\\+ compiler"):
        msda(q, k, v, backend="compiled")
    monkeypatch.setenv("DILATEFORMER_BACKEND", "auto")
    assert msda(q, k, v).shape == q.shape  # auto falls back to a backend that can run


GOOD = torch.zeros(1, 4, 4, 3, 2)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(k=torch.zeros(1, 4, 5, 3, 2)), ValueError, "k must have q's shape"),
        (dict(v=torch.zeros(1, 4, 4, 3, 2, dtype=torch.float64)), ValueError, "v must have q's dtype"),
        (dict(v=torch.zeros(1, 4, 4, 3, 2, device="meta")), ValueError, "v must be on q's device"),
        (
            dict(q=torch.zeros(4, 4, 3, 2), k=torch.zeros(4, 4, 3, 2), v=torch.zeros(4, 4, 3, 2)),
            ValueError,
            "5-D",
        ),
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
        (dict(dilations=(1, 2)), ValueError, "cannot be split into 2 equal dilation groups"),
        (dict(kernel_size=4), ValueError, "kernel_size must be an odd int >= 1, got 4"),
        (dict(kernel_size=0), ValueError, "kernel_size must be an odd int >= 1, got 0"),
        (dict(kernel_size=3.0), ValueError, "kernel_size must be an odd int"),
        (dict(dilations=(1, 0, 2)), ValueError, "every dilation must be >= 1, got 0"),
        (dict(dilations=(1, 2.0, 3)), TypeError, "every dilation must be an int, got 2.0"),
        (dict(dilations=()), ValueError, "dilations must name at least one"),
        (dict(dilations="123"), TypeError, "dilations must be a sequence of ints"),
        (
            dict(q=GOOD.long(), k=GOOD.long(), v=GOOD.long()),
            TypeError,
            "q, k and v must be floating point, got torch.int64",
        ),
        (dict(q=GOOD.bool(), k=GOOD.bool(), v=GOOD.bool()), TypeError, "floating point, got torch.bool"),
        (dict(border="reflect"), ValueError, "border must be one of \\('zero', 'clamp'\\), got 'reflect'"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(scale="big"), TypeError, "scale must be a float or None"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, error, match):
    args = dict(q=GOOD, k=GOOD, v=GOOD)
    args.update({n: kwargs.pop(n) for n in "qkv" if n in kwargs})
    with pytest.raises(error, match=match):
        msda(args["q"], args["k"], args["v"], **kwargs)


def test_auto_falls_back_to_eager_when_the_native_build_fails(monkeypatch):
    from dilateformer.ops import native
    from dilateformer.ops.context import select_backend

    monkeypatch.delenv("DILATEFORMER_BACKEND", raising=False)
    monkeypatch.setattr(native, "_load_error", "could not build the native MSDA kernels: no space left")
    assert select_backend("auto", torch.device("cpu"), torch.float32) == "eager"
    q, k, v = random_qkv((1, 4, 4, 3, 2), requires_grad=False)
    with pytest.raises(ValueError, match="'native' is not available on cpu: could not build"):
        msda(q, k, v, backend="native")
