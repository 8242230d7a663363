"""``dilateformer.models.create_model`` and ``global_twin``: the one factory and the one twin the commands use."""

from __future__ import annotations

import pytest
import timm
import torch

from dilateformer.models import DilateFormer, create_model, global_twin

DEMO = dict(num_classes=10, embed_dim=12, img_size=32, drop_path_rate=0.0)


def test_unknown_name_gets_the_closest_names():
    with pytest.raises(ValueError, match=r"unknown model 'dilateformer_tinny'; did you mean 'dilateformer_tiny'"):
        create_model("dilateformer_tinny")
    with pytest.raises(ValueError, match=r"unknown model 'resnet5O'; did you mean .*'resnet50'"):
        create_model("resnet5O")
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'.*known: dilateformer_nano"):
        create_model("resnet18", known=["dilateformer_nano"])
    with pytest.raises(TypeError, match="model name must be a str"):
        create_model(None)


def test_rejected_kwargs_name_the_model_and_the_kwargs():
    with pytest.raises(ValueError, match=r"cannot build model dilateformer_nano with \{'embed_dim': -1\}"):
        create_model("dilateformer_nano", embed_dim=-1)
    with pytest.raises(ValueError, match=r"cannot build model dilateformer_nano with \{'no_such_option': 1\}"):
        create_model("dilateformer_nano", no_such_option=1)


def test_any_timm_name_builds_as_timm_builds_it():
    torch.manual_seed(0)
    ours = create_model("resnet10t", num_classes=3)
    torch.manual_seed(0)
    theirs = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True))


def test_twin_equals_the_old_construction_and_keeps_custom_kwargs():
    model = create_model("dilateformer_nano", **DEMO).eval()
    twin = global_twin(model).eval()
    old = timm.create_model("dilateformer_nano", attn_types=("global",) * 4, **DEMO)
    assert isinstance(twin, DilateFormer) and twin.attn_types == ("global",) * 4
    assert twin.pretrained_cfg == model.pretrained_cfg
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in old.state_dict().items()}
    assert twin.stages[0].blocks[0].attn.qkv.weight.shape[0] == 3 * 12  # embed_dim=12 kept, not the variant's 24
    # The weights are model's: where the layers coincide (stem, and the stages that were global already) they agree.
    for key, value in model.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key
    # Same names and shapes: a plain, strict load_state_dict gives the same twin.
    plain = timm.create_model("dilateformer_nano", attn_types=("global",) * 4, **DEMO).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin.stem(x), model.stem(x))
        assert not torch.allclose(twin(x), model(x))  # the windowed stages differ, so the logits do
        assert torch.equal(plain(x), twin(x))


def test_twin_of_a_directly_built_model_without_weights():
    model = DilateFormer(embed_dim=12, depths=(1, 1, 1, 1), num_classes=4)
    torch.manual_seed(1)
    twin = global_twin(model, copy_weights=False, num_classes=2)
    torch.manual_seed(1)
    old = DilateFormer(embed_dim=12, depths=(1, 1, 1, 1), num_classes=2, attn_types="global")
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), old.state_dict().values(), strict=True))
    with pytest.raises(TypeError, match="model must be a DilateFormer"):
        global_twin(torch.nn.Linear(2, 2))
