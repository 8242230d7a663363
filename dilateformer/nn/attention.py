"""Attention layers: Multi-Scale Dilated Attention and the global multi-head attention it is compared against.

Both accept channels-first ``(B, C, H, W)`` or channels-last ``(B, H, W, C)`` input, fixed per layer by
``layout`` at construction, and return the same layout. A tensor whose channel axis does not hold ``dim`` is
refused with a message that says which layout it looks like, so a wrong layout cannot pass silently.

Both also script (``torch.jit.script``) and trace symbolically (``torch.fx``): in those graph modes the layers skip
the Python-side input checks and fast paths, which cannot look at symbolic tensors, and run plain torch ops and the
registered ``torch.ops.dilateformer.msda_forward`` op (its kernel chosen when it runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dilateformer.functional import (
    BACKEND_NAMES,
    check_border,
    check_dilations,
    check_heads_divisible,
    check_kernel_size,
    multi_scale_dilated_attention,
    quiet_at_trace_time,
)
from dilateformer.nn.linear import apply_linear, is_symbolic_tracing, linear_add, runs_own_forward
from dilateformer.ops.reference import msda_reference

Layout = Literal["nchw", "nhwc"]
LAYOUTS = ("nchw", "nhwc")


def check_dim_heads(dim: int, num_heads: int) -> int:
    for name, value in (("dim", dim), ("num_heads", num_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim % num_heads != 0:
        raise ValueError(f"dim {dim} should be divisible by num_heads {num_heads}")
    return dim // num_heads


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} (channels-first or channels-last), got {layout!r}")
    return layout


@quiet_at_trace_time()
def to_channels_last(x: torch.Tensor, dim: int, layout: str, owner: str) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W, C) as declared by ``layout`` -> a (B, H, W, C) view, with a clear error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{owner} expects a 4-D input ({layout.upper()}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expects a real floating-point input, got {x.dtype}")
    channel_axis = 1 if layout == "nchw" else 3
    if x.shape[channel_axis] != dim:
        other = 3 if layout == "nchw" else 1
        hint = ""
        if x.shape[other] == dim:
            hint = f"; it looks {'channels-last' if other == 3 else 'channels-first'}: build the layer with " + (
                "layout='nhwc'" if other == 3 else "layout='nchw'"
            )
        raise ValueError(
            f"{owner}(dim={dim}, layout={layout!r}) expects {dim} channels on axis {channel_axis}, "
            f"got shape {tuple(x.shape)}{hint}"
        )
    return x.permute(0, 2, 3, 1) if layout == "nchw" else x


def from_channels_last(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if layout == "nchw" else x


class _HeadedAttention(nn.Module):
    """What MSDA and global attention share: heads, scale, layout, the qkv/proj pair and the dropouts."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        qk_scale: float | None,
        attn_drop: float,
        proj_drop: float,
        layout: str,
        dd: dict,
    ) -> None:
        super().__init__()
        self.head_dim = check_dim_heads(dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.layout = check_layout(layout)
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        # C -> 3C, output channels ordered [q | k | v][head][head_dim]; called as a module so hooks, LoRA and
        # quantization wrappers see it.
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Subclasses give both: _eager_forward (checks, fast paths, probability hooks) and _graph_forward.
        if torch.jit.is_scripting() or is_symbolic_tracing():
            return self._graph_forward(x)
        return self._eager_forward(x)

    @torch.jit.unused
    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` (``residual`` in the layer's layout, shaped like the output). In eager float32 CPU
        inference the addition runs inside the output projection's oneDNN kernel, which saves a pass over the
        activation; anything else (hooks on the layer, a wrapped ``proj``, graph modes) adds plainly."""
        if torch.jit.is_scripting() or is_symbolic_tracing() or not runs_own_forward(self, type(self)):
            return residual + self(x)
        return self._eager_forward(x, to_channels_last(residual, self.dim, self.layout, type(self).__name__))

    @torch.jit.unused
    def _project(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``proj_drop(proj(out))`` (channels-last), plus ``residual`` if given, in the layer's layout."""
        plain = residual is None or not (
            runs_own_forward(self.proj, nn.Linear)
            and runs_own_forward(self.proj_drop, nn.Dropout)
            and (self.proj_drop.p == 0 or not self.proj_drop.training)
        )
        if plain:
            out = self.proj_drop(apply_linear(self.proj, out))
            out = out if residual is None else residual + out
        else:
            out = linear_add(out, self.proj.weight, self.proj.bias, residual)
        return from_channels_last(out, self.layout)

    @torch.jit.unused
    def _probabilities_requested(self) -> bool:
        """True while someone hooks ``attn_drop`` to read the attention maps."""
        return bool(self.attn_drop._forward_hooks or self.attn_drop._forward_pre_hooks)


class MultiScaleDilatedAttention(_HeadedAttention):
    """Multi-Scale Dilated Attention (MSDA), the drop-in layer.

    ``qkv`` (Linear C -> 3C, output channels ordered [q | k | v][head][head_dim]) projects the input; the
    heads are split into ``len(dilations)`` groups that each attend to a ``kernel_size x kernel_size`` window
    with their own dilation; ``proj`` (Linear C -> C) mixes the concatenated heads. Both are called as modules,
    so hooks, LoRA wrappers and quantized replacements of ``qkv`` and ``proj`` take effect. Parameter names match
    the official DilateFormer code; its qkv is a 1x1 conv, whose ``(3C, C, 1, 1)`` weight (also what this
    project saved before qkv became a Linear) loads into the ``(3C, C)`` Linear unchanged, through
    ``load_state_dict`` or unpickling a whole module.

    Args:
        dim: channels C of the input and output.
        num_heads: attention heads; must divide ``dim`` and be divisible by ``len(dilations)``.
        kernel_size: odd window size.
        dilations: dilation rate of each head group.
        qkv_bias: bias in the qkv projection.
        qk_scale: logit scale, default ``head_dim ** -0.5``.
        attn_drop: dropout on the attention probabilities (needs the materialised probabilities, so a layer
            that trains with ``attn_drop > 0`` runs the reference backend).
        proj_drop: dropout after the output projection.
        border: ``"zero"`` (official) or ``"clamp"`` (NATTEN); see
            :func:`dilateformer.functional.multi_scale_dilated_attention`.
        layout: ``"nchw"`` for ``(B, C, H, W)`` tensors (CNNs, detectors, YOLO) or ``"nhwc"`` for ``(B, H, W, C)``
            (transformer blocks). Input and output share the layout.
        backend: MSDA backend, ``"auto"`` by default.

    Reading the attention maps: register a forward hook on ``layer.attn_drop`` (this is what
    ``timm.utils.AttentionExtract`` does). While such a hook exists, the layer computes its probabilities
    explicitly and passes them, shaped ``(B, H, W, heads, k, k)``, through ``attn_drop``; without one, nothing is
    materialised and the fast backends run.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 2, 3),
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        border: str = "zero",
        layout: Layout = "nchw",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, layout, dd)
        self.kernel_size = check_kernel_size(kernel_size)
        self.dilations = check_dilations(dilations)
        self._op_dilations = list(self.dilations)  # the op's int[] argument, for graph mode
        check_heads_divisible(num_heads, self.dilations, what="num_heads")
        self.border = check_border(border)
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilations={self.dilations}, border={self.border!r}, layout={self.layout!r}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A 1x1-conv qkv weight (official checkpoints, and this project's before qkv became a Linear) holds the
        # Linear's weight with two trailing singleton axes; the parent runs before its children, so they see it 2-D.
        key = prefix + "qkv.weight"
        weight = state_dict.get(key)
        if isinstance(weight, torch.Tensor) and weight.dim() == 4 and weight.shape[2:] == (1, 1):
            state_dict[key] = weight.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A whole module pickled before qkv became a Linear (an Ultralytics .pt file) comes back with the conv.
        conv = self._modules.get("qkv")
        if type(conv) is nn.Conv2d and conv.kernel_size == (1, 1):
            # Built on the meta device, so unpickling neither allocates nor draws random numbers for an init.
            qkv = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta")
            qkv.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=conv.weight.requires_grad)
            if conv.bias is not None:
                qkv.bias = conv.bias
            self._modules["qkv"] = qkv.train(conv.training)

    @torch.jit.unused
    def _needs_explicit_probs(self) -> bool:
        return (self.training and self.attn_drop.p > 0) or self._probabilities_requested()

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.attn_drop.p > 0:
            raise RuntimeError(
                "MultiScaleDilatedAttention: attn_drop > 0 needs the explicit attention probabilities, which only "
                "eager mode computes; script or trace the layer in eval mode or with attn_drop=0"
            )
        if self.layout == "nchw":
            x = x.permute(0, 2, 3, 1)
        batch, height, width = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x)
        q, k, v = qkv.view(batch, height, width, 3, self.num_heads, self.head_dim).unbind(3)
        out = torch.ops.dilateformer.msda_forward(
            q, k, v, self.kernel_size, self._op_dilations, self.scale, self.border, "auto"
        )[0]
        out = self.proj_drop(self.proj(out.reshape(batch, height, width, self.dim)))
        return out.permute(0, 3, 1, 2) if self.layout == "nchw" else out

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = to_channels_last(x, self.dim, self.layout, type(self).__name__)
        batch, height, width, _ = x.shape
        # Channels-last, the heads come out of the projection contiguous.
        qkv = apply_linear(self.qkv, x)
        q, k, v = qkv.view(batch, height, width, 3, self.num_heads, self.head_dim).unbind(3)
        if self._needs_explicit_probs():
            out = msda_reference(
                q,
                k,
                v,
                self.kernel_size,
                self.dilations,
                self.scale,
                self.border,
                probs_transform=self.attn_drop,
            )
        else:
            out = multi_scale_dilated_attention(
                q,
                k,
                v,
                self.kernel_size,
                self.dilations,
                scale=self.scale,
                border=self.border,
                backend=self.backend,
            )
        return self._project(out.reshape(batch, height, width, self.dim), residual)


class GlobalAttention(_HeadedAttention):
    """Multi-head self-attention over all H*W positions: DilateFormer's deep-stage attention, and MSDA's twin.

    ``qkv`` is a Linear C -> 3C ([q | k | v][head][head_dim]) and ``proj`` a Linear C -> C, as in the official
    code; same layouts and arguments as :class:`MultiScaleDilatedAttention` where they apply. Runs through
    ``F.scaled_dot_product_attention``, except while a hook on ``attn_drop`` asks for the probabilities
    (shaped ``(B, heads, H*W, H*W)``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        layout: Layout = "nhwc",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, layout, dd)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, layout={self.layout!r}"

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            x = x.permute(0, 2, 3, 1)
        batch, height, width = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).view(batch, height * width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # split before transposing: see _eager_forward
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, height, width, self.dim)))
        return out.permute(0, 3, 1, 2) if self.layout == "nchw" else out

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = to_channels_last(x, self.dim, self.layout, type(self).__name__)
        batch, height, width, _ = x.shape
        qkv = apply_linear(self.qkv, x).view(batch, height * width, 3, self.num_heads, self.head_dim)
        # Split first, then transpose: unbind's backward then stacks the SDPA gradients (each (B, N, heads,
        # head_dim) in memory) straight into the linear's (B, N, 3, heads, head_dim) layout, one copy where
        # permute-then-unbind took two (a stack, then a clone to undo the permute).
        q, k, v = qkv.unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, head_dim)
        if self._probabilities_requested():
            probs = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(-1))
            out = probs @ v
        else:
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        return self._project(out.transpose(1, 2).reshape(batch, height, width, self.dim), residual)
