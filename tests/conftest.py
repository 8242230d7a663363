"""Test-wide settings.

The compiled MSDA backend spends tens of seconds compiling per configuration on 2 CPU cores, so tests run the
eager backend unless they ask for another one explicitly; tests/ops covers every backend against the reference.
"""

import os

os.environ.setdefault("DILATEFORMER_BACKEND", "eager")
