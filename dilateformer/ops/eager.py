"""The eager backend: MSDA forward and hand-derived backward as plain tensor programs, run op by op with no
compiler. The compiled backend fuses the same two functions with torch.compile.

The window is never materialised. Each of the k*k window slots is a shifted view of K and V (border "zero": a
slice of a zero-padded copy; border "clamp": a gather along each axis), so the working set stays at a few copies
of one tensor whatever the kernel size.

The backward recomputes the probabilities from the saved log-sum-exp, as flash attention does:

    p_s  = exp(scale * q.k_s - lse)            probability of slot s
    D    = sum_d dout * out                     (= sum_s p_s * dout.v_s)
    ds_s = p_s * (dout.v_s - D) * scale         gradient of the logit of slot s
    dq   = sum_s ds_s * k_s,   dk[key(s)] += ds_s * q,   dv[key(s)] += p_s * dout

With border "zero", keys outside the image are zero vectors: their logit is 0 and they still count in the softmax,
which the zero padding gives for free. dk and dv are then gathered rather than scattered: the key at p receives
slot s from the query at p - offset(s), a mirrored shifted view of the zero-padded per-query gradients. With border
"clamp" several queries can share a key in the same slot, so dk and dv are scatter-added.

The same source runs eagerly and under torch.compile (in-place updates of local buffers are functionalised there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilateformer.ops.neighborhood import head_groups, window_table


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs accumulate in float32; float32 and float64 keep their own precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Window:
    """The k*k slots of one head group's dilated window, as views (zero border) or gathers (clamp border)."""

    def __init__(self, height: int, width: int, kernel_size: int, dilation: int, border: str, device):
        self.height, self.width = height, width
        self.kernel_size, self.dilation, self.border = kernel_size, dilation, border
        self.pad = (kernel_size - 1) // 2 * dilation
        if border == "clamp":
            self.rows, rows_valid = window_table(height, kernel_size, dilation, border, device)
            self.cols, cols_valid = window_table(width, kernel_size, dilation, border, device)
            self.valid = rows_valid[:, None, :, None] & cols_valid[None, :, None, :]  # (H, W, k, k)
            # The shortest dilation sub-grid of an axis of length L has max(L // d, 1) points; decided from sizes,
            # not the table's contents, so torch.compile needs no data-dependent guard.
            self.all_valid = min(max(height // dilation, 1), max(width // dilation, 1)) >= kernel_size

    def slots(self):
        for a in range(self.kernel_size):
            for b in range(self.kernel_size):
                yield a, b

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """What slot views are taken from: zero-padded for border "zero", the tensor itself for "clamp"."""
        if self.border == "zero":
            return F.pad(x, (0, 0, 0, 0, self.pad, self.pad, self.pad, self.pad))
        return x

    def take(self, prepared: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """The key (or value) that slot (a, b) of every query's window reads, shape (B, H, W, h, d)."""
        if self.border == "zero":
            y0, x0 = a * self.dilation, b * self.dilation
            return prepared[:, y0 : y0 + self.height, x0 : x0 + self.width]
        return prepared.index_select(1, self.rows[:, a]).index_select(2, self.cols[:, b])

    def mask(self, a: int, b: int) -> torch.Tensor | None:
        """Where slot (a, b) is excluded from the softmax, (1, H, W, 1), or None when it never is."""
        if self.border == "zero" or self.all_valid:
            return None
        return ~self.valid[None, :, :, a, b, None]

    def take_mirrored(self, prepared: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """For border "zero": at each key position, the query whose slot (a, b) reads that key.

        Reading gradients back this way turns the backward's scatter into a gather, which fuses.
        """
        return self.take(prepared, self.kernel_size - 1 - a, self.kernel_size - 1 - b)

    def scatter_add(self, target: torch.Tensor, a: int, b: int, weight: torch.Tensor, x: torch.Tensor) -> None:
        """For border "clamp": target[key of slot (a, b)] += weight * x (several queries may share a key)."""
        index = (self.rows[:, a, None], self.cols[None, :, b])
        target.permute(1, 2, 0, 3, 4).index_put_(index, (weight * x).permute(1, 2, 0, 3, 4), accumulate=True)


def _group_logits(q, keys, window: _Window, scale: float) -> torch.Tensor:
    """All k*k logits of one group, (B, H, W, h, k*k)."""
    logits = q.new_empty(q.shape[:-1] + (window.kernel_size**2,))
    for s, (a, b) in enumerate(window.slots()):
        logit = torch.linalg.vecdot(q, window.take(keys, a, b)) * scale
        mask = window.mask(a, b)
        if mask is not None:
            logit = logit.masked_fill(mask, float("-inf"))
        logits[..., s] = logit
    return logits


def msda_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilations: list[int],
    scale: float,
    border: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse): out like q, lse of shape (B, H, W, heads) in the compute dtype."""
    batch, height, width, num_heads, head_dim = q.shape
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:-1])
    for heads, dilation in head_groups(num_heads, tuple(dilations)):
        window = _Window(height, width, kernel_size, dilation, border, q.device)
        qg = q[..., heads, :]
        keys, values = window.prepare(k[..., heads, :]), window.prepare(v[..., heads, :])
        logits = _group_logits(qg, keys, window, scale)
        group_lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - group_lse.unsqueeze(-1))
        acc = torch.zeros_like(qg)
        for s, (a, b) in enumerate(window.slots()):
            acc.addcmul_(probs[..., s, None], window.take(values, a, b))
        out[..., heads, :] = acc
        lse[..., heads] = group_lse
    return out, lse


def msda_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    dilations: list[int],
    scale: float,
    border: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k and v (in the compute dtype) from the forward's out and log-sum-exp."""
    batch, height, width, num_heads, head_dim = q.shape
    dtype = compute_dtype(q.dtype)
    q, k, v, out, grad_out = (t.to(dtype) for t in (q, k, v, out, grad_out))
    grad_q, grad_k, grad_v = (torch.empty_like(q) for _ in range(3))
    for heads, dilation in head_groups(num_heads, tuple(dilations)):
        window = _Window(height, width, kernel_size, dilation, border, q.device)
        qg, dout = q[..., heads, :], grad_out[..., heads, :]
        keys, values = window.prepare(k[..., heads, :]), window.prepare(v[..., heads, :])
        group_lse = lse[..., heads]
        delta = torch.linalg.vecdot(dout, out[..., heads, :])
        dq = torch.zeros_like(qg)
        probs = qg.new_empty(qg.shape[:-1] + (window.kernel_size**2,))
        dlogits = torch.empty_like(probs)
        for s, (a, b) in enumerate(window.slots()):
            key, value = window.take(keys, a, b), window.take(values, a, b)
            prob = torch.exp(torch.linalg.vecdot(qg, key) * scale - group_lse)
            mask = window.mask(a, b)
            if mask is not None:
                prob = prob.masked_fill(mask, 0.0)
            dlogit = prob * (torch.linalg.vecdot(dout, value) - delta) * scale
            dq.addcmul_(dlogit.unsqueeze(-1), key)
            probs[..., s], dlogits[..., s] = prob, dlogit
        dk, dv = torch.zeros_like(qg), torch.zeros_like(qg)
        if border == "zero":
            probs, dlogits = window.prepare(probs), window.prepare(dlogits)
            queries, douts = window.prepare(qg), window.prepare(dout)
            for s, (a, b) in enumerate(window.slots()):
                dk.addcmul_(window.take_mirrored(dlogits, a, b)[..., s, None], window.take_mirrored(queries, a, b))
                dv.addcmul_(window.take_mirrored(probs, a, b)[..., s, None], window.take_mirrored(douts, a, b))
        else:
            for s, (a, b) in enumerate(window.slots()):
                window.scatter_add(dk, a, b, dlogits[..., s, None], qg)
                window.scatter_add(dv, a, b, probs[..., s, None], dout)
        grad_q[..., heads, :] = dq
        grad_k[..., heads, :] = dk
        grad_v[..., heads, :] = dv
    return grad_q, grad_k, grad_v
