"""FLOPs as torch.utils.flop_counter sees them: the official counts, MSDA's products included."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dilateformer  # noqa: F401  (registers the models)

# GMACs of the official models under torch.utils.flop_counter (from the issue).
OFFICIAL_GMACS = {
    ("dilateformer_tiny", 224): 3.162,
    ("dilateformer_small", 224): 4.591,
    ("dilateformer_base", 224): 9.924,
    ("dilateformer_tiny", 384): 10.079,
    ("dilateformer_small", 384): 14.547,
    ("dilateformer_base", 384): 30.908,
}


def count(model, size, device):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size, device=device))
    return counter


@pytest.mark.parametrize(("name", "size"), sorted(OFFICIAL_GMACS))
def test_gmacs_match_the_official_count(name, size):
    # On the meta device nothing is computed, so Base at 384 counts in a blink.
    counter = count(timm.create_model(name, device="meta").eval(), size, "meta")
    assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(OFFICIAL_GMACS[(name, size)], rel=0.01)
    msda = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}["dilateformer.msda_forward"]
    # MSDA runs on the stride-4 and stride-8 maps: 2 * B * H * W * C * k * k MACs per layer.
    depths, dim = model_shape(name)
    side = size // 4
    expected = sum(2 * side**2 // 4**i * dim * 2**i * 9 * depths[i] for i in range(2))
    assert msda / 2 == expected


def model_shape(name):
    model = timm.create_model(name, device="meta")
    return [len(s.blocks) for s in model.stages], model.stem[9].out_channels


def test_real_tensors_count_the_same_as_meta():
    model = timm.create_model("dilateformer_nano").eval()
    meta = timm.create_model("dilateformer_nano", device="meta").eval()
    assert count(model, 64, "cpu").get_total_flops() == count(meta, 64, "meta").get_total_flops()
