"""The backend table: one entry per backend, the op's kernels come from it, and ``auto`` says why it skips one."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from dilateformer.functional import multi_scale_dilated_attention as msda
from dilateformer.ops import BACKENDS, compiled, native
from dilateformer.ops.context import AUTO_ORDER, BACKEND_NAMES, select_backend
from tests.ops.helpers import random_qkv


def test_every_backend_name_is_one_table_entry():
    assert set(BACKENDS) == set(BACKEND_NAMES) - {"auto"}
    assert all(name == backend.name for name, backend in BACKENDS.items())
    assert {name for order in AUTO_ORDER.values() for name in order} <= set(BACKENDS)
    # Only the reference backend runs outside the op, through autograd.
    assert [name for name, backend in BACKENDS.items() if not backend.in_op] == ["reference"]
    for backend in BACKENDS.values():
        assert (backend.forward is None) == (backend.backward is None)


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_the_op_runs_the_kernels_of_the_table_entry_it_names(monkeypatch, backend):
    entry = BACKENDS[backend]
    calls = []

    def counted(direction, kernel):
        return lambda *args: calls.append(direction) or kernel(*args)

    patched = dataclasses.replace(
        entry, forward=counted("forward", entry.forward), backward=counted("backward", entry.backward)
    )
    monkeypatch.setitem(BACKENDS, backend, patched)
    q, k, v = random_qkv((1, 5, 6, 2, 4))
    msda(q, k, v, dilations=(1, 2), backend=backend).sum().backward()
    assert calls == ["forward", "backward"]
    with pytest.raises(ValueError, match="impl must be one of .*got 'reference'"):
        torch.ops.dilateformer.msda_forward(q, k, v, 3, [1, 2], 0.5, "zero", "reference")


def test_auto_logs_why_it_skips_each_backend(monkeypatch, caplog):
    monkeypatch.delenv("DILATEFORMER_BACKEND", raising=False)
    monkeypatch.setattr(native, "_load_error", "could not build the native MSDA kernels: no space left")
    with caplog.at_level(logging.DEBUG, logger="dilateformer.ops"):
        assert select_backend("auto", torch.device("cpu"), torch.float32) == "eager"
    (record,) = [r for r in caplog.records if r.name == "dilateformer.ops"]
    assert record.levelno == logging.DEBUG
    assert "skips MSDA backend 'native'" in record.getMessage()
    assert "is not available on cpu: could not build the native MSDA kernels: no space left" in record.getMessage()

    caplog.clear()
    monkeypatch.setitem(compiled._UNAVAILABLE_REASONS, "cuda", "torch.compile needs the triton package")
    with caplog.at_level(logging.DEBUG, logger="dilateformer.ops"):
        assert select_backend("auto", torch.device("cuda"), torch.float64) == "eager"
    messages = [r.getMessage() for r in caplog.records if r.name == "dilateformer.ops"]
    assert len(messages) == 2
    assert "'triton'" in messages[0] and "runs float32, float16, bfloat16, got torch.float64" in messages[0]
    assert "'compiled'" in messages[1] and "is not available on cuda: torch.compile needs the triton" in messages[1]


def test_a_forced_backend_that_cannot_run_raises_with_the_reason(monkeypatch):
    monkeypatch.setitem(compiled._UNAVAILABLE_REASONS, "cpu", "torch.compile needs a C++ compiler")
    with pytest.raises(ValueError, match="'compiled' is not available on cpu: torch.compile needs a C\\+\\+ compiler"):
        select_backend("compiled", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="'triton' runs float32, float16, bfloat16, got torch.float64"):
        select_backend("triton", torch.device("cuda"), torch.float64)
    assert select_backend("eager", torch.device("cpu"), torch.float64) == "eager"
