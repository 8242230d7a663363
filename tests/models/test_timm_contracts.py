"""The contracts of timm's own model tests (timm tests/test_models.py), run on the DilateFormer family."""

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg

import dilateformer  # noqa: F401  (registers the models)
from dilateformer.models import VARIANTS


def test_all_variants_are_registered_with_pretrained_cfgs():
    assert set(VARIANTS) <= set(timm.list_models("dilateformer_*"))
    for name in VARIANTS:
        cfg = get_pretrained_cfg(name).to_dict()
        for field in (
            "input_size",
            "mean",
            "std",
            "crop_pct",
            "interpolation",
            "first_conv",
            "classifier",
            "license",
        ):
            assert cfg.get(field), (name, field)
        assert cfg["input_size"][1] == (384 if name.endswith("_384") else 64 if "nano" in name else 224)
    assert "not an official" in get_pretrained_cfg("dilateformer_nano").notes[0]


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return timm.create_model("dilateformer_nano").eval()


def test_default_cfg_contracts(nano):
    cfg = nano.pretrained_cfg
    x = torch.randn(2, *cfg["input_size"])
    state_dict = nano.state_dict()
    assert cfg["first_conv"] + ".weight" in state_dict
    assert cfg["classifier"] + ".weight" in state_dict
    with torch.no_grad():
        feats = nano.forward_features(x)
        assert feats.shape[-2:] == cfg["pool_size"]
        assert feats.shape[1] == nano.num_features == nano.head_hidden_size
        assert nano.forward_head(feats, pre_logits=True).shape == (2, nano.num_features)
        assert nano(x).shape == (2, cfg["num_classes"])
        nano.reset_classifier(0)
        assert nano(x).shape == (2, nano.num_features)
        nano.reset_classifier(0, "")
        torch.testing.assert_close(nano(x), feats)
        nano.reset_classifier(7, "avg")
        assert nano(x).shape == (2, 7)
        assert nano.get_classifier().out_features == 7


def test_forward_intermediates(nano):
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        final, inter = nano.forward_intermediates(x)
        torch.testing.assert_close(final, nano.forward_features(x))
        for info, feat in zip(nano.feature_info, inter, strict=True):
            assert feat.shape == (
                1,
                info["num_chs"],
                -(-70 // info["reduction"]),
                -(-90 // info["reduction"]),
            )
        only = nano.forward_intermediates(x, indices=[1, 2], intermediates_only=True, stop_early=True)
        torch.testing.assert_close(only, inter[1:3])
        nhwc = nano.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inter[-1].permute(0, 2, 3, 1))
        normed = nano.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)
    with pytest.raises(ValueError, match="output_fmt"):
        nano.forward_intermediates(x, output_fmt="NLC")


def test_features_only_gives_four_levels():
    model = timm.create_model("dilateformer_nano", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [24, 48, 96, 192]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 24, 16, 24), (1, 48, 8, 12), (1, 96, 4, 6), (1, 192, 2, 3)]
    sub = timm.create_model("dilateformer_nano", features_only=True, out_indices=(1, 3))
    assert sub.feature_info.reduction() == [8, 32]


def test_prune_intermediate_layers():
    model = timm.create_model("dilateformer_nano").eval()
    assert model.prune_intermediate_layers(indices=[0, 1]) == [0, 1]
    assert len(model.stages) == 2 and model.num_features == 48
    with torch.no_grad():
        assert len(model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[0, 1], intermediates_only=True)) == 2


def test_group_matcher_covers_every_parameter(nano):
    from timm.models import group_parameters

    for coarse in (False, True):
        groups = group_parameters(nano, nano.group_matcher(coarse=coarse))
        grouped = {name for group in groups.values() for name in group}
        assert grouped == {n for n, _ in nano.named_parameters()}
        assert len(groups) > (4 if coarse else 5)
    assert isinstance(nano.no_weight_decay(), set)


def test_grad_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    model = timm.create_model("dilateformer_nano", drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 48)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        # BatchNorm running stats advance twice per checkpointed forward, which is harmless for gradients.
        torch.testing.assert_close(param.grad, plain[name], atol=1e-4, rtol=1e-3, msg=name)


def test_create_model_overrides_reach_the_constructor():
    model = timm.create_model(
        "dilateformer_tiny",
        num_classes=10,
        drop_path_rate=0.2,
        attn_types=("global",) * 4,
        in_chans=1,
        border="clamp",
        device="meta",
    )
    assert model.num_classes == 10 and model.in_chans == 1
    assert model.attn_types == ("global",) * 4
    assert model.stages[3].blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
