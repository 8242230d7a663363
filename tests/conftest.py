"""Test-wide settings.

Tests run MSDA with ``backend="auto"`` (the native C kernel on CPU) unless they name a backend; the compiled
backend, which spends seconds compiling per configuration, is exercised by the tests marked ``slow`` in tests/ops.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Without a GPU the triton backend's tests (tests/ops/test_triton.py) run its kernels in Triton's interpreter.
    # Triton reads this when its language module and each kernel are defined, and importing dilateformer already
    # imports triton (through torch), so it is set here, before any test module is imported. Nothing else on a
    # GPU-less machine runs Triton: torch.compile emits C++ for CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
