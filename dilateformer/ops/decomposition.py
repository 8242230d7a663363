"""MSDA in standard ATen ops with sizes kept symbolic: the form exporters see.

``torch.ops.dilateformer.msda_forward`` is one opaque node, which ONNX, OpenVINO and a TorchScript file loaded
without dilateformer cannot run. :func:`msda_decomposed` computes the same function from ops every exporter
translates (pad, slice, index_select, matmul, softmax), and nothing in it turns an image size into a Python
constant, so an exported graph stays valid at every batch, height and width:

- border "zero": each window slot is a slice of the zero-padded keys and values whose end is counted from the
  padded tensor's end, so no slice bound depends on the image size;
- border "clamp": the window tables are built in the graph from ``torch.arange`` over the (symbolic or traced)
  size, not taken from the per-size cache the eager backends use.

Two routes lead here. :func:`register_export_decomposition` makes it the op's CompositeImplicitAutograd kernel
while ``torch.compiler.is_exporting()``: ``torch.export`` still keeps the op as one node, and
``ExportedProgram.run_decompositions()`` (which ``torch.onnx.export(dynamo=True)`` calls) replaces it by this
function; eager calls and ``torch.compile`` return ``NotImplemented`` from it and run the fast kernels. Under
``torch.jit.trace`` (``torch.onnx.export(dynamo=False)``, OpenVINO, Ultralytics' TorchScript export) the
functional front calls it directly, so the trace holds ATen ops only.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from dilateformer.ops.eager import compute_dtype
from dilateformer.ops.neighborhood import _build_window_table

__all__ = ["msda_decomposed", "register_export_decomposition"]


def _end(offset: int, pad: int) -> int | None:
    """Slice end for a window slot starting at ``offset`` of an axis padded by ``pad`` on each side.

    The slot covers ``length`` positions from ``offset``, which ends ``2 * pad - offset`` before the padded end:
    a bound relative to the end holds for every length.
    """
    from_end = 2 * pad - offset
    return -from_end if from_end > 0 else None


def _zero_border_slots(kv: torch.Tensor, kernel_size: int, dilation: int) -> list[torch.Tensor]:
    """Keys and values of every window slot, (2, B, H, W, h, d) each, keys outside the image zero."""
    pad = (kernel_size - 1) // 2 * dilation
    padded = F.pad(kv, (0, 0, 0, 0, pad, pad, pad, pad))
    slots = []
    for a in range(kernel_size):
        rows = padded[:, :, a * dilation : _end(a * dilation, pad)]
        slots += [rows[:, :, :, b * dilation : _end(b * dilation, pad)] for b in range(kernel_size)]
    return slots


def _clamp_border_slots(kv: torch.Tensor, kernel_size: int, dilation: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Keys and values of every window slot and where each slot counts, (H, W, 1, k*k)."""
    rows, rows_valid = _build_window_table(kv.shape[2], kernel_size, dilation, "clamp", kv.device)
    cols, cols_valid = _build_window_table(kv.shape[3], kernel_size, dilation, "clamp", kv.device)
    slots = []
    for a in range(kernel_size):
        slot_rows = kv.index_select(2, rows[:, a])
        slots += [slot_rows.index_select(3, cols[:, b]) for b in range(kernel_size)]
    valid = rows_valid[:, None, :, None] & cols_valid[None, :, None, :]  # (H, W, k, k)
    return slots, valid.flatten(2).unsqueeze(2)


def msda_decomposed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilations: list[int],
    scale: float,
    border: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``msda_forward``'s (out, lse) in export-friendly ATen ops: out like q, lse (B, H, W, heads) in the compute
    dtype. Arguments as for :func:`dilateformer.functional.multi_scale_dilated_attention` (already checked)."""
    input_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    # Keys and values share every slice and gather: half the nodes of slicing each on its own.
    q, kv = q.to(dtype), torch.stack((k.to(dtype), v.to(dtype)))
    outputs, lses = [], []
    groups = zip(q.chunk(len(dilations), dim=3), kv.chunk(len(dilations), dim=4), dilations, strict=True)
    for q_group, kv_group, dilation in groups:
        if border == "zero":
            # Zero keys outside the image still take part in the softmax with logit 0: the padding gives that.
            slots, valid = _zero_border_slots(kv_group, kernel_size, dilation), None
        else:
            slots, valid = _clamp_border_slots(kv_group, kernel_size, dilation)
        keys, values = torch.stack(slots, dim=-2).unbind(0)  # (B, H, W, h, k*k, d) each
        logits = ((q_group.unsqueeze(-2) * scale) @ keys.transpose(-1, -2)).squeeze(-2)  # (B, H, W, h, k*k)
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
        probs = logits.softmax(dim=-1)
        outputs.append((probs.unsqueeze(-2) @ values).squeeze(-2))
        lses.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(outputs, dim=3).to(input_dtype), torch.cat(lses, dim=3)


def register_export_decomposition(op: torch._ops.OpOverload) -> None:
    """Make :func:`msda_decomposed` ``op``'s CompositeImplicitAutograd kernel, active only while exporting.

    Outside export (eager, autograd, ``torch.compile``) the kernel returns ``NotImplemented`` and dispatch goes on
    to the op's own kernels, so only exporters' decompositions ever see the ATen form.
    """

    @op.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)
    def _decompose_when_exporting(q, k, v, kernel_size, dilations, scale, border, impl):
        if not torch.compiler.is_exporting():
            _let_inductor_fall_back(op)
            return NotImplemented
        return msda_decomposed(q, k, v, kernel_size, dilations, scale, border)


def _let_inductor_fall_back(op: torch._ops.OpOverload) -> None:
    """Let inductor run ``op`` as an opaque kernel call even though it lists ``op`` as a decomposition.

    Inductor builds its decomposition table from every CompositeImplicitAutograd kernel registered when it is
    first imported. Imported after dilateformer (the usual order), the table lists this op, and a graph that
    still holds the op (our kernel returned ``NotImplemented``) fails to lower: "both a fallback and a decomp for
    same op". Inductor's ``FALLBACK_ALLOW_LIST`` names the ops it may fall back on anyway. Inductor only asks
    for this kernel from inside its own decomposition pass, so its lowering module is loaded by then; outside
    inductor this is one dictionary lookup.
    """
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is not None:
        lowering.FALLBACK_ALLOW_LIST.add(op.name())
