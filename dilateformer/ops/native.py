"""The native CPU backend: a one-pass C kernel per direction (csrc/msda_cpu.c), built at first use.

The C file needs no PyTorch headers. Building it (specialised for common head widths, float32 and float64) takes
about 12 s with gcc on 2 cores, once per machine: the shared library is cached under ``$DILATEFORMER_CACHE_DIR``
(default ``~/.cache/dilateformer``), keyed by a hash of the source and flags, and written atomically so concurrent
processes never load a half-written file.
Calls go through ctypes, which releases the GIL, and are split over ``torch.get_num_threads()`` threads. Where
PyTorch's intra-op threads are GNU OpenMP (the Linux wheels), the library is built with ``-fopenmp`` and splits the
work over an OpenMP team itself: it then resolves to the libgomp that PyTorch already loaded and reuses its warm
threads. Python threads would instead compete with OpenMP workers that spin for a while after every parallel ATen
op, which made the kernels 1.5-2x slower inside a model than alone. Elsewhere a Python thread pool splits the work.

Output buffers of several MB are fresh pages that fault on their first write (glibc maps every buffer over 32 MB
anew and unmaps it on free). The kernels' outputs are advised into transparent huge pages where the kernel allows it
(512x fewer faults). :func:`keep_large_buffers_mapped` (or ``DILATEFORMER_KEEP_BUFFERS=1``) is the process-wide
opt-in that removes the faults altogether.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from dilateformer.ops.eager import compute_dtype
from dilateformer.ops.neighborhood import window_table

_SOURCES = Path(__file__).with_name("csrc")
_SOURCE = _SOURCES / "msda_cpu.c"
_UNIT = (
    '#define SCALAR float\n#define SUFFIX _f32\n#define WITH_BLOCKS\n#include "{src}"\n'
    "#undef SCALAR\n#undef SUFFIX\n#undef WITH_BLOCKS\n"
    '#define SCALAR double\n#define SUFFIX _f64\n#include "{src}"\n'
)
# Tuned for this CPU (AVX2 + FMA enable the 8-query block kernels), then a portable fallback.
NATIVE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-std=c11", "-fPIC", "-shared")
PORTABLE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared")
OPENMP_FLAGS = (*NATIVE_FLAGS, "-fopenmp")
_SUFFIX = {torch.float32: "_f32", torch.float64: "_f64"}


class _Problem(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("batch", "height", "width", "heads", "head_dim", "kernel_size")),
        ("groups", ctypes.c_int64),
        ("q_stride", ctypes.c_int64),
        ("k_stride", ctypes.c_int64),
        ("v_stride", ctypes.c_int64),
        ("rows", ctypes.c_void_p),
        ("cols", ctypes.c_void_p),
        ("dilations", ctypes.c_void_p),
        ("row_valid", ctypes.c_void_p),
        ("col_valid", ctypes.c_void_p),
        ("scale", ctypes.c_double),
        ("zero_border", ctypes.c_int64),
        ("prob_rows", ctypes.c_int64),
    ]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("DILATEFORMER_CACHE_DIR") or Path.home() / ".cache" / "dilateformer"
    return Path(root) / "native"


_build_lock = threading.Lock()


def _torch_uses_libgomp() -> bool:
    """Whether PyTorch's intra-op threads come from a GNU OpenMP (libgomp) that is already loaded."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


_KEEP_BUFFERS_ENV = "DILATEFORMER_KEEP_BUFFERS"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BYTES = 2**30
_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE_PAGE = 2 * 2**20
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def keep_large_buffers_mapped() -> bool:
    """Opt-in, process-wide: let glibc malloc serve buffers up to 1 GiB from its heap and keep up to 1 GiB of freed
    heap mapped, instead of mapping every buffer over 32 MB anew and unmapping it on free.

    Each call of an op then reuses pages that are already mapped, where it would otherwise page-fault all of its
    outputs again (about 24 ms per 75 MB tensor, every call at 512x512, for any PyTorch CPU op, not only MSDA).
    The price: the process keeps up to 1 GiB of freed memory instead of returning it to the system, and every
    allocation in the process is affected, which is why this is never done implicitly. Setting the environment
    variable ``DILATEFORMER_KEEP_BUFFERS=1`` calls it when the native kernels are first loaded; glibc's own
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables do the same from process start. Returns whether
    the settings were applied: False where the C library is not glibc.
    """
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def _prefer_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Advise the whole 2 MB pages inside ``t``'s (not yet written) buffer to be transparent huge pages: a fresh
    buffer then faults once per 2 MB instead of once per 4 KB. Only this buffer is affected; memory that is already
    mapped, a system with THP off, or a failed advice change nothing but speed."""
    nbytes = t.numel() * t.element_size()
    if _libc is None or nbytes < 2 * _HUGE_PAGE:
        return t
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    length = (t.data_ptr() + nbytes - start) // _HUGE_PAGE * _HUGE_PAGE
    if length > 0:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), ctypes.c_int(_MADV_HUGEPAGE))
    return t


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    return _prefer_huge_pages(torch.empty(shape, dtype=dtype))


@functools.cache
def load_library() -> ctypes.CDLL:
    """Build (once per machine) and load the kernel library. Raises RuntimeError if no C compiler works."""
    if os.environ.get(_KEEP_BUFFERS_ENV) == "1":
        keep_large_buffers_mapped()
    shared_threads = (OPENMP_FLAGS,) if _torch_uses_libgomp() else ()
    return build_library((*shared_threads, NATIVE_FLAGS, PORTABLE_FLAGS))


def build_library(flag_sets: tuple[tuple[str, ...], ...]) -> ctypes.CDLL:
    """Build (or reuse from the cache) and load the kernels with the first of ``flag_sets`` that compiles."""
    compiler = _COMPILER
    if compiler is None:
        raise RuntimeError("the native backend needs a C compiler (cc, gcc or clang) on PATH")
    source = b"".join(path.read_bytes() for path in sorted(_SOURCES.iterdir()) if path.suffix in (".c", ".h"))
    errors = []
    with _build_lock:
        for flags in flag_sets:
            key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
            target = _cache_dir() / f"msda_cpu_{key}.so"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    unit = Path(tmp) / "unit.c"
                    unit.write_text(_UNIT.format(src=_SOURCE.as_posix()))
                    built = Path(tmp) / target.name
                    result = subprocess.run(
                        [compiler, *flags, str(unit), "-o", str(built), "-lm"], capture_output=True, text=True
                    )
                    if result.returncode != 0:
                        errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-2000:]}")
                        continue
                    os.replace(built, target)
            return _declare(ctypes.CDLL(str(target)))
    raise RuntimeError("could not build the native MSDA kernels:\n" + "\n".join(errors))


# Entry point -> (pointer arguments, trailing int64 arguments). Each also has a "_parallel" twin whose two trailing
# ints are (total, threads) instead of (begin, end).
_SIGNATURES = {
    "msda_forward": (5, 2),
    "msda_backward_queries": (9, 2),
    "msda_backward_keys_scatter": (6, 2),
    "msda_backward_zero_fused": (9, 3),
}


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    # Without argtypes ctypes would pass the int64 ranges as 32-bit ints.
    for suffix in _SUFFIX.values():
        for flag in ("msda_has_blocks", "msda_has_openmp"):
            getattr(lib, flag + suffix).restype = ctypes.c_int
        for name, (pointers, ints) in _SIGNATURES.items():
            for variant in ("", "_parallel"):
                fn = getattr(lib, name + variant + suffix)
                fn.argtypes = [ctypes.POINTER(_Problem), *[ctypes.c_void_p] * pointers, *[ctypes.c_int64] * ints]
                fn.restype = None
    return lib


# Probed once at import: a PATH lookup per call would also break torch.compile tracing of the caller.
_COMPILER = _compiler()


_load_error: str | None = None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the native kernels cannot run here, or None. Outside torch.compile tracing, the first call builds the
    library, so a failed build (no writable cache, a broken compiler) is reported here rather than mid-forward."""
    global _load_error
    if device.type != "cpu":
        return f"the native backend runs on CPU tensors only, got device type {device.type!r}"
    if _COMPILER is None:
        return "the native backend needs a C compiler (cc, gcc or clang) on PATH"
    if _load_error is None and not torch.compiler.is_compiling():
        try:
            load_library()
        except (RuntimeError, OSError) as error:
            _load_error = str(error)
    return _load_error


@functools.cache
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dilateformer-msda")


# A forked child inherits the pool object but not its threads: start a fresh pool there.
os.register_at_fork(after_in_child=_pool.cache_clear)


@functools.cache
def _splits_work_itself(lib: ctypes.CDLL) -> bool:
    """Whether ``lib`` was built with OpenMP (its ``*_parallel`` entry points split the work)."""
    return bool(lib.msda_has_openmp_f32())


def _parallel(lib: ctypes.CDLL, name: str, dtype: torch.dtype, args: tuple, total: int) -> None:
    """Run the entry point ``name(*args, begin, end)`` for ``dtype`` over [0, total), split across torch's intra-op
    thread count: by the library's OpenMP team where it has one, else by a Python thread pool."""
    workers = max(1, min(torch.get_num_threads(), total))
    suffix = _SUFFIX[dtype]
    if workers > 1 and _splits_work_itself(lib):
        getattr(lib, name + "_parallel" + suffix)(*args, total, workers)
        return
    fn = getattr(lib, name + suffix)
    if workers == 1:
        fn(*args, 0, total)
        return
    bounds = [total * i // workers for i in range(workers + 1)]
    futures = [_pool(workers).submit(fn, *args, lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    for future in futures:
        future.result()


def _pixel_stride(t: torch.Tensor) -> int | None:
    """Elements between consecutive pixels if (heads, head_dim) are dense and pixels evenly spaced, else None."""
    batch, height, width, heads, head_dim = t.shape
    if t.stride(4) != 1 or t.stride(3) != head_dim:
        return None
    pixel = t.stride(2)
    if (height > 1 and t.stride(1) != width * pixel) or (batch > 1 and t.stride(0) != height * width * pixel):
        return None
    return pixel if width > 1 or height > 1 or batch > 1 else heads * head_dim


def _kernel_input(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    t = t.to(dtype)
    stride = _pixel_stride(t)
    if stride is None:
        t = t.contiguous()
        stride = t.shape[3] * t.shape[4]
    return t, stride


@functools.lru_cache(maxsize=64)
def _window_tables(
    height: int, width: int, kernel_size: int, dilations: tuple[int, ...], border: str
) -> tuple[torch.Tensor, ...]:
    """The kernels' per-group window tables (rows, row_valid, cols, col_valid, dilations) for one image size.

    Stacking them costs about 60 us per call, a few percent of a stage-1 forward, so they are built once per
    configuration; the kernels only read them, through their data pointers.
    """
    rows = [window_table(height, kernel_size, d, border) for d in dilations]
    cols = [window_table(width, kernel_size, d, border) for d in dilations]
    return (
        torch.stack([r for r, _ in rows]).contiguous(),
        torch.stack([v for _, v in rows]).to(torch.uint8).contiguous(),
        torch.stack([c for c, _ in cols]).contiguous(),
        torch.stack([v for _, v in cols]).to(torch.uint8).contiguous(),
        torch.tensor(dilations, dtype=torch.int64),
    )


class _Tables:
    """The ctypes problem description of one call, holding its (cached) window tables alive while it runs."""

    def __init__(self, q, strides, kernel_size, dilations, scale, border):
        batch, height, width, heads, head_dim = q.shape
        self.tables = rows, row_valid, cols, col_valid, dilation_table = _window_tables(
            height, width, kernel_size, tuple(dilations), border
        )
        self.problem = _Problem(
            batch, height, width, heads, head_dim, kernel_size, len(dilations), *strides,
            rows.data_ptr(), cols.data_ptr(), dilation_table.data_ptr(),
            row_valid.data_ptr(), col_valid.data_ptr(), scale, int(border == "zero"), batch * height,
        )  # fmt: skip


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def msda_native_forward(q, k, v, kernel_size, dilations, scale, border):
    lib, dtype = load_library(), compute_dtype(q.dtype)
    (q, qs), (k, ks), (v, vs) = (_kernel_input(t, dtype) for t in (q, k, v))
    tables = _Tables(q, (qs, ks, vs), kernel_size, dilations, scale, border)
    out = _empty(q.shape, dtype)
    lse = torch.empty(q.shape[:-1], dtype=dtype)
    args = (ctypes.byref(tables.problem), _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse))
    _parallel(lib, "msda_forward", dtype, args, q.shape[0] * q.shape[1])
    return out, lse


def msda_native_backward(grad_out, q, k, v, out, lse, kernel_size, dilations, scale, border):
    lib, dtype = load_library(), compute_dtype(q.dtype)
    (q, qs), (k, ks), (v, vs) = (_kernel_input(t, dtype) for t in (q, k, v))
    grad_out, out, lse = (t.to(dtype).contiguous() for t in (grad_out, out, lse))
    tables = _Tables(q, (qs, ks, vs), kernel_size, dilations, scale, border)
    problem = ctypes.byref(tables.problem)
    batch, height, width, heads = q.shape[:4]
    if border == "zero":
        # One sweep per (image, stripe) with a small ring of probabilities instead of two passes over full-size
        # buffers; images are cut into stripes only when there are fewer images than threads.
        workers = max(1, torch.get_num_threads())
        stripes = max(1, min(height, -(-workers // max(batch, 1))))
        grads = [_empty(q.shape, dtype) for _ in range(3)]
        args = (problem, *map(_ptr, (grad_out, q, k, v, out, lse, *grads)), ctypes.c_int64(stripes))
        _parallel(lib, "msda_backward_zero_fused", dtype, args, batch * stripes)
        return tuple(grads)
    probs = torch.empty(batch * height * width * heads * kernel_size**2, dtype=dtype)
    dlogits = torch.empty_like(probs)
    grad_q = _empty(q.shape, dtype)
    # Border "clamp": several queries can share a key in one slot, so the key pass scatters, one (batch, head) pair
    # per task, from full-size buffers of probabilities and logit gradients.
    grad_k, grad_v = torch.zeros(q.shape, dtype=dtype), torch.zeros(q.shape, dtype=dtype)
    query_args = (problem, *map(_ptr, (grad_out, q, k, v, out, lse, grad_q, probs, dlogits)))
    _parallel(lib, "msda_backward_queries", dtype, query_args, batch * height)
    key_args = (problem, *map(_ptr, (grad_out, q, probs, dlogits, grad_k, grad_v)))
    _parallel(lib, "msda_backward_keys_scatter", dtype, key_args, batch * heads)
    return grad_q, grad_k, grad_v
