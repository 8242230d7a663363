"""The DilateFormer architecture: exact parameter counts, official outputs, any input size, clear errors."""

import argparse

import pytest
import timm
import torch
from torch import nn

import dilateformer  # noqa: F401  (registers the models)
from dilateformer.models import DilateFormer, convert_official_checkpoint, create_dilateformer, load_into
from dilateformer.nn.attention import GlobalAttention, MultiScaleDilatedAttention

OFFICIAL = {
    "dilateformer_tiny": 17_238_744,
    "dilateformer_small": 24_057_504,
    "dilateformer_base": 47_432_376,
}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mini_model(config, **kwargs) -> DilateFormer:
    return DilateFormer(
        embed_dim=config["embed_dim"],
        depths=config["depths"],
        num_heads=config["num_heads"],
        num_classes=config["num_classes"],
        **kwargs,
    )


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_param_counts_are_exact(name):
    assert num_params(timm.create_model(name, device="meta")) == OFFICIAL[name]
    assert num_params(timm.create_model(name + "_384", device="meta")) == OFFICIAL[name]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_global_twin_has_the_same_parameter_count(name):
    msda = timm.create_model(name, device="meta")
    twin = timm.create_model(name, device="meta", attn_types=("global",) * 4)
    assert num_params(twin) == num_params(msda)
    # Same tensors, name for name and shape for shape: MSDA's qkv is a Linear like the global layer's.
    shapes = {k: v.shape for k, v in msda.state_dict().items()}
    assert shapes == {k: v.shape for k, v in twin.state_dict().items()}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_converted_keys_match_official_key_tables(name, official_key_tables):
    official = {k: torch.empty(shape, device="meta") for k, shape in official_key_tables[name].items()}
    converted = convert_official_checkpoint(official)
    model = timm.create_model(name, device="meta")
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    assert official_key_tables[f"{name}.num_params"] == OFFICIAL[name]


def test_official_mini_model_logits(official_mini_state_dict, official_mini_config, official_mini_io):
    model = mini_model(official_mini_config).eval()
    load_into(model, official_mini_state_dict)
    with torch.no_grad():
        final, stages = model.forward_intermediates(official_mini_io["input"])
        logits = model.forward_head(final)
        logits_48x80 = model(official_mini_io["input_48x80"])
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage, official_mini_io[f"stage{i}_blocks_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, official_mini_io["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_48x80, official_mini_io["logits_48x80"], atol=1e-4, rtol=0)


def test_official_mini_model_through_timm(official_mini_state_dict, official_mini_config, official_mini_io, tmp_path):
    # Released weights are training checkpoints with an argparse.Namespace: timm loads one from a local file.
    path = tmp_path / "official.pth"
    torch.save({"model": official_mini_state_dict, "args": argparse.Namespace(model="mini"), "epoch": 3}, path)
    model = timm.create_model(
        "dilateformer_nano",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        depths=official_mini_config["depths"],
        num_classes=10,
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(official_mini_io["input"]), official_mini_io["logits"], atol=1e-4, rtol=0)
    # A state dict passed straight through timm's own loader meets checkpoint_filter_fn instead.
    model = timm.create_model(
        "dilateformer_nano",
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=official_mini_state_dict, custom_load=False, num_classes=10),
        depths=official_mini_config["depths"],
        num_classes=10,
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(official_mini_io["input"]), official_mini_io["logits"], atol=1e-4, rtol=0)


def test_block_structure_exposes_attention_modules():
    model = timm.create_model("dilateformer_tiny", device="meta")
    kinds = [[type(block.attn) for block in stage.blocks] for stage in model.stages]
    assert kinds == [
        [MultiScaleDilatedAttention] * 2,
        [MultiScaleDilatedAttention] * 2,
        [GlobalAttention] * 6,
        [GlobalAttention] * 2,
    ]
    msda = model.stages[0].blocks[0].attn
    assert msda.layout == "nhwc" and msda.dilations == (1, 2, 3) and msda.kernel_size == 3
    assert model.stages[0].blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6
    all_msda = timm.create_model("dilateformer_tiny", device="meta", attn_types="msda")
    assert all(isinstance(b.attn, MultiScaleDilatedAttention) for s in all_msda.stages for b in s.blocks)


def test_drop_path_rises_linearly_to_the_rate():
    model = timm.create_model("dilateformer_tiny", device="meta", drop_path_rate=0.3)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for stage in model.stages for block in stage.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and len(rates) == 12
    steps = [b - a for a, b in zip(rates, rates[1:], strict=False)]
    assert all(s == pytest.approx(0.3 / 11) for s in steps)
    # Exactly the float32 linspace the official code takes, also with an empty stage.
    assert rates == torch.linspace(0, 0.3, 12).tolist()
    uneven = DilateFormer(embed_dim=12, depths=(2, 0, 3, 1), drop_path_rate=0.2, device="meta")
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for stage in uneven.stages for block in stage.blocks]
    assert rates == torch.linspace(0, 0.2, 6).tolist()


def test_init_linear_truncated_normal_and_zero_bias():
    torch.manual_seed(0)
    model = timm.create_model("dilateformer_nano")
    fc1 = model.stages[2].blocks[0].mlp.fc1
    assert torch.all(fc1.bias == 0)
    assert fc1.weight.abs().max() < 0.2  # timm's trunc_normal_ cuts at +-2 absolute, i.e. ~never at std 0.02
    assert 0.015 < fc1.weight.std() < 0.025
    # MSDA's qkv (a Linear) keeps PyTorch's default init, as the official 1x1 conv does; global attention's is
    # re-set like fc1. Default init: uniform within 1/sqrt(fan_in) = 1/sqrt(24), std 0.118, bias nonzero.
    msda_qkv, global_qkv = model.stages[0].blocks[0].attn.qkv, model.stages[2].blocks[0].attn.qkv
    assert isinstance(msda_qkv, nn.Linear) and isinstance(model.stages[0].blocks[0].attn, MultiScaleDilatedAttention)
    assert msda_qkv.weight.abs().max() <= 24**-0.5 and 0.09 < msda_qkv.weight.std() < 0.15
    assert msda_qkv.bias.abs().min() > 0 and torch.all(global_qkv.bias == 0)


@pytest.mark.parametrize("size", [(1, 1), (17, 45), (48, 80), (33, 32)])
def test_any_input_size(size):
    model = timm.create_model("dilateformer_nano", num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.shape == (2, model.num_features, -(-size[0] // 32), -(-size[1] // 32))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_unknown_variant_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'dilateformer_tiny'"):
        create_dilateformer("dilateformer_tiyn")
    assert isinstance(create_dilateformer("dilateformer_nano", num_classes=3), DilateFormer)


def test_wrong_channels_and_layout_errors():
    model = timm.create_model("dilateformer_nano").eval()
    with pytest.raises(ValueError, match="expects 3 input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="channels-last"):
        model(torch.randn(1, 32, 32, 3))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))


def test_too_small_input_errors():
    model = timm.create_model("dilateformer_nano")
    with pytest.raises(ValueError, match=">= 1"):
        model.eval()(torch.randn(1, 3, 0, 8))
    with pytest.raises(ValueError, match="too small to train with batch size 1"):
        model.train()(torch.randn(1, 3, 32, 32))
    model.train()(torch.randn(1, 3, 33, 32))  # a 2x1 last stage trains


def test_heads_must_divide_width_and_dilations():
    with pytest.raises(ValueError, match="should be divisible by num_heads"):
        DilateFormer(embed_dim=70, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), device="meta")
    with pytest.raises(ValueError, match="dilation groups"):
        DilateFormer(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(4, 8, 16, 32), device="meta")
    # Global-attention stages do not split heads into dilation groups.
    DilateFormer(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(4, 8, 16, 32), attn_types="global", device="meta")
    with pytest.raises(ValueError, match="did you mean 'global'"):
        DilateFormer(attn_types=("msda", "msda", "globl", "global"), device="meta")
    with pytest.raises(ValueError, match="one entry per stage"):
        DilateFormer(attn_types=("msda", "global"), device="meta")


def test_train_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = timm.create_model("dilateformer_nano", num_classes=4, drop_path_rate=0.1).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 40, 56)), torch.tensor([0, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_block_mlp_saves_less_and_matches_the_plain_gradients():
    from dilateformer.analysis.measure import saved_for_backward_bytes
    from dilateformer.models.dilateformer import BlockMlp

    torch.manual_seed(0)
    mlp = BlockMlp(24, 96).double().train()
    x = torch.randn(2, 5, 7, 24, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(mlp, (x,))
    grad = torch.randn(2, 5, 7, 24, dtype=torch.double)
    results = []
    for forward in (mlp, super(BlockMlp, mlp).forward):
        mlp.zero_grad()
        x.grad = None
        out = forward(x)
        out.backward(grad)
        results.append([out, x.grad, *(p.grad for p in mlp.parameters())])
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain)
    fused_bytes = saved_for_backward_bytes(lambda: mlp(x))
    plain_bytes = saved_for_backward_bytes(lambda: super(BlockMlp, mlp).forward(x))
    assert fused_bytes < plain_bytes
    # Dropout inside the MLP needs the plain path.
    assert BlockMlp(24, 96, drop=0.1)._fused_gelu() is None


def test_block_mlp_inference_runs_one_onednn_kernel_with_the_plain_result():
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    from dilateformer.models.dilateformer import BlockMlp

    torch.manual_seed(0)
    mlp = BlockMlp(24, 96).eval()
    x = torch.randn(2, 5, 7, 24)
    with torch.no_grad():
        expected = super(BlockMlp, mlp).forward(x)
        with profile() as prof:
            got = mlp(x)
    names = {event.name for event in prof.events()}
    assert ("mkldnn::_linear_pointwise" in names) == torch.backends.mkldnn.is_available()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # Anything that must see aten ops (FLOP counting, autograd, float64) gets the plain path.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mlp(x)
    assert counter.get_total_flops() == 2 * 2 * (70 * 24 * 96)
    with profile() as prof:
        mlp(x).sum().backward()
    assert "mkldnn::_linear_pointwise" not in {event.name for event in prof.events()}
    assert mlp.fc1.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(mlp.double()(x.double()), super(BlockMlp, mlp).forward(x.double()))
    mlp.float()

    # A hooked or wrapped layer (LoRA, quantization) must still be called: such MLPs run the plain forward.
    class WrappedLinear(nn.Linear):
        def forward(self, input):
            return super().forward(input) + 1.0

    seen = []
    handle = mlp.fc1.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected)
    assert seen == [(2, 5, 7, 96)] and mlp._fused_gelu() is None
    handle.remove()
    wrapped = WrappedLinear(96, 24)
    wrapped.load_state_dict(mlp.fc2.state_dict())
    mlp.fc2 = wrapped
    assert mlp._fused_gelu() is None
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected + 1.0)
    mlp.train()
    torch.testing.assert_close(mlp(x), expected + 1.0)


def test_recomputed_norms_give_the_plain_gradients_and_statistics_and_save_less():
    """The stem's BN + GELU and each block's LayerNorm + MLP recompute their norm outputs in backward; a no-op hook
    on those norms makes the model run them plainly, which must give the same results (float64)."""
    from dilateformer.analysis.measure import saved_for_backward_bytes

    torch.manual_seed(0)
    fused = create_dilateformer("dilateformer_nano", drop_path_rate=0.0).double().train()
    plain = create_dilateformer("dilateformer_nano", drop_path_rate=0.0).double().train()
    plain.load_state_dict(fused.state_dict())
    for name, module in plain.named_modules():
        if name.endswith("norm2") or isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(lambda *args: None)
    x = torch.randn(2, 3, 32, 32, dtype=torch.double)
    for model in (fused, plain):
        model(x).square().sum().backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(fused.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert saved_for_backward_bytes(lambda: fused(x)) < saved_for_backward_bytes(lambda: plain(x))


def _plain_block(block, x):
    """DilateBlock's computation written with its modules one after another, none of the fused paths."""
    from dilateformer.models.dilateformer import BlockMlp

    x = (x + block.pos_embed(x)).permute(0, 2, 3, 1)
    x = x + block.drop_path1(block.attn(block.norm1(x)))
    x = x + block.drop_path2(super(BlockMlp, block.mlp).forward(block.norm2(x)))
    return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("attn_type", ["msda", "global"])
def test_block_fused_paths_match_the_plain_block(attn_type):
    """Eval (the residuals inside oneDNN's proj and fc2, the position encoding folded into its conv) in float32
    against the plain block in float64; training with DropPath (addcmul, same random draws) in float64, gradients
    included, saving no more for backward."""
    from dilateformer.analysis.measure import saved_for_backward_bytes
    from dilateformer.models.dilateformer import DilateBlock

    torch.manual_seed(0)
    block = DilateBlock(24, 3, attn_type=attn_type, drop_path=0.5).eval()
    x = torch.randn(4, 24, 6, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = block(x)
        expected = _plain_block(block.double(), x.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    block.train()
    x64 = x.double().requires_grad_()
    grad = torch.randn_like(x64)
    results = []
    for forward in (block, lambda t: _plain_block(block, t)):
        block.zero_grad()
        x64.grad = None
        torch.manual_seed(1)
        out = forward(x64)
        out.backward(grad)
        results.append([out, x64.grad, *(p.grad for p in block.parameters())])
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain)
    assert saved_for_backward_bytes(lambda: block(x64)) <= saved_for_backward_bytes(lambda: _plain_block(block, x64))


def test_inference_stem_and_downsamples_fold_their_batch_norms():
    """Eval-mode conv + BN (+ GELU) run as one oneDNN conv each in float32 and match the float64 model, which runs
    the modules plainly; running statistics far from the identity so that a wrong fold shows."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = create_dilateformer("dilateformer_nano").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_()
        x = torch.randn(2, 3, 48, 40)
        with profile() as prof:
            got = model(x)
        expected = model.double()(x.double())
    convs = [event for event in prof.events() if event.name == "mkldnn::_convolution_pointwise"]
    assert len(convs) >= 3 + 3  # the stem's three conv + BN + GELU, and the three downsamples
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


# torch.ao's eager quantization is deprecated in favour of torchao, and still the one that ships with torch.
@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_dynamic_quantization_swaps_every_linear_including_msda_qkv():
    torch.manual_seed(0)
    model = timm.create_model("dilateformer_nano", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(quantized.stages[0].blocks[0].attn.qkv, dynamic)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    with torch.no_grad():
        expected, got = model(x), quantized(x)
    assert not torch.equal(got, expected)
    assert (got - expected).norm() < 0.05 * expected.norm()
