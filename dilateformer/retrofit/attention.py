"""The attention module that takes a timm ViT block's place: the block's own projections, MSDA over the patch grid.

Prefix tokens (class, distillation, register) sit outside the grid. Two ways to treat them:

- ``prefix="global"`` (default): each prefix query attends to every token (one SDPA call with P queries, cheap), and
  patch queries attend to their dilated window only. The window op runs unchanged, at full speed.
- ``prefix="keys"``: patch queries also see the P prefix tokens as extra keys. The window attention and the
  P-key attention are merged by their log-sum-exps (:func:`window_attention_with_extra_keys`), so the window part
  is still the one fused op, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dilateformer.functional import multi_scale_dilated_attention, quiet_at_trace_time
from dilateformer.ops.context import default_backend, select_backend
from dilateformer.ops.decomposition import msda_decomposed

PREFIX_MODES = ("global", "keys")


class PatchGrid:
    """The (height, width) of the patch grid of the model's current forward, read from its patch embedding.

    A forward hook on ``patch_embed`` records it on every call, so the grid follows the input (``dynamic_img_size``
    models at any size) and never is a stored constant. The retrofitted attention modules of one model share one
    recorder; ``copy.deepcopy`` keeps that sharing, since the hook is a bound method of this object.
    """

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None

    def record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.dim() == 4:  # NHWC features (timm's dynamic_img_size models): the grid is in the shape
            self.size = (output.shape[1], output.shape[2])
            return
        image_size = (args[0].shape[-2], args[0].shape[-1])
        feat_size = getattr(module, "dynamic_feat_size", None)
        self.size = tuple(feat_size(image_size)) if feat_size is not None else tuple(module.grid_size)


def _msda_impl(q: torch.Tensor) -> str:
    """The op's ``impl`` argument, honouring :func:`dilateformer.use_backend` as the functional front does."""
    requested = default_backend()
    return "auto" if requested == "auto" else select_backend(requested, q.device, q.dtype)


def _merge(out_w, lse_w, q, k_extra, v_extra, scale):
    """Window output and lse merged with attention over extra keys, in plain differentiable ops.

    Returns (out, lse, sigma) with sigma the share of the probability mass that fell into the window.
    """
    logits = torch.einsum("bywhd,bphd->bywhp", q.to(lse_w.dtype), k_extra.to(lse_w.dtype)) * scale
    # logsumexp over (lse_w, extra logits) rather than logaddexp, which the TorchScript ONNX exporter lacks.
    lse = torch.logsumexp(torch.cat([lse_w.unsqueeze(-1), logits], dim=-1), dim=-1)
    sigma = torch.exp(lse_w - lse)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    out = sigma.unsqueeze(-1) * out_w.to(lse.dtype) + torch.einsum("bywhp,bphd->bywhd", probs, v_extra.to(lse.dtype))
    return out.to(q.dtype), lse, sigma


class _WindowWithExtraKeys(torch.autograd.Function):
    """Softmax over (dilated window ∪ extra keys) with the window part in the fused op, forward and backward.

    With the merged output o, merged lse L and the window's share sigma = exp(lse_w - L), the gradient of the
    window's logits is sigma * p_w * (g.v - g.o). The op's backward computes p_w * (g'.v - g'.out') with
    D = g'.out' its only use of out (every backend), so calling it with g' = sigma * g and out' = o gives exactly
    that, and dv = p_w^T (sigma * g): no extra pass over the window. The extra keys' part is P keys per query,
    recomputed here in plain ops.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_extra, v_extra, kernel_size, dilations, scale, border, impl):
        out_w, lse_w = torch.ops.dilateformer.msda_forward(q, k, v, kernel_size, dilations, scale, border, impl)
        out, lse, sigma = _merge(out_w, lse_w, q, k_extra, v_extra, scale)
        ctx.save_for_backward(q, k, v, k_extra, v_extra, out, lse_w, lse)
        ctx.config = (kernel_size, dilations, scale, border, impl)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, k_extra, v_extra, out, lse_w, lse = ctx.saved_tensors
        kernel_size, dilations, scale, border, impl = ctx.config
        dtype = lse.dtype
        g = grad_out.to(dtype)
        sigma = torch.exp(lse_w - lse).unsqueeze(-1)
        dq, dk, dv = torch.ops.dilateformer.msda_backward(
            (sigma * g).to(q.dtype).contiguous(), q, k, v, out, lse_w, kernel_size, dilations, scale, border, impl
        )
        qc, kx, vx = q.to(dtype), k_extra.to(dtype), v_extra.to(dtype)
        probs = torch.exp(torch.einsum("bywhd,bphd->bywhp", qc, kx) * scale - lse.unsqueeze(-1))
        delta = torch.linalg.vecdot(g, out.to(dtype)).unsqueeze(-1)
        dlogits = probs * (torch.einsum("bywhd,bphd->bywhp", g, vx) - delta) * scale
        dq = dq.to(dtype) + torch.einsum("bywhp,bphd->bywhd", dlogits, kx)
        dk_extra = torch.einsum("bywhp,bywhd->bphd", dlogits, qc)
        dv_extra = torch.einsum("bywhp,bywhd->bphd", probs, g)
        grads = (dq, dk, dv, dk_extra, dv_extra)
        return (*(d.to(t.dtype) for d, t in zip(grads, (q, k, v, k_extra, v_extra), strict=True)), *(None,) * 5)


def window_attention_with_extra_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_extra: torch.Tensor,
    v_extra: torch.Tensor,
    kernel_size: int,
    dilations: tuple[int, ...],
    *,
    scale: float,
    border: str = "zero",
) -> torch.Tensor:
    """MSDA in which every query also attends to ``P`` extra keys shared by all queries (one softmax over both).

    q, k, v: ``(B, H, W, heads, head_dim)`` as for :func:`~dilateformer.functional.multi_scale_dilated_attention`;
    k_extra, v_extra: ``(B, P, heads, head_dim)``. Arguments are assumed checked (the retrofit module checks them).
    """
    args = (kernel_size, list(dilations), float(scale), border)
    if torch.jit.is_tracing():
        # As the functional front does: a TorchScript trace holds the pure-ATen form, not the custom op.
        out_w, lse_w = msda_decomposed(q, k, v, *args)
        return _merge(out_w, lse_w, q, k_extra, v_extra, scale)[0]
    impl = _msda_impl(q)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_extra, v_extra))
    if needs_grad and not torch.compiler.is_exporting():
        return _WindowWithExtraKeys.apply(q, k, v, k_extra, v_extra, *args, impl)
    # Inference (and export, where the op's ATen form takes its place): no backward needed.
    out_w, lse_w = torch.ops.dilateformer.msda_forward(q, k, v, *args, impl)
    return _merge(out_w, lse_w, q, k_extra, v_extra, scale)[0]


class RetrofitAttention(nn.Module):
    """A timm ViT/EVA attention with MSDA over the patch grid, built around the original module's own parts.

    ``qkv``, ``proj``, ``q_norm``, ``k_norm``, ``norm``, ``gate`` (and EVA's ``q_bias``/``k_bias``/``v_bias``)
    are the very objects of the module replaced, under the same attribute names, so the state dict has the same
    keys and tensors as before: checkpoints move between the original and the retrofitted model unchanged.

    Attention dropout (``attn_drop``) applies to the prefix queries' global attention only: the window
    probabilities are never materialised. ViTs are fine-tuned with ``attn_drop_rate=0`` as a rule.
    """

    def __init__(
        self,
        attn: nn.Module,
        grid: PatchGrid,
        num_prefix_tokens: int,
        kernel_size: int = 3,
        dilations: tuple[int, ...] = (1, 2, 3),
        border: str = "zero",
        prefix: str = "global",
    ) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        self.scale = float(attn.scale)
        self.qkv = attn.qkv
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm if getattr(attn, "norm", None) is not None else nn.Identity()
        self.gate = getattr(attn, "gate", None)
        self.proj, self.proj_drop = attn.proj, attn.proj_drop
        # EVA keeps separate q/k/v biases next to a bias-free qkv Linear (v_bias may be a zero buffer).
        for name in ("q_bias", "k_bias", "v_bias"):
            if getattr(attn, name, None) is not None:
                value = getattr(attn, name)
                if isinstance(value, nn.Parameter):
                    self.register_parameter(name, value)
                else:
                    self.register_buffer(name, value, persistent=name not in attn._non_persistent_buffers_set)
        self.qkv_bias_separate = bool(getattr(attn, "qkv_bias_separate", False))
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        self._grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        self.kernel_size, self.dilations, self.border, self.prefix = kernel_size, tuple(dilations), border, prefix

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kernel_size={self.kernel_size}, dilations={self.dilations}, "
            f"border={self.border!r}, prefix={self.prefix!r}, num_prefix_tokens={self.num_prefix_tokens}"
        )

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        q_bias = getattr(self, "q_bias", None)
        if q_bias is None:
            return self.qkv(x)
        bias = torch.cat((q_bias, self.k_bias, self.v_bias))
        return self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a retrofitted MSDA block takes no attn_mask / is_causal: its window is its mask")
        batch, tokens, _ = x.shape
        prefix = self.num_prefix_tokens
        with quiet_at_trace_time():
            if self._grid.size is None:
                raise RuntimeError("no patch grid recorded: run the whole model, whose patch_embed records it")
            height, width = self._grid.size
            if tokens - prefix != height * width:
                raise ValueError(
                    f"the block got {tokens} tokens, but {prefix} prefix tokens + a {height}x{width} patch grid "
                    "make a different count (is patch dropout on, or was patch_embed bypassed?)"
                )
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # Heads-last (B, N, heads, head_dim): the MSDA op's layout, reached by views only.
        q, k, v = self._qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            from timm.layers import apply_rot_embed_cat

            # timm lays rope out heads-first, (N, 2d) or (heads, N, 2d); here heads follow the tokens.
            rot = rope.transpose(-3, -2) if rope.dim() >= 3 else rope.unsqueeze(-2)
            q = torch.cat([q[:, :prefix], apply_rot_embed_cat(q[:, prefix:], rot, half=self.rotate_half)], 1)
            k = torch.cat([k[:, :prefix], apply_rot_embed_cat(k[:, prefix:], rot, half=self.rotate_half)], 1)
            q, k = q.type_as(v), k.type_as(v)
        grid_shape = (batch, height, width, self.num_heads, self.head_dim)
        qp, kp, vp = (t[:, prefix:].reshape(grid_shape) for t in (q, k, v))
        if self.prefix == "keys" and prefix > 0:
            patches = window_attention_with_extra_keys(
                qp, kp, vp, k[:, :prefix], v[:, :prefix], self.kernel_size, self.dilations,
                scale=self.scale, border=self.border,
            )  # fmt: skip
        else:
            patches = multi_scale_dilated_attention(
                qp, kp, vp, self.kernel_size, self.dilations, scale=self.scale, border=self.border
            )
        out = patches.reshape(batch, tokens - prefix, self.num_heads * self.head_dim)
        if prefix > 0:
            # One query per prefix token over all N keys: (B, heads, P, head_dim).
            heads_first = [t.transpose(1, 2) for t in (q[:, :prefix], k, v)]
            dropout = self.attn_drop.p if self.training else 0.0
            glob = F.scaled_dot_product_attention(*heads_first, dropout_p=dropout, scale=self.scale)
            out = torch.cat([glob.transpose(1, 2).reshape(batch, prefix, -1), out], dim=1)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))
