"""benchmarks/gpu_check.py --dry-run: the whole GPU check runs on CPU, in Triton's interpreter, on tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the GPU check measures the triton backend")

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DILATEFORMER_BACKEND": "auto"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import SECTIONS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert list(report["sections"]) == list(SECTIONS), result.stderr[-3000:]
    assert report["dry_run"] is True
    for name, section in report["sections"].items():
        assert section["rows"] or section["error"], name  # measured something, or says why not
    # The op's own sections must work in the dry run; the model sections depend on the rest of the package.
    for name in ("tests", "op", "first_call", "op_compiled"):
        assert report["sections"][name]["ok"], (name, report["sections"][name]["error"])
    op_rows = report["sections"]["op"]["rows"]
    assert {row["impl"] for row in op_rows} == {"triton", "unfold", "sdpa-global"}
    assert all(row["forward_ms"] > 0 and row["forward_backward_gbps"] > 0 for row in op_rows)
    assert (tmp_path / "gpu_check.md").read_text().count("## ") == len(SECTIONS)
