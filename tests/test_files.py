"""The atomic writer: a failed write leaves the previous file intact and no temp behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dilateformer.files import atomic_path, atomic_write, atomic_write_json, commit, write_temp

ROOT = Path(__file__).resolve().parents[1]


def test_json_round_trip_and_no_temp_left(tmp_path: Path) -> None:
    payload = {"a": [1, 2.5, None], "b": {"c": "ü"}}
    path = atomic_write_json(tmp_path / "sub" / "out.json", payload)
    assert json.loads(path.read_text()) == payload and path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_bytes_and_str_and_bad_type(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, "é")
    assert path.read_bytes() == "é".encode()
    with pytest.raises(TypeError, match="data must be bytes or str"):
        atomic_write(path, 3)  # type: ignore[arg-type]


def test_unencodable_json_leaves_the_previous_file(tmp_path: Path) -> None:
    path = atomic_write_json(tmp_path / "out.json", {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1} and len(list(tmp_path.iterdir())) == 1


def test_writer_that_fails_midway_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError, match="midway"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("midway")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.bin"]
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_write_temp_then_commit_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    umask = os.umask(0o022)
    try:
        tmp = write_temp(path, lambda p: p.write_bytes(b"x"), tmp=tmp_path / "t.bin.tmp")
    finally:
        os.umask(umask)
    assert tmp.read_bytes() == b"x" and not path.exists()
    commit(tmp, path)
    assert path.read_bytes() == b"x" and not tmp.exists() and path.stat().st_mode & 0o777 == 0o644


def test_file_size_limit_fails_the_write_and_keeps_the_previous_file(tmp_path: Path) -> None:
    """A real failing write: past RLIMIT_FSIZE the kernel refuses with EFBIG, as a full disk does with ENOSPC."""
    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    script = textwrap.dedent(
        f"""
        import importlib.util, resource, signal
        # Load the module alone: importing the package would pull in torch and cost seconds.
        spec = importlib.util.spec_from_file_location("files", {str(ROOT / "dilateformer" / "files.py")!r})
        files = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(files)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
        try:
            files.atomic_write({str(path)!r}, b"n" * 100_000)
        except OSError as error:
            print("errno", error.errno)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["errno", str(errno.EFBIG)]
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["big.bin"]
