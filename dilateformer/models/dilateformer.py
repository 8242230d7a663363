"""DilateFormer: Multi-Scale Dilated Transformer for Visual Recognition.

Paper: Jiao et al., "DilateFormer: Multi-Scale Dilated Transformer for Visual Recognition", IEEE TMM 2023,
https://arxiv.org/abs/2302.01791. Architecture facts (layer order, widths, key shapes) follow the official
release at https://github.com/JIAOJIAYUASD/dilateformer; this file is an independent implementation.

Differences from the official code, all of which keep its weights loadable (see
:func:`dilateformer.models.convert_official_checkpoint`):

- any input size (non-square, not a multiple of 32, down to 1x1), instead of an asserted ``img_size``;
- ``forward_features`` returns the unpooled, normalised NCHW map, so the model can feed a detector;
- the attention type of every stage is a config choice (``attn_types``), which gives a global-attention twin
  with the same parameter count, or MSDA everywhere;
- the blocks run channels-last between the position encoding and the end, without copies between blocks.
"""

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, SelectAdaptivePool2d, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from dilateformer.functional import check_dilations, check_heads_divisible, check_kernel_size, quiet_at_trace_time
from dilateformer.nn.attention import GlobalAttention, MultiScaleDilatedAttention
from dilateformer.nn.conv import conv_bn_act, conv_bn_act_applies
from dilateformer.nn.linear import is_symbolic_tracing, linear, linear_add, runs_own_forward
from dilateformer.nn.recompute import batch_norm_gelu, batch_norm_gelu_applies, gelu_mlp

__all__ = [
    "DilateFormer",
    "DilateBlock",
    "DilateStage",
    "ConvStem",
    "Downsample",
    "ATTN_TYPES",
    "OUTPUT_STRIDES",
    "checkpoint_filter_fn",
]

ATTN_TYPES = ("msda", "global")
OUTPUT_STRIDES = (8, 16, 32)


def _check_attn_type(attn_type: str, argument: str) -> str:
    if attn_type not in ATTN_TYPES:
        hint = difflib.get_close_matches(str(attn_type), ATTN_TYPES, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"{argument} must be one of {ATTN_TYPES}, got {attn_type!r}{suggestion}")
    return attn_type


class ConvStem(nn.Sequential):
    """Overlapping conv stem, stride 4: four 3x3 convs without bias (strides 1, 2, 1, 2), BN + act after the
    first three. Indices 0, 1, 3, 4, 6, 7, 9 hold the weights, as in the official ``patch_embed.proj``."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        widths: Sequence[int] = (16, 32, 64),
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        chans = (in_chans, *widths)
        for i, stride in enumerate((1, 2, 1)):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=stride, padding=1, bias=False, **dd),
                norm_layer(chans[i + 1], **dd),
                act_layer(),
            ]
        layers.append(nn.Conv2d(chans[-1], out_chans, 3, stride=2, padding=1, bias=False, **dd))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN runs these full-resolution convs (and BN, GELU) about 20% faster channels-last on CPU; the stages
        # after the stem run channels-last anyway.
        x = x.contiguous(memory_format=torch.channels_last)
        if torch.jit.is_scripting() or is_symbolic_tracing():
            for layer in self:  # not super().forward, which TorchScript cannot compile
                x = layer(x)
            return x
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        # In inference conv + BN + GELU run as one oneDNN conv (about 30% faster at these full-resolution maps). In
        # training BN + GELU are one Function: the full-resolution BN outputs are recomputed in backward instead of
        # kept (64 MB of a Tiny training step at batch 8, 224x224).
        layers = list(self)
        i = 0
        while i < len(layers):
            if i + 2 < len(layers) and conv_bn_act_applies(layers[i], layers[i + 1], layers[i + 2], x):
                x = conv_bn_act(layers[i], layers[i + 1], layers[i + 2], x)
                i += 3
            elif i + 1 < len(layers) and batch_norm_gelu_applies(layers[i], layers[i + 1], x):
                x = batch_norm_gelu(layers[i], layers[i + 1], x)
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (with bias) + BatchNorm between stages, NCHW.

    A stage that keeps its input's resolution (``output_stride`` below 32) gets ``stride=1``, with the dilation
    of the stage before it, as in timm's dilated ResNets.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        stride: int = 2,
        dilation: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=dilation, dilation=dilation, **dd)
        self.norm = norm_layer(out_chans, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or is_symbolic_tracing():
            return self.norm(self.conv(x))
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if conv_bn_act_applies(self.conv, self.norm, None, x):  # inference: the BN folded into the conv
            return conv_bn_act(self.conv, self.norm, None, x)
        return self.norm(self.conv(x))


class BlockMlp(Mlp):
    """timm's Mlp (same submodules and keys) that trains with less activation memory when it can.

    With plain ``nn.Linear`` layers, a GELU activation, no dropout, no hidden norm and no hooks, a training forward
    runs :func:`~dilateformer.nn.recompute.gelu_mlp`, and an eager float32 CPU inference forward runs oneDNN
    kernels (fc1 and the GELU as one); anything else, e.g. LoRA-wrapped or quantized layers, runs timm's plain forward.
    """

    @torch.jit.unused
    def _fused_gelu(self) -> str | None:
        if not isinstance(self.norm, nn.Identity) or self.drop1.p > 0 or self.drop2.p > 0:
            return None
        layers = ((self.fc1, nn.Linear), (self.act, nn.GELU), (self.fc2, nn.Linear))
        if not all(runs_own_forward(module, cls) for module, cls in layers):
            return None
        return self.act.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or is_symbolic_tracing():
            return self._plain_forward(x)
        return self._fast_forward(x)

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm's Mlp.forward, spelled out: TorchScript cannot compile super().forward, and a traced graph records
        # the submodules as nodes.
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    @torch.jit.unused
    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        approximate = self._fused_gelu()
        if approximate is not None and self.training and torch.is_grad_enabled():
            return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, approximate)
        if approximate == "none":  # the plain forward, through oneDNN where that applies
            return linear(linear(x, self.fc1.weight, self.fc1.bias, gelu=True), self.fc2.weight, self.fc2.bias)
        return super().forward(x)

    @torch.jit.unused
    def forward_normed(self, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``self(norm(x))``, plus ``residual`` if given. In training with a plain LayerNorm ``norm`` (and the fused
        forward), the norm's output is recomputed in backward instead of kept; in eager float32 CPU inference the
        residual is added inside fc2's oneDNN kernel."""
        approximate = self._fused_gelu()
        fused = approximate is not None and runs_own_forward(self, BlockMlp)
        if fused and self.training and torch.is_grad_enabled() and runs_own_forward(norm, nn.LayerNorm):
            out = gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, approximate, norm)
            return out if residual is None else residual + out
        if fused and approximate == "none" and residual is not None:
            hidden = linear(norm(x), self.fc1.weight, self.fc1.bias, gelu=True)
            return linear_add(hidden, self.fc2.weight, self.fc2.bias, residual)
        out = self(norm(x))
        return out if residual is None else residual + out


class DilateBlock(nn.Module):
    """DilateFormer block, NCHW in and out.

    ``x + dwconv3x3(x)`` (conditional position encoding), then, channels-last,
    ``x + DropPath(attn(LN(x)))`` and ``x + DropPath(MLP(LN(x)))``. ``attn`` is a
    :class:`~dilateformer.nn.MultiScaleDilatedAttention` (``attn_type="msda"``) or a
    :class:`~dilateformer.nn.GlobalAttention` (``attn_type="global"``).

    ``spatial_dilation`` (1 unless the model runs at ``output_stride`` < 32) spreads the position-encoding conv
    and the MSDA windows over that many pixels, so a block at a resolution kept 2x or 4x finer sees the same
    neighbourhood as at its native stride.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_type: str = "msda",
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 2, 3),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        border: str = "zero",
        backend: str = "auto",
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        spatial_dilation: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.attn_type = _check_attn_type(attn_type, "attn_type")
        sd = spatial_dilation
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=sd, dilation=sd, groups=dim, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.attn: MultiScaleDilatedAttention | GlobalAttention
        if attn_type == "msda":
            self.attn = MultiScaleDilatedAttention(
                dim,
                num_heads,
                kernel_size=kernel_size,
                dilations=[d * sd for d in check_dilations(dilations)],
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                border=border,
                layout="nhwc",
                backend=backend,
                **dd,
            )
        else:
            self.attn = GlobalAttention(
                dim,
                num_heads,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                layout="nhwc",
                **dd,
            )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = BlockMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In channels_last memory format the permutes below are free views and the depthwise conv keeps the
        # format, so a stage of blocks runs without a single layout copy.
        if torch.jit.is_scripting() or is_symbolic_tracing():
            x = x + self.pos_embed(x)
            x = x.permute(0, 2, 3, 1)
            x = x + self.drop_path1(self.attn(self.norm1(x)))
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
            return x.permute(0, 3, 1, 2)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._with_pos_embed(x).permute(0, 2, 3, 1)
        # Where a branch's DropPath does nothing, the residual goes into the branch's last matmul (one oneDNN
        # kernel in inference, see forward_residual); the MLP saves less for backward (forward_normed).
        if _is_noop(self.drop_path1):
            x = self.attn.forward_residual(self.norm1(x), x)
        else:
            x = _add_drop_path(x, self.drop_path1, self.attn(self.norm1(x)))
        if _is_noop(self.drop_path2):
            x = self.mlp.forward_normed(self.norm2, x, residual=x)
        else:
            x = _add_drop_path(x, self.drop_path2, self.mlp.forward_normed(self.norm2, x))
        return x.permute(0, 3, 1, 2)

    @torch.jit.unused
    def _with_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x + pos_embed(x)`` as one depthwise conv: the identity folded into the kernel's centre tap (equal to
        rounding), which saves the addition's pass forward and the gradient sum backward."""
        conv = self.pos_embed
        k = conv.kernel_size[0]
        centred = (
            runs_own_forward(conv, nn.Conv2d)
            and conv.padding_mode == "zeros"
            and conv.stride == (1, 1)
            and conv.kernel_size == (k, k)
            and k % 2 == 1
            and conv.padding == (conv.dilation[0] * (k // 2), conv.dilation[1] * (k // 2))
            and conv.groups == conv.in_channels == conv.out_channels
        )
        if not centred or torch.jit.is_tracing():
            return x + conv(x)
        # A clone keeps the parameter's exact strides (an addition may not, for the size-1 input-channel dim), so the
        # weight's gradient arrives in the parameter's layout and DDP's bucket views need no copy.
        folded = conv.weight.clone()
        folded[:, :, k // 2, k // 2] += 1.0
        return conv._conv_forward(x, folded, conv.bias)


def _is_noop(drop_path: nn.Module) -> bool:
    """Whether a block's DropPath module returns its input unchanged (identity, zero rate or eval mode, no hooks)."""
    if runs_own_forward(drop_path, nn.Identity):
        return True
    return runs_own_forward(drop_path, DropPath) and (drop_path.drop_prob == 0 or not drop_path.training)


def _add_drop_path(x: torch.Tensor, drop_path: nn.Module, branch: torch.Tensor) -> torch.Tensor:
    """``x + drop_path(branch)``. For a plain DropPath in training, the per-sample mask (drawn as timm draws it, so
    the same random stream gives the same samples) multiplies and adds in one kernel: one pass over the activation
    instead of two, and nothing more saved for backward (the mask needs no gradient)."""
    if not (runs_own_forward(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0):
        return x + drop_path(branch)
    keep = 1.0 - drop_path.drop_prob
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
    if keep > 0.0 and drop_path.scale_by_keep:
        mask.div_(keep)
    return torch.addcmul(x, branch, mask)


class DilateStage(nn.Module):
    """An optional :class:`Downsample` (every stage but the first) followed by ``depth`` blocks.

    ``stride`` and ``dilation`` are the downsample's (1 and the previous stage's dilation in a stage that keeps
    its resolution); ``block_dilation`` is the blocks' ``spatial_dilation``.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        attn_type: str = "msda",
        drop_path: Sequence[float] | float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        downsample_norm_layer: type[nn.Module] = nn.BatchNorm2d,
        stride: int = 2,
        dilation: int = 1,
        block_dilation: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        if downsample:
            self.downsample: nn.Module = Downsample(
                dim_in, dim_out, norm_layer=downsample_norm_layer, stride=stride, dilation=dilation, **dd
            )
        else:
            if dim_in != dim_out:
                raise ValueError(f"a stage without downsample keeps its width, got dim_in {dim_in} != {dim_out}")
            self.downsample = nn.Identity()
        rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        self.blocks = nn.Sequential(
            *[
                DilateBlock(
                    dim_out,
                    num_heads,
                    attn_type=attn_type,
                    drop_path=rates[j],
                    norm_layer=norm_layer,
                    spatial_dilation=block_dilation,
                    **block_kwargs,
                    **dd,
                )
                for j in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).contiguous(memory_format=torch.channels_last)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _per_stage(value: Any, name: str, num_stages: int) -> tuple:
    if isinstance(value, (str, int, float)) or value is None:
        return (value,) * num_stages
    value = tuple(value)
    if len(value) != num_stages:
        raise ValueError(f"{name} must give one entry per stage ({num_stages}), got {len(value)}: {value!r}")
    return value


class DilateFormer(nn.Module):
    """DilateFormer image classifier and backbone.

    Args:
        img_size: nominal input size, recorded for configs; any input of at least 1x1 is accepted.
        in_chans: input channels.
        num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
        embed_dim: width of stage 1; stage i is ``embed_dim * 2**i`` wide.
        depths: blocks per stage.
        num_heads: attention heads per stage; MSDA stages need a multiple of ``len(dilations)``.
        kernel_size: MSDA window size (odd).
        dilations: MSDA dilation rate per head group.
        attn_types: ``"msda"`` or ``"global"`` per stage (a single string applies to all stages).
        mlp_ratio: MLP hidden width over block width.
        qkv_bias: bias in the qkv projections.
        qk_scale: attention logit scale, default ``head_dim ** -0.5``.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after attention and MLP projections.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        global_pool: ``"avg"`` (official), ``"max"``, ``"avgmax"`` or ``""`` (no pooling).
        border: MSDA border handling, ``"zero"`` (official) or ``"clamp"``.
        backend: MSDA backend for every MSDA layer, ``"auto"`` by default.
        norm_layer: the blocks' and the final norm (LayerNorm, eps 1e-6, by default).
        act_layer: activation of the stem and the MLPs.
        output_stride: 32 (the classifier's), 16 or 8: the stages that would take the features below
            ``1/output_stride`` keep their input's resolution instead (a stride-1 downsample conv) and dilate their
            convs and MSDA windows to match, for dense prediction (DeepLab-style encoders). Global-attention
            stages then attend over the larger map (4x or 16x the positions: memory grows with its square).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 72,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 2, 3),
        attn_types: Sequence[str] | str = ("msda", "msda", "global", "global"),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        global_pool: str = "avg",
        border: str = "zero",
        backend: str = "auto",
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        output_stride: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # The configuration, kept so that models.global_twin rebuilds exactly this model (device and dtype are
        # placement, not configuration).
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__", "device", "dtype")}
        super().__init__()
        self._init_kwargs: dict[str, Any] = config
        dd = {"device": device, "dtype": dtype}
        if not isinstance(output_stride, int) or output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        depths = tuple(depths)
        num_stages = len(depths)
        if num_stages < 1 or any(not isinstance(d, int) or d < 0 for d in depths):
            raise ValueError(f"depths must be a non-empty sequence of ints >= 0, got {depths!r}")
        num_heads = _per_stage(num_heads, "num_heads", num_stages)
        attn_types = _per_stage(attn_types, "attn_types", num_stages)
        for i, attn_type in enumerate(attn_types):
            _check_attn_type(attn_type, f"attn_types[{i}]")
        kernel_size = check_kernel_size(kernel_size)
        dilations = check_dilations(dilations)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        for i, (dim, heads, attn_type) in enumerate(zip(dims, num_heads, attn_types, strict=True)):
            if dim % heads != 0:
                raise ValueError(
                    f"stage {i} width {dim} (embed_dim {embed_dim} * 2**{i}) should be divisible by "
                    f"num_heads[{i}] {heads}"
                )
            if attn_type == "msda":
                check_heads_divisible(heads, dilations, what=f"num_heads[{i}]")
        norm_layer = norm_layer or _layer_norm_eps6

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.drop_rate = drop_rate
        self.attn_types = attn_types
        self.output_stride = output_stride
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.stem = ConvStem(in_chans, embed_dim, act_layer=act_layer, **dd)
        # One rate per block, rising linearly over all blocks (Python floats, even under a device context).
        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stages, self.feature_info = [], []
        start = 0
        reduction, dilation = 4, 1
        for i in range(num_stages):
            # Past output_stride a stage keeps the resolution and dilates by the stride it skips (timm's ResNet rule).
            stride, first_dilation = 2, dilation
            if i > 0 and reduction >= output_stride:
                stride, dilation = 1, dilation * 2
            elif i > 0:
                reduction *= 2
            stages.append(
                DilateStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    downsample=i > 0,
                    stride=stride,
                    dilation=first_dilation,
                    block_dilation=dilation,
                    attn_type=attn_types[i],
                    drop_path=rates[start : start + depths[i]],
                    norm_layer=norm_layer,
                    kernel_size=kernel_size,
                    dilations=dilations,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    border=border,
                    backend=backend,
                    act_layer=act_layer,
                    **dd,
                )
            )
            start += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(dims[-1], **dd)
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        # MSDA's qkv keeps PyTorch's default init, as the official 1x1 conv it replaces does.
        default_init = {m.qkv for m in self.modules() if isinstance(m, MultiScaleDilatedAttention)}
        for module in self.modules():
            if module not in default_init:
                _init_weights(module)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Norm weights and biases are excluded by timm's optimizer factory on their own (ndim <= 1).
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier of ``num_classes`` outputs (0: none), and optionally another ``global_pool``."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        device, dtype = self.stem[0].weight.device, self.stem[0].weight.dtype
        self.head = (
            nn.Linear(self.num_features, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
        )
        if num_classes > 0:
            _init_weights(self.head)
        # New modules start in training mode; they follow the model's mode instead.
        self.global_pool.train(self.training)
        self.head.train(self.training)

    @torch.jit.unused
    @quiet_at_trace_time()
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DilateFormer expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"DilateFormer expects a 4-D (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            hint = " (it looks channels-last: permute to (B, C, H, W))" if x.shape[-1] == self.in_chans else ""
            raise ValueError(
                f"DilateFormer(in_chans={self.in_chans}) expects {self.in_chans} input channels on axis 1, "
                f"got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"input height and width must be >= 1 (the minimum input is 1x1), got {tuple(x.shape)}")
        if self.training and x.shape[0] == 1 and any(isinstance(s, DilateStage) for s in self.stages[1:]):
            stride = self.feature_info[len(self.stages) - 1]["reduction"]
            if _reduced(x.shape[2], x.shape[3], stride) == (1, 1):
                raise ValueError(
                    f"input {tuple(x.shape[2:])} is too small to train with batch size 1: the last "
                    f"stage would be 1x1 and its BatchNorm needs more than one value per channel; use a "
                    f"batch of 2 or more, or an input larger than {stride} pixels on one side"
                )

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        # Scripted and symbolically traced graphs have no concrete input to check.
        if not torch.jit.is_scripting() and not is_symbolic_tracing():
            self._check_input(x)
        return self.stem(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW, strides ``feature_info[i]["reduction"]``: 4, 8, 16, 32 at ``output_stride`` 32)
        alongside, or instead of, the final features.

        Args:
            x: input images ``(B, in_chans, H, W)``.
            indices: the last n stages if an int, all if None, else the stage indices to return.
            norm: apply the final norm to the last stage's intermediate, as ``forward_features`` does.
            stop_early: stop after the last requested stage (only with ``intermediates_only``).
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self._stem(x)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early and intermediates_only else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self._norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feat)
        if intermediates_only:
            return intermediates
        return self._norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and optionally the norm and head) that the given intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features ``(B, num_features, ceil(H/s), ceil(W/s))`` (``s = output_stride``), final norm applied."""
        x = self._stem(x)
        x = (
            checkpoint_seq(self.stages, x)
            if self.grad_checkpointing and not torch.jit.is_scripting()
            else self.stages(x)
        )
        return self._norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (``global_pool``), dropout and classify the output of :meth:`forward_features`."""
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _reduced(height: int, width: int, stride: int) -> tuple[int, int]:
    # Every stride-2 conv (kernel 3, padding 1) maps n to ceil(n / 2), so the composition is ceil(n / stride).
    return -(-height // stride), -(-width // stride)


def _layer_norm_eps6(dim: int, **kwargs: Any) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def _init_weights(module: nn.Module) -> None:
    # Convs keep PyTorch's default init, as in the official code; only Linear and LayerNorm are re-set.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: DilateFormer) -> dict[str, torch.Tensor]:
    """timm's hook for foreign checkpoints: official DilateFormer keys become this model's keys.

    A checkpoint in this project's format passes unchanged. A checkpoint of another architecture is
    refused here with a ValueError that lists the mismatched keys; only the classifier may differ (timm then
    drops it).
    """
    from dilateformer.models.convert import match_state_dict

    return match_state_dict(model, state_dict, source="pretrained checkpoint", allow_missing_head=True)


def _create_dilateformer(variant: str, pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        DilateFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "min_input_size": (3, 1, 1),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head",
        "license": "unknown (official weights: no licence published; this implementation: Apache-2.0)",
        "paper_ids": "arXiv:2302.01791",
        "paper_name": "DilateFormer: Multi-Scale Dilated Transformer for Visual Recognition",
        "origin_url": "https://github.com/JIAOJIAYUASD/dilateformer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "dilateformer_nano.untrained": _cfg(
            notes=("not an official config: a tiny model for demos and tests",),
            crop_pct=1.0,
            input_size=(3, 64, 64),
            pool_size=(2, 2),
        ),
        "dilateformer_tiny.in1k": _cfg(),
        "dilateformer_small.in1k": _cfg(),
        "dilateformer_base.in1k": _cfg(),
        "dilateformer_tiny_384.in1k": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
        "dilateformer_small_384.in1k": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
        "dilateformer_base_384.in1k": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    }
)

TINY = dict(embed_dim=72, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
SMALL = dict(embed_dim=72, depths=(3, 5, 8, 3), num_heads=(3, 6, 12, 24))
BASE = dict(embed_dim=96, depths=(4, 8, 10, 3), num_heads=(3, 6, 12, 24))
NANO = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))


def _build(variant: str, arch: dict[str, Any], pretrained: bool, kwargs: dict[str, Any]) -> DilateFormer:
    return _create_dilateformer(variant, pretrained=pretrained, **{**arch, **kwargs})


@register_model
def dilateformer_nano(pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    """Not an official size: embed 24, one block per stage; for demos and fast tests."""
    return _build("dilateformer_nano", dict(NANO, img_size=64), pretrained, kwargs)


@register_model
def dilateformer_tiny(pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    """DilateFormer-Tiny, 17.2 M parameters, 224x224."""
    return _build("dilateformer_tiny", TINY, pretrained, kwargs)


@register_model
def dilateformer_small(pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    """DilateFormer-Small, 24.1 M parameters, 224x224."""
    return _build("dilateformer_small", SMALL, pretrained, kwargs)


@register_model
def dilateformer_base(pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    """DilateFormer-Base, 47.4 M parameters, 224x224."""
    return _build("dilateformer_base", BASE, pretrained, kwargs)


@register_model
def dilateformer_tiny_384(pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    """DilateFormer-Tiny at 384x384."""
    return _build("dilateformer_tiny_384", dict(TINY, img_size=384), pretrained, kwargs)


@register_model
def dilateformer_small_384(pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    """DilateFormer-Small at 384x384."""
    return _build("dilateformer_small_384", dict(SMALL, img_size=384), pretrained, kwargs)


@register_model
def dilateformer_base_384(pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    """DilateFormer-Base at 384x384."""
    return _build("dilateformer_base_384", dict(BASE, img_size=384), pretrained, kwargs)


VARIANTS = (
    "dilateformer_nano",
    "dilateformer_tiny",
    "dilateformer_small",
    "dilateformer_base",
    "dilateformer_tiny_384",
    "dilateformer_small_384",
    "dilateformer_base_384",
)


def create_dilateformer(variant: str, pretrained: bool = False, **kwargs: Any) -> DilateFormer:
    """:func:`dilateformer.models.create_model` restricted to the DilateFormer family.

    >>> model = create_dilateformer("dilateformer_tiny", num_classes=10)
    """
    from dilateformer.models.factory import create_model

    return create_model(variant, known=VARIANTS, pretrained=pretrained, **kwargs)
