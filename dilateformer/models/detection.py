"""DilateFormer as a detection backbone: an FPN over the four stages, and torchvision detector builders.

The official release classifies only. Here the stage outputs (strides 4, 8, 16, 32) come from
:meth:`DilateFormer.forward_intermediates` and feed a torchvision :class:`FeaturePyramidNetwork`, which gives
the ``OrderedDict`` of 256-channel maps that Faster R-CNN, RetinaNet and Mask R-CNN expect. The backbone takes
any input size, so the detectors' own resizing (``min_size``/``max_size``) needs no padding to a multiple of 32.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from dilateformer.models.convert import load_checkpoint_file, load_into
from dilateformer.models.dilateformer import DilateFormer, create_dilateformer

__all__ = [
    "DilateFormerFPN",
    "dilateformer_fpn_backbone",
    "fasterrcnn_dilateformer_fpn",
    "maskrcnn_dilateformer_fpn",
    "retinanet_dilateformer_fpn",
]


class DilateFormerFPN(nn.Module):
    """A DilateFormer body and an FPN over the chosen stages; ``out_channels`` is what torchvision reads.

    Returns an ``OrderedDict`` with keys ``"0"``, ``"1"``, ... (one per stage, finest first) plus the extra
    levels of ``extra_blocks`` (``"pool"`` for :class:`LastLevelMaxPool`, ``"p6"``/``"p7"`` for
    :class:`LastLevelP6P7`).
    """

    def __init__(
        self,
        body: DilateFormer,
        out_channels: int = 256,
        returned_stages: Sequence[int] = (0, 1, 2, 3),
        extra_blocks: ExtraFPNBlock | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(body, DilateFormer):
            raise TypeError(f"body must be a DilateFormer, got {type(body).__name__}")
        stages = sorted(set(returned_stages))
        if not stages or stages[0] < 0 or stages[-1] >= len(body.stages):
            raise ValueError(
                f"returned_stages must name stages in 0..{len(body.stages) - 1}, got {tuple(returned_stages)}"
            )
        self.returned_stages = stages
        # The classifier, the final norm and any stage after the last returned one are never used here.
        body.prune_intermediate_layers(stages, prune_norm=True, prune_head=True)
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            [body.feature_info[i]["num_chs"] for i in stages],
            out_channels,
            extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_intermediates(x, indices=self.returned_stages, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    # Detection batches are small, so torchvision's own backbones freeze BatchNorm statistics and affine terms.
    # Not timm.layers.freeze_batch_norm_2d: that builds timm's FrozenBatchNorm2d and shares the running buffers
    # with the source model; torchvision's detectors expect (and check for) torchvision's class, with own copies.
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
    return module


def dilateformer_fpn_backbone(
    variant: str = "dilateformer_tiny",
    weights: str | os.PathLike | None = None,
    out_channels: int = 256,
    returned_stages: Sequence[int] = (0, 1, 2, 3),
    extra_blocks: ExtraFPNBlock | None = None,
    freeze_batchnorm: bool = False,
    **model_kwargs: Any,
) -> DilateFormerFPN:
    """Build a :class:`DilateFormerFPN` from a registered variant.

    Args:
        variant: a DilateFormer model name, e.g. ``"dilateformer_tiny"``.
        weights: optional classification weights (our safetensors or an official checkpoint) for the body.
        out_channels: FPN width.
        returned_stages: stages fed to the FPN (0 is stride 4, 3 is stride 32).
        extra_blocks: extra FPN levels; :class:`LastLevelMaxPool` by default.
        freeze_batchnorm: replace the stem's and downsamplings' BatchNorm with frozen copies.
        **model_kwargs: passed to the model constructor (``drop_path_rate``, ``attn_types``, ...).
    """
    body = create_dilateformer(variant, **model_kwargs)
    if weights is not None:
        load_into(body, load_checkpoint_file(weights), source=str(weights))
    if freeze_batchnorm:
        with torch.no_grad():
            _freeze_batchnorm(body)
    return DilateFormerFPN(body, out_channels=out_channels, returned_stages=returned_stages, extra_blocks=extra_blocks)


def _split_backbone_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("weights", "out_channels", "returned_stages", "freeze_batchnorm", "drop_path_rate", "attn_types", "border")
    return {k: kwargs.pop(k) for k in keys if k in kwargs}


def fasterrcnn_dilateformer_fpn(variant: str = "dilateformer_tiny", num_classes: int = 91, **kwargs: Any) -> FasterRCNN:
    """Faster R-CNN with a DilateFormer-FPN backbone (P2-P5 plus a max-pooled P6, as torchvision's ResNet-FPN).

    ``kwargs`` go to :func:`dilateformer_fpn_backbone` when they name one of its arguments (``weights``,
    ``freeze_batchnorm``, ``drop_path_rate``, ...) and to :class:`~torchvision.models.detection.FasterRCNN`
    otherwise (``min_size``, ``max_size``, ``box_detections_per_img``, ...).
    """
    backbone = dilateformer_fpn_backbone(variant, **_split_backbone_kwargs(kwargs))
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def maskrcnn_dilateformer_fpn(variant: str = "dilateformer_tiny", num_classes: int = 91, **kwargs: Any) -> MaskRCNN:
    """Mask R-CNN with a DilateFormer-FPN backbone; arguments as :func:`fasterrcnn_dilateformer_fpn`."""
    backbone = dilateformer_fpn_backbone(variant, **_split_backbone_kwargs(kwargs))
    return MaskRCNN(backbone, num_classes=num_classes, **kwargs)


def retinanet_dilateformer_fpn(variant: str = "dilateformer_tiny", num_classes: int = 91, **kwargs: Any) -> RetinaNet:
    """RetinaNet with a DilateFormer-FPN backbone: the four stages plus P6 and P7 (six levels).

    Anchors follow torchvision's RetinaNet (three scales and three ratios per level), starting at 16 px on the
    stride-4 level. Arguments as :func:`fasterrcnn_dilateformer_fpn`.
    """
    backbone_kwargs = _split_backbone_kwargs(kwargs)
    out_channels = backbone_kwargs.get("out_channels", 256)
    backbone = dilateformer_fpn_backbone(
        variant, extra_blocks=LastLevelP6P7(out_channels, out_channels), **backbone_kwargs
    )
    if "anchor_generator" not in kwargs:
        levels = len(backbone.returned_stages) + 2
        first = 4 * 2 ** backbone.returned_stages[0] * 4
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (first * 2**i for i in range(levels)))
        kwargs["anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    return RetinaNet(backbone, num_classes=num_classes, **kwargs)
