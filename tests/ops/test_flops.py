"""FLOP formulas: the CPU attention kernels count as their matmuls, registration is idempotent, fvcore handles."""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dilateformer import multi_scale_dilated_attention
from dilateformer.ops import flops

aten = torch.ops.aten
FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu


def _forward_and_backward(attention, q, k, v) -> tuple[dict, int]:
    """Per-op counts of a forward, and the FLOPs of its backward alone."""
    with FlopCounterMode(display=False) as counter:
        out = attention(q, k, v)
    forward = dict(counter.get_flop_counts()["Global"])
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    return forward, counter.get_total_flops()


def _explicit(q, k, v):
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


@pytest.mark.parametrize("kv_heads", [3, 1], ids=["mha", "grouped-query"])
def test_sdpa_cpu_kernels_count_as_the_explicit_matmuls(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    k = torch.randn(2, kv_heads, 7, 8, requires_grad=True)
    v = torch.randn(2, kv_heads, 7, 8, requires_grad=True)
    fused, fused_backward = _forward_and_backward(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != 3), q, k, v
    )
    # The kernel these formulas are for is the one that ran, not a decomposition into matmuls.
    assert set(fused) == {FLASH_CPU}
    heads = lambda t: t.expand(-1, 3, -1, -1)  # noqa: E731  (the kernel broadcasts k and v over query heads)
    explicit, explicit_backward = _forward_and_backward(lambda q, k, v: _explicit(q, heads(k), heads(v)), q, k, v)
    assert set(explicit) == {aten.bmm}
    assert fused[FLASH_CPU] == explicit[aten.bmm]
    # The fused backward recomputes the scores (one more q @ k^T) where autograd kept the probabilities.
    scores = explicit[aten.bmm] // 2
    assert fused_backward == explicit_backward + scores


def test_cpu_forward_counts_as_meta_forward():
    # On meta SDPA decomposes into matmuls; a backward there keeps the probabilities instead of recomputing
    # the scores, so only the forward counts must agree.
    shapes = [(2, 3, 10, 8), (2, 3, 7, 8), (2, 3, 7, 8)]
    counts = []
    for device in ("cpu", "meta"):
        q, k, v = (torch.randn(s, device=device) for s in shapes)
        with FlopCounterMode(display=False) as counter:
            F.scaled_dot_product_attention(q, k, v)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * 2 * 3 * 10 * 7 * 8


def test_every_uncounted_attention_kernel_torch_has_gets_a_formula():
    names = [n for n in dir(aten) if n.startswith("_scaled_dot_product") and "attention" in n]
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in names
    # Composite ops (e.g. _scaled_dot_product_attention_math) decompose before a dispatch mode sees them, into ops
    # that are counted; only kernels need a formula.
    kernels = [
        n
        for n in names
        if not torch._C._dispatch_has_kernel_for_dispatch_key(
            getattr(aten, n).default.name(), "CompositeImplicitAutograd"
        )
    ]
    assert "_scaled_dot_product_flash_attention_for_cpu" in kernels
    missing = [n for n in kernels if getattr(aten, n) not in flop_counter.flop_registry]
    assert missing == []


def test_importing_again_keeps_one_formula_per_op():
    registered = {op: flop_counter.flop_registry[op] for op in (FLASH_CPU, torch.ops.dilateformer.msda_forward)}
    importlib.reload(flops)  # registering twice would raise in torch
    assert {op: flop_counter.flop_registry[op] for op in registered} == registered


# ----------------------------------------------------------------------------------------------------- fvcore


class _Functional(nn.Module):
    """Calls the ops directly, the case where fvcore sees them as graph nodes."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, q, k, v):
        return self.attention(q, k, v)


def _fvcore_total(module, inputs, handles) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module, inputs).set_op_handle(**handles)
        analysis.unsupported_ops_warnings(False)
        return analysis.total()


def test_fvcore_counts_msda_and_sdpa_nodes_in_multiply_adds():
    q, k, v = (torch.randn(1, 5, 6, 4, 8) for _ in range(3))  # (B, H, W, heads, head_dim)
    msda = _Functional(lambda q, k, v: multi_scale_dilated_attention(q, k, v, 3, (1, 2)))
    # fvcore traces with torch.jit.trace, which records MSDA's ATen decomposition: its two products are matmuls
    # that fvcore counts itself, with or without our handles.
    assert _fvcore_total(msda, (q, k, v), {}) == 2 * 5 * 6 * 4 * 8 * 9
    assert _fvcore_total(msda, (q, k, v), flops.fvcore_handles()) == 2 * 5 * 6 * 4 * 8 * 9
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    sdpa = _Functional(F.scaled_dot_product_attention)
    assert _fvcore_total(sdpa, (q, k, v), flops.fvcore_handles()) == 2 * 2 * 3 * 10 * 7 * 8


def test_fvcore_einsum_handle_is_exact():
    # 15015 multiply-adds: fvcore's own count reads numpy's 4 significant digits, 15010.
    a, b = torch.randn(3, 5, 7, 11), torch.randn(3, 7, 11, 13)
    einsum = _Functional(lambda a, b, _: torch.einsum("nhij,nijd->nhd", a, b))
    assert _fvcore_total(einsum, (a, b, a), flops.fvcore_handles()) == 3 * 5 * 7 * 11 * 13
