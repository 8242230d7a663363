"""Test-wide settings.

Tests run MSDA with ``backend="auto"`` (the native C kernel on CPU) unless they name a backend; the compiled
backend, which spends seconds compiling per configuration, is exercised by the tests marked ``slow`` in tests/ops.
"""
