"""Checkpoints: safetensors weights plus a training-state file, written atomically, kept as ``last`` and ``best``.

Layout in the output directory:

- ``last.safetensors``: the model weights, with metadata (model name and kwargs, class names, image size, epoch).
- ``last.state.pt``: optimizer, scheduler, EMA weights, epoch, RNG states, metrics history (``torch.save``; loaded
  with ``weights_only=True``).
- ``best.safetensors``: the weights (EMA weights when ``--model-ema``) with the best validation top-1.

Every file is written to a temp name, flushed and fsynced, then ``os.replace``d, so a kill during a save leaves
either the old file or the new one. ``last`` is two files, so both temps are written completely *before* either
is renamed and both carry the same ``generation``; if a kill lands between the two renames, the next load sees
the complete state temp with the new generation and finishes the rename (roll forward).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dilateformer.errors import CommandError
from dilateformer.files import commit, write_temp
from dilateformer.models.convert import load_weights, safetensors_payload, save_weights
from dilateformer.models.convert import read_metadata as _read_metadata

WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"
TMP_SUFFIX = ".tmp"


def _write_atomic_bytes_via(writer, path: Path) -> Path:
    """:func:`dilateformer.files.write_temp` to the fixed temp name :func:`load_last` looks for.

    A failed write (a full disk, a file-size limit) removes the partial temp and raises a one-line
    :class:`CommandError`: the committed file is untouched.
    """
    with _write_errors_are_cli_errors(path):
        return write_temp(path, writer, tmp=path.with_name(path.name + TMP_SUFFIX))


@contextlib.contextmanager
def _write_errors_are_cli_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CommandError(_write_failure(path, error)) from None


def _write_failure(path: Path, error: BaseException) -> str:
    """One line for a failed checkpoint write; torch and safetensors wrap the OS error in C++/Rust text."""
    code = getattr(error, "errno", None)
    text = str(error)
    for candidate in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        if code == candidate or os.strerror(candidate).lower() in text.lower():
            code = candidate
            break
    reason = os.strerror(code) if code else (text.splitlines() or [type(error).__name__])[0][:200]
    try:
        free = f", {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    return (
        f"cannot save {path} ({reason}{free}); the previous checkpoint is intact, nothing partial was left: "
        "free some space (or raise the file-size limit) and resume with --resume"
    )


def save_checkpoint_weights(
    path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> None:
    """:func:`dilateformer.models.save_weights`, with a failed write as a one-line :class:`CommandError`."""
    with _write_errors_are_cli_errors(Path(path)):
        save_weights(state_dict, path, metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`dilateformer.models.read_metadata`, with an unreadable file as a one-line :class:`CommandError`."""
    try:
        return _read_metadata(path)
    except ValueError as error:
        raise CommandError(str(error)) from None


def read_checkpoint_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`dilateformer.models.load_weights`, with an unreadable file as a one-line :class:`CommandError`."""
    try:
        return load_weights(path)
    except ValueError as error:
        raise CommandError(str(error)) from None


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(
    output: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    train_state: dict[str, Any],
) -> None:
    """Write ``last.safetensors`` and ``last.state.pt`` so that a kill at any point leaves a usable pair."""
    output = Path(output)
    weights, state = output / f"last{WEIGHTS_SUFFIX}", output / f"last{STATE_SUFFIX}"
    generation = uuid.uuid4().hex
    tensors, meta = safetensors_payload(model_state, {**metadata, "generation": generation})
    state_obj = {**train_state, "generation": generation}
    tmp_state = _write_atomic_bytes_via(lambda p: torch.save(state_obj, p), state)
    tmp_weights = _write_atomic_bytes_via(lambda p: save_file(tensors, str(p), metadata=meta), weights)
    # Both temps are complete and fsynced from here on; the renames are the commit.
    commit(tmp_weights, weights)
    commit(tmp_state, state)


def _torch_load(path: Path) -> dict[str, Any]:
    import pickle

    from dilateformer.models.convert import unpickling_refusal

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CommandError(f"--resume: {unpickling_refusal(path, error)}") from None
    except Exception as error:  # noqa: BLE001 - any other failure means the same thing to the user
        first = (str(error).splitlines() or [""])[0][:200]
        raise CommandError(f"cannot read training state {path} ({type(error).__name__}: {first})") from None


def find_last(path: str | os.PathLike) -> Path:
    """``--resume`` target -> the ``last.safetensors`` path (accepts the run dir, either file of the pair)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"last{WEIGHTS_SUFFIX}"
    elif path.name.endswith(STATE_SUFFIX):
        path = path.with_name(path.name[: -len(STATE_SUFFIX)] + WEIGHTS_SUFFIX)
    if not path.exists():
        raise CommandError(
            f"--resume: no checkpoint at {path}; point it at a run's output directory or its last.safetensors"
        )
    return path


def load_last(
    weights_path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Load a ``last`` pair (finishing an interrupted save first); returns (weights, metadata, train_state)."""
    weights_path = Path(weights_path)
    state_path = weights_path.with_name(weights_path.name[: -len(WEIGHTS_SUFFIX)] + STATE_SUFFIX)
    tmp_state = state_path.with_name(state_path.name + TMP_SUFFIX)
    tmp_weights = weights_path.with_name(weights_path.name + TMP_SUFFIX)
    metadata = read_metadata(weights_path)
    if tmp_state.exists() and not tmp_weights.exists():
        # The weights rename happened, the state rename did not: the state temp is complete; finish the save.
        # Or the kill hit while the state temp was being written: then it is partial and its generation is not
        # the weights' one, and it is dropped below.
        try:
            pending = _torch_load(tmp_state)
        except CommandError:
            pending = {}
        if pending.get("generation") == metadata.get("generation"):
            commit(tmp_state, state_path)
    for leftover in (tmp_state, tmp_weights):  # a save killed before its renames: the old pair stands
        if leftover.exists():
            leftover.unlink()
    if not state_path.exists():
        raise CommandError(f"--resume: {weights_path} has no training state {state_path.name} next to it")
    train_state = _torch_load(state_path)
    if train_state.get("generation") != metadata.get("generation"):
        raise CommandError(f"--resume: {weights_path} and {state_path.name} are from different saves")
    weights, _ = read_checkpoint_weights(weights_path)
    return weights, metadata, train_state
