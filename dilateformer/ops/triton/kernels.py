"""The Triton kernels behind ``backend="triton"``: forward, the query-side backward (dq) and the key-side backward
(dk, dv), each one launch for all dilation groups.

Imported on first use only (see :mod:`dilateformer.ops.triton`): ``@triton.jit`` reads ``TRITON_INTERPRET`` when
it runs, so whether these kernels run compiled on a GPU or in Triton's interpreter on CPU tensors is fixed here.

Layout. Each program owns ``BLOCK_Q`` consecutive pixels of the flattened ``(batch, height, width)`` grid for one
head, and the head's ``head_dim`` channels padded to ``BLOCK_D`` (a power of two) under a mask. Consecutive programs
take the heads of the same pixels, so programs running together share cache lines. q, k and v are read through
their strides (batch, row, column, head; channels contiguous); everything the kernels write is contiguous.

Window. A slot's key is found one axis at a time (``_axis_key``), as in ops/neighborhood.py. The key-side backward
inverts that map (``_axis_queries``): for a key and a slot, the queries whose window puts that key in that slot.
With border "zero" that is at most one query (the mirrored offset); with border "clamp" it is a short run of queries
along each axis near the borders, where windows stop sliding and several queries share their keys. Either way dk
and dv are gathered, never scattered: no atomics, no float32 scratch copies, and the sums run in a fixed order.

Sizes (pixels, height, width, heads, strides) are runtime arguments excluded from Triton's specialisation
(``do_not_specialize``), so a new batch or image size never compiles. What compiles is the configuration: kernel
size, head_dim (through ``BLOCK_D``), dtype and border. Dilations are read from a small int32 tensor, so they do
not compile either.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Runtime sizes: Triton would otherwise compile a variant for each value equal to 1 or divisible by 16.
SIZE_ARGS = ("pixels", "height", "width", "heads", "per_group", "stride_b", "stride_y", "stride_x", "stride_h")


@triton.jit
def _axis_key(query, slot, length, dilation, K: tl.constexpr, ZERO: tl.constexpr):
    """Key coordinate along one axis for the query coordinate ``query`` at window slot ``slot``, kept inside
    ``[0, length)`` so it can be used as an address, and whether that slot has a key there."""
    radius: tl.constexpr = (K - 1) // 2
    if ZERO:
        position = query + (slot - radius) * dilation
        valid = (position >= 0) & (position < length)
        return tl.minimum(tl.maximum(position, 0), length - 1), valid
    else:
        residue = query % dilation
        grid_len = (length - residue + dilation - 1) // dilation
        start = tl.minimum(tl.maximum(query // dilation - radius, 0), tl.maximum(grid_len - K, 0))
        index = start + slot
        return residue + tl.minimum(index, grid_len - 1) * dilation, index < grid_len


@triton.jit
def _axis_queries(key, slot, length, dilation, K: tl.constexpr, ZERO: tl.constexpr):
    """The queries whose window puts the key coordinate ``key`` at slot ``slot`` along one axis: ``count`` of them,
    at ``first``, ``first + dilation``, ...

    Border "clamp": a window starts at ``t = clamp(g - radius, 0, last)`` on the dilation sub-grid (g: the query's
    sub-grid index, last: the final start). Every start strictly between 0 and ``last`` belongs to exactly one
    query; start 0 to the queries ``g <= radius``, start ``last`` to those ``g >= last + radius``.
    """
    radius: tl.constexpr = (K - 1) // 2
    if ZERO:
        position = key - (slot - radius) * dilation
        valid = (position >= 0) & (position < length)
        return tl.minimum(tl.maximum(position, 0), length - 1), valid.to(tl.int32)
    else:
        residue = key % dilation
        grid_len = (length - residue + dilation - 1) // dilation
        last = tl.maximum(grid_len - K, 0)
        start = key // dilation - slot
        low = tl.where(start == 0, 0, start + radius)
        high = tl.where(start == last, grid_len - 1, start + radius)
        count = tl.where((start >= 0) & (start <= last), high - low + 1, 0)
        return residue + low * dilation, count


@triton.jit
def _tile(pid, pixels, height, width, heads, BLOCK_Q: tl.constexpr):
    """This program's head, its pixels' (batch, row, column) and flat index, and which of them exist."""
    head = pid % heads
    pixel = (pid // heads) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_range = pixel < pixels
    pixel = tl.minimum(pixel, pixels - 1)
    column = pixel % width
    row = (pixel // width) % height
    batch = pixel // (width * height)
    return head, pixel, batch, row, column, in_range


@triton.jit
def _input_offsets(batch, row, column, head, stride_b, stride_y, stride_x, stride_h, channel):
    pixel = batch.to(tl.int64) * stride_b + row.to(tl.int64) * stride_y + column.to(tl.int64) * stride_x
    return (pixel + head * stride_h)[:, None] + channel[None, :]


@triton.jit
def _flat_offsets(batch, row, column, head, height, width, heads):
    """Offsets of (pixel, head) in a contiguous (B, H, W, heads) tensor such as lse."""
    return ((batch.to(tl.int64) * height + row) * width + column) * heads + head


@triton.jit(do_not_specialize=SIZE_ARGS)
def msda_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    dilation_ptr,
    pixels,
    height,
    width,
    heads,
    per_group,
    stride_b,
    stride_y,
    stride_x,
    stride_h,
    scale,
    K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ZERO: tl.constexpr,
):
    head, pixel, batch, row, column, in_range = _tile(tl.program_id(0), pixels, height, width, heads, BLOCK_Q)
    dilation = tl.load(dilation_ptr + head // per_group)
    channel = tl.arange(0, BLOCK_D)
    channel_mask = channel < HEAD_DIM
    mask = in_range[:, None] & channel_mask[None, :]
    q = tl.load(
        q_ptr + _input_offsets(batch, row, column, head, stride_b, stride_y, stride_x, stride_h, channel),
        mask=mask,
        other=0.0,
    )
    q = q.to(tl.float32) * scale

    # Online softmax over the k*k slots. Slot 0 always has a key (a zero one at worst), so the running maximum is
    # finite from the first slot on and the rescaling never computes -inf - -inf.
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for s in range(K * K):
        key_row, row_valid = _axis_key(row, s // K, height, dilation, K, ZERO)
        key_col, col_valid = _axis_key(column, s % K, width, dilation, K, ZERO)
        valid = row_valid & col_valid
        offsets = _input_offsets(batch, key_row, key_col, head, stride_b, stride_y, stride_x, stride_h, channel)
        slot_mask = mask & valid[:, None]
        key = tl.load(k_ptr + offsets, mask=slot_mask, other=0.0).to(tl.float32)
        value = tl.load(v_ptr + offsets, mask=slot_mask, other=0.0).to(tl.float32)
        logit = tl.sum(q * key, axis=1)
        if not ZERO:
            logit = tl.where(valid, logit, float("-inf"))
        new_m = tl.maximum(m, logit)
        rescale = tl.exp(m - new_m)
        p = tl.exp(logit - new_m)
        total = total * rescale + p
        acc = acc * rescale[:, None] + p[:, None] * value
        m = new_m
    flat = _flat_offsets(batch, row, column, head, height, width, heads)
    out_offsets = flat[:, None] * HEAD_DIM + channel[None, :]
    tl.store(out_ptr + out_offsets, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + flat, m + tl.log(total), mask=in_range)


@triton.jit(do_not_specialize=SIZE_ARGS)
def msda_backward_queries_kernel(
    grad_out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    grad_q_ptr,
    delta_ptr,
    dilation_ptr,
    pixels,
    height,
    width,
    heads,
    per_group,
    stride_b,
    stride_y,
    stride_x,
    stride_h,
    scale,
    K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ZERO: tl.constexpr,
):
    """dq = sum_s ds_s * k_s, with ds_s = p_s * (dout . v_s - D) * scale; also stores D = dout . out per query."""
    head, pixel, batch, row, column, in_range = _tile(tl.program_id(0), pixels, height, width, heads, BLOCK_Q)
    dilation = tl.load(dilation_ptr + head // per_group)
    channel = tl.arange(0, BLOCK_D)
    mask = in_range[:, None] & (channel < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + _input_offsets(batch, row, column, head, stride_b, stride_y, stride_x, stride_h, channel),
        mask=mask,
        other=0.0,
    )
    q = q.to(tl.float32)
    flat = _flat_offsets(batch, row, column, head, height, width, heads)
    own = flat[:, None] * HEAD_DIM + channel[None, :]
    grad_out = tl.load(grad_out_ptr + own, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + own, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(grad_out * out, axis=1)
    tl.store(delta_ptr + flat, delta, mask=in_range)
    lse = tl.load(lse_ptr + flat, mask=in_range, other=0.0)
    grad_q = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for s in range(K * K):
        key_row, row_valid = _axis_key(row, s // K, height, dilation, K, ZERO)
        key_col, col_valid = _axis_key(column, s % K, width, dilation, K, ZERO)
        valid = row_valid & col_valid
        offsets = _input_offsets(batch, key_row, key_col, head, stride_b, stride_y, stride_x, stride_h, channel)
        slot_mask = mask & valid[:, None]
        key = tl.load(k_ptr + offsets, mask=slot_mask, other=0.0).to(tl.float32)
        value = tl.load(v_ptr + offsets, mask=slot_mask, other=0.0).to(tl.float32)
        p = tl.exp(tl.sum(q * key, axis=1) * scale - lse)
        if not ZERO:
            p = tl.where(valid, p, 0.0)
        grad_logit = p * (tl.sum(grad_out * value, axis=1) - delta) * scale
        grad_q += grad_logit[:, None] * key
    tl.store(grad_q_ptr + own, grad_q.to(grad_q_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=SIZE_ARGS)
def msda_backward_keys_kernel(
    grad_out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    delta_ptr,
    grad_k_ptr,
    grad_v_ptr,
    dilation_ptr,
    pixels,
    height,
    width,
    heads,
    per_group,
    stride_b,
    stride_y,
    stride_x,
    stride_h,
    scale,
    K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ZERO: tl.constexpr,
):
    """dk = sum ds * q and dv = sum p * dout over the (query, slot) pairs that read each key, gathered."""
    head, pixel, batch, row, column, in_range = _tile(tl.program_id(0), pixels, height, width, heads, BLOCK_Q)
    dilation = tl.load(dilation_ptr + head // per_group)
    channel = tl.arange(0, BLOCK_D)
    mask = in_range[:, None] & (channel < HEAD_DIM)[None, :]
    own_input = _input_offsets(batch, row, column, head, stride_b, stride_y, stride_x, stride_h, channel)
    key = tl.load(k_ptr + own_input, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(v_ptr + own_input, mask=mask, other=0.0).to(tl.float32)
    grad_k = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for s in range(K * K):
        first_row, rows = _axis_queries(row, s // K, height, dilation, K, ZERO)
        first_col, cols = _axis_queries(column, s % K, width, dilation, K, ZERO)
        rows = tl.where(in_range, rows, 0)
        cols = tl.where(in_range, cols, 0)
        # Border "zero": at most one query per slot (both loops run once or not at all). Border "clamp": the
        # tile's longest run, which is longer than 1 only in tiles that touch an image border.
        for i in range(tl.max(rows, axis=0)):
            for j in range(tl.max(cols, axis=0)):
                valid = (i < rows) & (j < cols)
                query_row = tl.minimum(first_row + i * dilation, height - 1)
                query_col = tl.minimum(first_col + j * dilation, width - 1)
                query_mask = mask & valid[:, None]
                offsets = _input_offsets(
                    batch, query_row, query_col, head, stride_b, stride_y, stride_x, stride_h, channel
                )
                q = tl.load(q_ptr + offsets, mask=query_mask, other=0.0).to(tl.float32)
                flat = _flat_offsets(batch, query_row, query_col, head, height, width, heads)
                grad_out = tl.load(
                    grad_out_ptr + flat[:, None] * HEAD_DIM + channel[None, :], mask=query_mask, other=0.0
                )
                grad_out = grad_out.to(tl.float32)
                lse = tl.load(lse_ptr + flat, mask=valid, other=0.0)
                delta = tl.load(delta_ptr + flat, mask=valid, other=0.0)
                p = tl.where(valid, tl.exp(tl.sum(q * key, axis=1) * scale - lse), 0.0)
                grad_v += p[:, None] * grad_out
                grad_logit = p * (tl.sum(grad_out * value, axis=1) - delta) * scale
                grad_k += grad_logit[:, None] * q
    flat = _flat_offsets(batch, row, column, head, height, width, heads)
    own = flat[:, None] * HEAD_DIM + channel[None, :]
    tl.store(grad_k_ptr + own, grad_k.to(grad_k_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_v_ptr + own, grad_v.to(grad_v_ptr.dtype.element_ty), mask=mask)


INTERPRETED = not isinstance(msda_forward_kernel, triton.runtime.jit.JITFunction)
"""True when TRITON_INTERPRET was set at import: the kernels then run in Triton's interpreter, on CPU tensors."""
