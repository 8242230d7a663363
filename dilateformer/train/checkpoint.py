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

import errno
import json
import os
import random
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dilateformer.train.errors import CLIError

WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"
TMP_SUFFIX = ".tmp"
# Fault injection for the tests: SIGKILL this process once the temp of the file with this name is written.
KILL_AFTER_TEMP_ENV = "DILATEFORMER_TEST_KILL_AFTER_TEMP"


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


def _write_atomic_bytes_via(writer, path: Path) -> Path:
    """Run ``writer(tmp_path)`` then fsync the temp; returns the temp path (not yet renamed).

    A failed write (a full disk, a file-size limit) removes the partial temp and raises a one-line
    :class:`CLIError`: the committed file is untouched.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        writer(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except (OSError, RuntimeError, SafetensorError) as error:
        tmp.unlink(missing_ok=True)
        raise CLIError(_write_failure(path, error)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # safetensors creates its file 0600; give checkpoints the usual permissions so a team can share runs.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    if os.environ.get(KILL_AFTER_TEMP_ENV) == path.name:
        os.kill(os.getpid(), signal.SIGKILL)
    return tmp


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


def _state_dict_for_safetensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors; weights are small enough to clone.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Atomically write ``state_dict`` as safetensors; ``metadata`` values are JSON-encoded."""
    path = Path(path)
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    tensors = _state_dict_for_safetensors(state_dict)
    tmp = _write_atomic_bytes_via(lambda p: save_file(tensors, str(p), metadata=meta), path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CLIError(f"cannot read checkpoint {path} ({error}); is it a complete .safetensors file?") from None
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    metadata = read_metadata(path)
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as error:
        raise CLIError(f"cannot read checkpoint {path} ({error}); is it a complete .safetensors file?") from None


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
    meta = {k: json.dumps(v) for k, v in {**metadata, "generation": generation}.items()}
    tensors = _state_dict_for_safetensors(model_state)
    state_obj = {**train_state, "generation": generation}
    tmp_state = _write_atomic_bytes_via(lambda p: torch.save(state_obj, p), state)
    tmp_weights = _write_atomic_bytes_via(lambda p: save_file(tensors, str(p), metadata=meta), weights)
    # Both temps are complete and fsynced from here on; the renames are the commit.
    os.replace(tmp_weights, weights)
    os.replace(tmp_state, state)
    _fsync_dir(output)


def _torch_load(path: Path) -> dict[str, Any]:
    import pickle

    from dilateformer.models.convert import unpickling_refusal

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CLIError(f"--resume: {unpickling_refusal(path, error)}") from None
    except Exception as error:  # noqa: BLE001 - any other failure means the same thing to the user
        first = (str(error).splitlines() or [""])[0][:200]
        raise CLIError(f"cannot read training state {path} ({type(error).__name__}: {first})") from None


def find_last(path: str | os.PathLike) -> Path:
    """``--resume`` target -> the ``last.safetensors`` path (accepts the run dir, either file of the pair)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"last{WEIGHTS_SUFFIX}"
    elif path.name.endswith(STATE_SUFFIX):
        path = path.with_name(path.name[: -len(STATE_SUFFIX)] + WEIGHTS_SUFFIX)
    if not path.exists():
        raise CLIError(
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
        except CLIError:
            pending = {}
        if pending.get("generation") == metadata.get("generation"):
            os.replace(tmp_state, state_path)
    for leftover in (tmp_state, tmp_weights):  # a save killed before its renames: the old pair stands
        if leftover.exists():
            leftover.unlink()
    if not state_path.exists():
        raise CLIError(f"--resume: {weights_path} has no training state {state_path.name} next to it")
    train_state = _torch_load(state_path)
    if train_state.get("generation") != metadata.get("generation"):
        raise CLIError(f"--resume: {weights_path} and {state_path.name} are from different saves")
    weights, _ = load_weights(weights_path)
    return weights, metadata, train_state
