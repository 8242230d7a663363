"""DilateFormer as a dense-prediction encoder: ``output_stride`` and segmentation_models_pytorch's ``tu-`` encoders."""

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F

import dilateformer  # noqa: F401  (registers the models)
from dilateformer.models import DilateFormer

REDUCTIONS = {32: [4, 8, 16, 32], 16: [4, 8, 16, 16], 8: [4, 8, 8, 8]}


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_features_only_output_stride(output_stride):
    torch.manual_seed(0)
    model = timm.create_model("dilateformer_tiny", features_only=True, output_stride=output_stride).eval()
    assert model.feature_info.reduction() == REDUCTIONS[output_stride]
    assert model.feature_info.channels() == [72, 144, 288, 576]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = model(x)
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, -(-64 // r), -(-96 // r))
        for c, r in zip(model.feature_info.channels(), REDUCTIONS[output_stride], strict=True)
    ]
    assert all(torch.isfinite(f).all() for f in features)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_kept_stages_use_stride_one_and_dilate(output_stride):
    model = DilateFormer(embed_dim=24, depths=(1, 1, 1, 1), attn_types="msda", output_stride=output_stride)
    dilation = 1
    for i, stage in enumerate(model.stages[1:], start=1):
        kept = model.feature_info[i]["reduction"] == model.feature_info[i - 1]["reduction"]
        conv = stage.downsample.conv
        assert conv.stride == ((1, 1) if kept else (2, 2))
        assert conv.dilation == conv.padding == (dilation, dilation)  # the previous stage's dilation
        dilation *= 2 if kept else 1
        block = stage.blocks[0]
        assert block.pos_embed.dilation == block.pos_embed.padding == (dilation, dilation)
        assert block.attn.dilations == tuple(d * dilation for d in (1, 2, 3))
    assert dilation == 32 // output_stride


def test_output_stride_keeps_the_weights_loadable():
    """Dilation changes no parameter shape, so classifier weights (at stride 32) load into a stride-8 encoder."""
    source = DilateFormer(embed_dim=24, depths=(1, 1, 1, 1))
    target = DilateFormer(embed_dim=24, depths=(1, 1, 1, 1), output_stride=8)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.stages[3].downsample.conv.weight, source.stages[3].downsample.conv.weight)


def test_msda_everywhere_trains_at_output_stride_8():
    torch.manual_seed(0)
    # drop_path_rate=0: stochastic depth could drop a whole block for both samples and zero its gradients.
    model = DilateFormer(
        embed_dim=24, depths=(1, 1, 1, 1), attn_types="msda", output_stride=8, num_classes=0, drop_path_rate=0.0
    ).train()
    feats = model.forward_features(torch.randn(2, 3, 48, 40))
    assert feats.shape == (2, 192, 6, 5)
    # Not feats.square(): after the final LayerNorm its mean is a constant with no gradient.
    (feats * torch.randn_like(feats)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for i in range(4):  # the dilated MSDA stages too
        assert grads[f"stages.{i}.blocks.0.attn.qkv.weight"].abs().amax() > 1e-3


@pytest.mark.parametrize("output_stride", [4, 12, 64, 16.0, "16", None])
def test_invalid_output_stride_is_refused(output_stride):
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16, 32\)"):
        DilateFormer(embed_dim=24, depths=(1, 1, 1, 1), output_stride=output_stride)


@pytest.mark.parametrize("arch", ["Unet", "FPN", "UPerNet", "Segformer", "DeepLabV3Plus"])
def test_smp_trains_one_step(arch):
    """segmentation_models_pytorch builds each decoder on ``tu-dilateformer_tiny`` (DeepLabV3+ at output stride 16)
    and one training step gives finite gradients for every parameter."""
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_name="tu-dilateformer_tiny", encoder_weights=None, classes=3).train()
    reductions = model.encoder.model.feature_info.reduction()
    assert reductions == (REDUCTIONS[16] if arch == "DeepLabV3Plus" else REDUCTIONS[32])
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    logits = model(x)
    assert logits.shape == (2, 3, 64, 64)
    F.cross_entropy(logits, target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
