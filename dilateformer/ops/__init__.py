"""MSDA backends, one table of them in :mod:`dilateformer.ops.backends` (:data:`BACKENDS`):

- ``reference`` (``reference.py``): the explicit k x k neighbourhood gather, differentiated by autograd. The oracle.
- ``eager`` (``eager.py``): shifted views with a hand-derived backward; plain PyTorch ops, no compiler.
- ``native`` (``native.py``): one-pass C kernels for CPU tensors, built once per machine at first use (about 12 s).
- ``compiled`` (``compiled.py``): the eager kernels fused by torch.compile (C++ on CPU, Triton on CUDA).
- ``triton`` (``triton/``): hand-written Triton kernels for CUDA tensors; float32, float16 and bfloat16 only.

Each entry holds the forward and backward kernels that the op of ``library.py`` runs when its ``impl`` argument
names it (``reference`` has none: it runs outside the op), and a ``can_run(device, dtype)`` check that says why
it cannot run. ``context.py`` picks one: ``auto`` takes the first of ``AUTO_ORDER`` whose check passes.
"""

from __future__ import annotations

from dilateformer.ops import flops  # noqa: F401  (registers the FLOP formulas whenever dilateformer is imported)
from dilateformer.ops.backends import BACKENDS, Backend

__all__ = ["BACKENDS", "Backend"]
