"""The native backend's float32 paths: 8-query block kernels (AVX2 builds, head_dim % 8 == 0), the per-query
kernels, the one-sweep backward over (image, stripe) units, the two-pass clamp backward, and a portable build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dilateformer.functional import multi_scale_dilated_attention as msda
from dilateformer.ops import native
from tests.ops.helpers import forward_backward, random_qkv


def float32_problem(shape, kernel_size, dilations, border, seed, scale=None):
    """Native float32 forward and gradients next to the float64 reference's."""
    q, k, v = random_qkv(shape, seed=seed)
    options = dict(kernel_size=kernel_size, dilations=dilations, border=border, scale=scale)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    expected = forward_backward(lambda *t: msda(*t, **options, backend="reference"), q, k, v, grad_out)
    got = forward_backward(lambda *t: msda(*t, **options, backend="native"), q32, k32, v32, grad_out.float())
    return got, expected


def assert_float32_close(got, expected):
    """Within 1e-5 relative, measured against each tensor's largest magnitude: gradients are sums of up to k*k
    float32 terms, so an element near zero can carry the rounding of its larger neighbours."""
    (out, grads), (out_ref, grads_ref) = got, expected
    for a, b in zip((out, *grads), (out_ref, *grads_ref), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * max(b.abs().max().item(), 1e-3))


@st.composite
def block_problems(draw):
    groups = draw(st.integers(1, 3))
    return dict(
        shape=(
            draw(st.integers(1, 3)),
            draw(st.integers(1, 20)),
            draw(st.integers(1, 20)),  # widths that are not a multiple of 8 leave a partial block
            groups * draw(st.integers(1, 2)),
            draw(st.sampled_from([8, 16, 24, 40, 3])),  # 40 runs with a runtime width, 3 the per-query kernels
        ),
        kernel_size=draw(st.sampled_from([1, 3, 5, 7])),
        dilations=tuple(draw(st.integers(1, 4)) for _ in range(groups)),
        border=draw(st.sampled_from(["zero", "clamp"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=block_problems())
def test_float32_kernels_agree_with_the_float64_reference(problem):
    assert_float32_close(*float32_problem(**problem))


def test_this_build_runs_the_block_kernels_exactly_where_the_cpu_has_avx2_and_fma():
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    assert native.load_library().msda_has_blocks_f32() == int({"avx2", "fma"} <= flags)


def test_openmp_builds_share_pytorchs_libgomp():
    # Splitting work over OpenMP only helps if the kernels join PyTorch's own thread team: one libgomp in the
    # process, and the OpenMP build chosen exactly where PyTorch's threads are libgomp's.
    lib = native.load_library()
    openmp_builds = native._torch_uses_libgomp()
    if openmp_builds:
        try:  # cached: the same flags as load_library's first choice
            native.build_library((native.OPENMP_FLAGS,))
        except RuntimeError:  # a compiler without libgomp: the plain native build is the right fallback
            openmp_builds = False
    assert lib.msda_has_openmp_f32() == int(openmp_builds)
    maps = Path("/proc/self/maps")
    if maps.exists():
        libgomps = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
        assert len(libgomps) <= 1, libgomps


@pytest.mark.parametrize("border", ["zero", "clamp"])
def test_backward_is_the_same_however_the_work_is_split(border, monkeypatch):
    # Border "zero" sweeps (image, stripe) units: one stripe per image with 1 thread, 2 with 4 threads and 2 images,
    # one row per stripe (thinner than the window's reach of 3) with 64. Border "clamp" splits rows and heads.
    shape = (2, 23, 19, 6, 24)
    results = {}
    for threads in (1, 4, 64):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        results[threads] = float32_problem(shape, 3, (1, 2, 3), border, seed=5)
        assert_float32_close(*results[threads])
    for threads in (4, 64):
        for a, b in zip(results[1][0][1], results[threads][0][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("width", "kernel_size", "dilations", "threads"),
    [
        (256, 3, (1, 2, 3), 1),  # two tiles of 128 columns
        (397, 3, (1, 4), 2),  # three tiles, the last ending past a whole block; two stripes
        (269, 3, (2, 150), 1),  # a reach wider than a tile: the halos span the whole row
        (300, 5, (1, 3), 1),  # a kernel size the key pass runs with a runtime window
    ],
)
def test_wide_images_sweep_the_zero_border_backward_in_width_tiles(width, kernel_size, dilations, threads, monkeypatch):
    # From 256 columns (twice msda_cpu.c's TILE_COLUMNS) the one-sweep backward runs tile by tile, each tile's query
    # pass also covering the reach beyond its edges; tile edges must not show in the gradients.
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    shape = (1, 7, width, 2 * len(dilations), 8)
    assert_float32_close(*float32_problem(shape, kernel_size, dilations, "zero", seed=11))


def test_softmax_survives_huge_and_tiny_logits_in_float32():
    # The block kernels' own exp/log: logits of +-1e4 must neither overflow nor lose the winning key.
    q, k, v = (t.float() for t in random_qkv((1, 9, 17, 3, 8), requires_grad=False))
    q, k = q * 100, k * 100
    out = msda(q, k, v, scale=1.0, backend="native")
    expected = msda(q.double(), k.double(), v.double(), scale=1.0, backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_nan_propagates_through_the_block_kernels():
    q, k, v = (t.float() for t in random_qkv((1, 6, 11, 3, 16), requires_grad=False))
    q[0, 2, 5, 1, 3] = float("nan")
    out = msda(q, k, v, backend="native")
    assert out[0, 2, 5, 1].isnan().all()
    assert not out[0, 2, 5, 0].isnan().any()


def test_portable_build_matches_the_tuned_build(monkeypatch):
    # The fallback flags (no -march=native) compile the per-query kernels only; they must agree with the reference.
    portable = native.build_library((native.PORTABLE_FLAGS,))
    assert portable.msda_has_blocks_f32() == 0
    monkeypatch.setattr(native, "load_library", lambda: portable)
    for border in ("zero", "clamp"):
        assert_float32_close(*float32_problem((2, 9, 10, 3, 8), 3, (1, 2, 3), border, seed=3))


def test_huge_page_advice_stays_inside_the_buffer(monkeypatch):
    # madvise works on whole pages: advising past either end would change memory that belongs to someone else.
    calls = []

    class FakeLibc:
        def madvise(self, start, length, advice):
            calls.append((start.value, length.value, advice.value))
            return 0

    monkeypatch.setattr(native, "_libc", FakeLibc())
    small = torch.empty(1000)
    assert native._prefer_huge_pages(small) is small and not calls
    t = torch.empty(3 * 2**20 + 123)  # 12.5 MB: at least five whole 2 MB pages inside, wherever it starts
    assert native._prefer_huge_pages(t) is t
    ((start, length, advice),) = calls
    end = t.data_ptr() + t.numel() * t.element_size()
    assert advice == native._MADV_HUGEPAGE
    assert start % native._HUGE_PAGE == 0 and length % native._HUGE_PAGE == 0 and length >= 5 * native._HUGE_PAGE
    assert t.data_ptr() <= start and start + length <= end and end - (start + length) < native._HUGE_PAGE


_REFAULTS = r"""
import resource, sys, torch
import dilateformer.ops.native as native
native.load_library()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, above glibc's largest dynamic mmap threshold
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))  # small allocations may split the first freed chunk: steady state from the third on
"""


def test_keeping_large_buffers_mapped_is_an_explicit_opt_in():
    # A repeated 64 MB buffer faults all its pages again by default (glibc unmapped the last); with the opt-in the
    # freed heap is reused. Importing and loading the kernels alone must not change the process's allocator.
    root = Path(__file__).resolve().parents[2]

    def refaults(**env):
        environ = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", **env}
        environ.pop("DILATEFORMER_KEEP_BUFFERS", None)
        environ.update(env)
        run = subprocess.run([sys.executable, "-c", _REFAULTS], env=environ, capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    pages = 64 * 2**20 // 4096
    assert refaults() > pages // 2
    assert refaults(DILATEFORMER_KEEP_BUFFERS="1") < pages // 20
