"""Atomic file writes: a temp file beside the target, flushed and fsynced, then ``os.replace``d over it.

A reader (or a run killed mid-save) sees the old file or the new one, never half of one. This module is the
lowest layer: every other one may import it and it imports none of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["KILL_AFTER_TEMP_ENV", "atomic_path", "atomic_write", "atomic_write_json", "commit", "write_temp"]

# Fault injection for the tests: SIGKILL this process once the temp of the file with this name is complete.
KILL_AFTER_TEMP_ENV = "DILATEFORMER_TEST_KILL_AFTER_TEMP"


def _temp_name(path: Path) -> Path:
    # Unique, so two processes saving the same file never write into each other's temp.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp(path: str | os.PathLike, write: Callable[[Path], object], tmp: str | os.PathLike | None = None) -> Path:
    """Run ``write(tmp)``, fsync the temp and return it, not yet renamed; :func:`commit` renames it.

    For saves that must rename several files together. ``tmp`` defaults to a unique hidden name beside
    ``path``. On any failure the partial temp is removed and the error propagates; ``path`` is untouched.
    """
    path = Path(path)
    tmp = _temp_name(path) if tmp is None else Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # Writers such as safetensors and mkstemp create 0600 files; outputs are meant to be shared.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if os.environ.get(KILL_AFTER_TEMP_ENV) == path.name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    return tmp


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a complete temp over ``path`` and fsync the directory, so the rename itself survives a crash."""
    path = Path(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s new content to; it replaces ``path`` when the block ends.

    For writers that want a file name (``torch.save``, safetensors ``save_file``, ``PIL.Image.save`` with an
    explicit ``format``). If the block raises, the temp is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    commit(write_temp(path, lambda _: None, tmp), path)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (``str`` is UTF-8 encoded) to ``path`` atomically; returns ``path``."""
    if not isinstance(data, bytes | str):
        raise TypeError(f"data must be bytes or str, got {type(data).__name__}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path = Path(path)
    commit(write_temp(path, lambda tmp: tmp.write_bytes(payload)), path)
    return path


def atomic_write_json(path: str | os.PathLike, payload: object, indent: int | None = 2) -> Path:
    """Write ``payload`` as JSON (newline-terminated) atomically, creating missing parent directories.

    The payload is serialised before any file is touched, so one that cannot be encoded leaves ``path`` as it was.
    """
    text = json.dumps(payload, indent=indent) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, text)
