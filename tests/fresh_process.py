"""Run a script in a fresh Python process that must never import dilateformer: exported files stand alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_CHECK = """
import sys as _sys
_loaded = sorted(m for m in _sys.modules if m.split(".")[0] == "dilateformer")
assert not _loaded, f"the exported artifact imported dilateformer: {_loaded}"
"""


def run_without_dilateformer(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``code`` with ``cwd`` as working directory (not the repository), fail if it errs or imported
    dilateformer, and return its stdout."""
    env = {key: value for key, value in {**os.environ, **(env or {})}.items() if key != "PYTHONPATH"}
    script = textwrap.dedent(code) + _CHECK
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result.stdout
