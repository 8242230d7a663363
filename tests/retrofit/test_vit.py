"""msda_vit on tiny random timm ViTs: exactness against explicit float64 masked attention, weights kept, any input
size, prefix tokens of DeiT (distilled), register tokens and EVA, training and export."""

import copy
import math

import numpy as np
import pytest
import timm
import torch

from dilateformer.retrofit import RetrofitAttention, msda_vit, parse_blocks, retrofit_config


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 5, "embed_dim": 48, "num_heads": 6}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**options, **kwargs}).eval()


def _block_input(model, images, index=0) -> torch.Tensor:
    """The tokens block ``index`` receives in ``model(images)`` (the forward also records the patch grid)."""
    seen = {}
    handle = model.blocks[index].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen["x"]


def _window_mask(grid, num_prefix, heads, kernel_size, dilations, prefix_keys):
    """(heads, N, N) which keys each query may see, and (heads, N) how many zero-border window slots it has."""
    height, width = grid
    n = num_prefix + height * width
    allowed = torch.zeros(heads, n, n, dtype=torch.bool)
    zeros = torch.zeros(heads, n)
    allowed[:, :num_prefix] = True  # prefix queries: every token
    radius = kernel_size // 2
    per_group = heads // len(dilations)
    for head in range(heads):
        dilation = dilations[head // per_group]
        for y in range(height):
            for x in range(width):
                query = num_prefix + y * width + x
                allowed[head, query, :num_prefix] = prefix_keys
                for a in range(-radius, radius + 1):
                    for b in range(-radius, radius + 1):
                        ky, kx = y + a * dilation, x + b * dilation
                        if 0 <= ky < height and 0 <= kx < width:
                            allowed[head, query, num_prefix + ky * width + kx] = True
                        else:  # zero border: a zero key and value that still takes part in the softmax
                            zeros[head, query] += 1
    return allowed, zeros


def _reference(attn, x, allowed, zeros):
    """Masked multi-head attention in float64 from ``attn``'s own qkv/proj, zero-border slots as extra logit-0 keys."""
    attn = copy.deepcopy(attn).double()
    x = x.double()
    batch, n, _ = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).view(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    logits = logits.masked_fill(~allowed, -math.inf)
    extra = torch.log(zeros.double())[None, :, :, None].expand(batch, -1, -1, 1)  # log(count) = count logit-0 keys
    probs = torch.cat([logits, extra], -1).softmax(-1)[..., :n]
    out = (probs @ v).transpose(1, 2).reshape(batch, n, -1)
    return attn.proj(out)


def test_clamp_whole_grid_window_equals_original_block_with_prefix_keys_masked():
    model = _vit(img_size=40)  # 5x5 grid, kernel 5 >= 5: every patch query's window is the whole grid
    images = torch.randn(2, 3, 40, 40)
    original = copy.deepcopy(model.blocks[0])
    msda_vit(model, [0], kernel_size=5, dilations=(1,), border="clamp")
    tokens = _block_input(model, images)
    n = tokens.shape[1]
    mask = torch.zeros(n, n)
    mask[1:, :1] = -math.inf  # patch queries do not see the class token
    with torch.no_grad():
        expected = original(tokens, attn_mask=mask)
        got = model.blocks[0](tokens)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    allowed = torch.ones(6, n, n, dtype=torch.bool)
    allowed[:, 1:, :1] = False
    with torch.no_grad():
        reference = _reference(original.attn, original.norm1(tokens), allowed, torch.zeros(6, n))
        got_attn = model.blocks[0].attn(original.norm1(tokens))
    torch.testing.assert_close(got_attn.double(), reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["global", "keys"])
def test_zero_border_small_window_equals_masked_reference(prefix):
    model = _vit(img_size=48)  # 6x6 grid, 3x3 windows of dilations 1, 2, 3
    images = torch.randn(2, 3, 48, 48)
    msda_vit(model, "0", kernel_size=3, dilations=(1, 2, 3), prefix=prefix)
    attn = model.blocks[0].attn
    tokens = model.blocks[0].norm1(_block_input(model, images))
    allowed, zeros = _window_mask((6, 6), 1, 6, 3, (1, 2, 3), prefix_keys=prefix == "keys")
    with torch.no_grad():
        torch.testing.assert_close(
            attn(tokens).double(), _reference(attn, tokens, allowed, zeros), atol=2e-5, rtol=1e-5
        )


@pytest.mark.parametrize("prefix", ["global", "keys"])
def test_gradients_equal_the_masked_reference_in_float64(prefix):
    model = _vit(img_size=40, num_heads=4).double()
    msda_vit(model, [0], kernel_size=3, dilations=(1, 2), prefix=prefix)
    model(torch.randn(1, 3, 40, 40, dtype=torch.float64))  # records the 5x5 grid
    attn = model.blocks[0].attn
    allowed, zeros = _window_mask((5, 5), 1, 4, 3, (1, 2), prefix_keys=prefix == "keys")
    x = torch.randn(2, 26, 48, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 26, 48, dtype=torch.float64)
    got = torch.autograd.grad(attn(x), (x, attn.qkv.weight), grad)
    ref_attn = copy.deepcopy(attn)
    expected = torch.autograd.grad(_reference(ref_attn, x, allowed, zeros), (x,), grad)[0]
    torch.testing.assert_close(got[0], expected)
    # The weights' gradient through the same reference, built on the retrofitted module's own parameters.
    ref = _reference_on(attn, x, allowed, zeros)
    torch.testing.assert_close(got[1], torch.autograd.grad(ref, attn.qkv.weight, grad)[0])


def _reference_on(attn, x, allowed, zeros):
    batch, n, _ = x.shape
    q, k, v = attn.qkv(x).view(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = ((q @ k.transpose(-1, -2)) * attn.scale).masked_fill(~allowed, -math.inf)
    extra = torch.log(zeros.to(x.dtype))[None, :, :, None].expand(batch, -1, -1, 1)
    probs = torch.cat([logits, extra], -1).softmax(-1)[..., :n]
    return attn.proj((probs @ v).transpose(1, 2).reshape(batch, n, -1))


def test_weights_are_the_blocks_own_and_checkpoints_interchange():
    model = _vit(qk_norm=True)
    plain = copy.deepcopy(model)
    before = {name: p for name, p in model.named_parameters()}
    qkv, q_norm = model.blocks[1].attn.qkv, model.blocks[1].attn.q_norm
    _, report = msda_vit(model, range(2))
    assert model.blocks[1].attn.qkv is qkv and model.blocks[1].attn.q_norm is q_norm
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert report.params_before == report.params_after == sum(p.numel() for p in plain.parameters())
    assert report.gmacs_after < report.gmacs_before and report.blocks == [0, 1]
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain.state_dict(), strict=True)
    assert retrofit_config(model) == {"blocks": [0, 1], "kernel_size": 3, "dilations": [1, 2, 3], "border": "zero",
                                      "prefix": "global"}  # fmt: skip
    assert "MSDA" in str(report) and "params" in str(report)


def test_dynamic_img_size_other_sizes_follow_the_patch_grid():
    model = _vit(img_size=32, dynamic_img_size=True)
    msda_vit(model, [0, 1])
    attn = model.blocks[0].attn
    for height, width in ((48, 80), (24, 40)):
        tokens = model.blocks[0].norm1(_block_input(model, torch.randn(1, 3, height, width)))
        grid = (height // 8, width // 8)
        assert attn._grid.size == grid
        allowed, zeros = _window_mask(grid, 1, 6, 3, (1, 2, 3), prefix_keys=False)
        with torch.no_grad():
            torch.testing.assert_close(attn(tokens).double(), _reference(attn, tokens, allowed, zeros), atol=2e-5,
                                       rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kwargs", "num_prefix"),
    [
        ("deit_tiny_distilled_patch16_224", {}, 2),
        ("vit_tiny_patch16_224", {"reg_tokens": 4, "no_embed_class": True}, 5),
    ],
)
def test_distilled_and_register_tokens(name, kwargs, num_prefix):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, num_heads=6, embed_dim=48,
                              num_classes=5, **kwargs).eval()  # fmt: skip
    msda_vit(model, [0], prefix="keys")
    attn = model.blocks[0].attn
    assert attn.num_prefix_tokens == num_prefix
    tokens = model.blocks[0].norm1(_block_input(model, torch.randn(2, 3, 32, 32)))
    allowed, zeros = _window_mask((4, 4), num_prefix, 6, 3, (1, 2, 3), prefix_keys=True)
    with torch.no_grad():
        torch.testing.assert_close(
            attn(tokens).double(), _reference(attn, tokens, allowed, zeros), atol=2e-5, rtol=1e-5
        )


def test_eva_with_rope_whole_grid_window_equals_original_with_prefix_keys_masked():
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=70, depth=2, num_classes=5).eval()
    original = copy.deepcopy(model.blocks[0])
    rope = model.rope.get_embed()
    msda_vit(model, [0], kernel_size=5, dilations=(1, 1, 1), border="clamp")  # 5x5 grid: whole-grid windows
    tokens = _block_input(model, torch.randn(2, 3, 70, 70))
    mask = torch.zeros(26, 26)
    mask[1:, :1] = -math.inf
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0](tokens, rope=rope), original(tokens, rope=rope, attn_mask=mask),
                                   atol=2e-5, rtol=1e-5)  # fmt: skip


def test_trains_loss_decreases_and_grads_are_finite():
    model = _vit(img_size=32).train()
    msda_vit(model, [0], prefix="keys")
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("prefix", ["global", "keys"])
def test_onnx_export_runs_in_onnxruntime_and_jit_trace_matches(tmp_path, prefix):
    ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need the optional extra dilateformer[export]")
    model = _vit(img_size=32)
    msda_vit(model, [0], prefix=prefix)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, atol=1e-4, rtol=0)
    traced = torch.jit.trace(model, (x,))
    np.testing.assert_allclose(traced(x).detach().numpy(), expected, atol=1e-5, rtol=0)


def test_parse_blocks_forms_and_errors():
    assert parse_blocks("0-2,5", 6) == [0, 1, 2, 5]
    assert parse_blocks(range(3), 6) == [0, 1, 2]
    assert parse_blocks(4, 6) == [4]
    with pytest.raises(ValueError, match=r"0\.\.5"):
        parse_blocks("3-7", 6)
    with pytest.raises(ValueError, match="'A-B'"):
        parse_blocks("first", 6)
    with pytest.raises(TypeError, match="int"):
        parse_blocks([0, "1"], 6)


def test_bad_input_is_refused_naming_it():
    with pytest.raises(TypeError, match="ResNet"):
        msda_vit(timm.create_model("resnet10t", pretrained=False), [0])
    with pytest.raises(ValueError, match=r"blocks 0\.\.1"):
        msda_vit(_vit(), [2])
    with pytest.raises(ValueError, match="divisible by 4"):
        msda_vit(_vit(), [0], dilations=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="prefix"):
        msda_vit(_vit(), [0], prefix="none")
    with pytest.raises(ValueError, match="images="):
        msda_vit(_vit(), "auto")
    model = _vit()
    msda_vit(model, [0])
    with pytest.raises(ValueError, match="already retrofitted"):
        msda_vit(model, [0])
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, qkv_fused=False)
    with pytest.raises(TypeError, match="separate q/k/v"):
        msda_vit(eva, [0])
    assert isinstance(model.blocks[0].attn, RetrofitAttention)


def test_auto_picks_the_blocks_whose_attention_stays_in_the_window():
    model = _vit(img_size=64, depth=3)  # 8x8 grid: a 3x3 window of dilations 1-3 holds under half the grid
    # Block 0 made local: its tokens are Fourier features of their position, q = k = c * x, so the logit
    # c^2 (cos w dy + cos w dx) peaks at the query itself and falls with distance. Blocks 1, 2 stay random.
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    angle = 0.6
    features = torch.stack([(angle * ys).cos(), (angle * ys).sin(), (angle * xs).cos(), (angle * xs).sin()], -1)
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.copy_(torch.cat([torch.zeros(1, 48), features.view(64, 4).repeat(1, 12)])[None])
        attn = model.blocks[0].attn
        attn.qkv.weight[:96] = torch.cat([torch.eye(48), torch.eye(48)]) * 3.0
        attn.qkv.bias[:96] = 0
    _, report = msda_vit(model, "auto", images=torch.zeros(2, 3, 64, 64))
    shares = [(row["union_share"], row["uniform_union_share"]) for row in report.locality]
    chosen = [i for i, (share, chance) in enumerate(shares) if share >= 0.5 and share >= 2 * chance]
    assert report.blocks == chosen and chosen == [0], shares
    assert all(isinstance(model.blocks[i].attn, RetrofitAttention) == (i in chosen) for i in range(3))
    assert report.threshold == 0.5 and "in-window mass" in str(report)


def test_dynamo_onnx_export_of_the_merged_prefix_keys_path(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need the optional extra dilateformer[export]")
    model = _vit(img_size=32)
    msda_vit(model, [0], prefix="keys")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
