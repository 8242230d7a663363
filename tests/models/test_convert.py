"""Official checkpoints: conversion, safe loading (a code-running pickle is refused), clear errors, safetensors."""

import argparse
import pickle

import pytest
import timm
import torch

import dilateformer  # noqa: F401  (registers the models)
from dilateformer.models import (
    DilateFormer,
    convert_official_checkpoint,
    load_checkpoint_file,
    load_into,
    load_weights,
    save_weights,
)
from dilateformer.models.convert import is_official_state_dict
from dilateformer.nn import MultiScaleDilatedAttention

MINI = dict(embed_dim=24, depths=(1, 2, 2, 1), num_classes=10)


def test_conversion_renames_stem_and_moves_downsampling(official_mini_state_dict):
    converted = convert_official_checkpoint(official_mini_state_dict)
    assert len(converted) == len(official_mini_state_dict)
    assert converted["stem.9.weight"] is official_mini_state_dict["patch_embed.proj.9.weight"]
    assert converted["stages.1.downsample.conv.weight"] is official_mini_state_dict["stages.0.downsample.proj.0.weight"]
    assert (
        converted["stages.3.downsample.norm.running_var"]
        is (official_mini_state_dict["stages.2.downsample.proj.1.running_var"])
    )
    assert not is_official_state_dict(converted)
    assert convert_official_checkpoint(converted) == converted  # idempotent


def test_training_checkpoint_picks_model_or_ema(official_mini_state_dict):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official_mini_state_dict.items()}
    ckpt = {
        "model": official_mini_state_dict,
        "model_ema": ema,
        "args": argparse.Namespace(lr=1e-3),
        "epoch": 299,
    }
    torch.testing.assert_close(convert_official_checkpoint(ckpt)["head.bias"], official_mini_state_dict["head.bias"])
    torch.testing.assert_close(convert_official_checkpoint(ckpt, use_ema=True)["head.bias"], ema["head.bias"])
    ddp = {"module." + k: v for k, v in official_mini_state_dict.items()}
    assert "stem.0.weight" in convert_official_checkpoint({"model": ddp})
    with pytest.raises(TypeError, match="state dict"):
        convert_official_checkpoint([1, 2])


def test_official_training_checkpoint_file_loads_safely(official_mini_state_dict, official_mini_io, tmp_path):
    path = tmp_path / "dilateformer-mini.pth"
    torch.save(
        {
            "model": official_mini_state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "args": argparse.Namespace(model="mini", drop_path=0.1, input_size=224),
            "epoch": 299,
            "max_accuracy": 81.2,
        },
        path,
    )
    model = DilateFormer(**MINI).eval()
    load_into(model, load_checkpoint_file(path), source=str(path))
    with torch.no_grad():
        torch.testing.assert_close(model(official_mini_io["input"]), official_mini_io["logits"], atol=1e-4, rtol=0)


class _WritesMarker:
    """Unpickling this calls exec(): it would create ``marker`` if a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    raw = tmp_path / "evil.pth"
    with raw.open("wb") as f:
        pickle.dump({"model": {}, "payload": _WritesMarker(marker)}, f, protocol=2)
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"model": {}, "args": argparse.Namespace(x=1), "payload": _WritesMarker(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(ValueError, match="refused to load"):
            load_checkpoint_file(path)
    assert not marker.exists()
    # The crafted file really is armed: an unrestricted unpickle runs it.
    with raw.open("rb") as f:
        pickle.load(f)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file_is_a_clear_error(official_mini_state_dict, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(official_mini_state_dict, path)
    else:
        save_weights(official_mini_state_dict, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint_file(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint_file(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(ValueError):
        load_checkpoint_file(garbage)


def test_checkpoint_of_another_variant_lists_mismatched_keys(tmp_path):
    small = timm.create_model("dilateformer_nano", embed_dim=48)
    path = save_weights(small, tmp_path / "other.safetensors")
    model = timm.create_model("dilateformer_nano", depths=(1, 2, 1, 1))
    with pytest.raises(ValueError) as info:
        load_into(model, load_checkpoint_file(path), source=str(path))
    message = str(info.value)
    assert "embed_dim=48" in message and "embed_dim=24" in message
    assert (
        "shape mismatches" in message and "stem.9.weight: checkpoint (48, 64, 3, 3) vs model (24, 64, 3, 3)" in message
    )
    assert "missing keys" in message and "stages.1.blocks.1.pos_embed.weight" in message
    with pytest.raises(ValueError, match="shape mismatches"):
        timm.create_model("dilateformer_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_safetensors_round_trip_is_atomic(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model("dilateformer_nano").eval()
    path = save_weights(model, tmp_path / "nano.safetensors", metadata={"variant": "dilateformer_nano"})
    assert [p.name for p in tmp_path.iterdir()] == ["nano.safetensors"]  # no temp file left behind
    state, metadata = load_weights(path)
    assert metadata == {"variant": "dilateformer_nano"}
    clone = timm.create_model("dilateformer_nano").eval()
    load_into(clone, state)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
    # A failing write leaves the previous file intact.
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_weights(model, path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_new_class_count_keeps_backbone_and_reinitialises_head(official_mini_state_dict):
    model = DilateFormer(embed_dim=24, depths=(1, 2, 2, 1), num_classes=3)
    head_before = model.head.weight.clone()
    load_into(model, official_mini_state_dict)
    torch.testing.assert_close(model.head.weight, head_before)
    torch.testing.assert_close(model.stem[0].weight, official_mini_state_dict["patch_embed.proj.0.weight"])


def test_global_twin_shares_weights_through_load_into(official_mini_state_dict):
    twin = DilateFormer(**MINI, attn_types="global")
    load_into(twin, official_mini_state_dict)
    qkv = official_mini_state_dict["stages.0.blocks.0.attn.qkv.weight"]
    assert qkv.shape[2:] == (1, 1)  # the official 1x1 conv
    torch.testing.assert_close(twin.stages[0].blocks[0].attn.qkv.weight, qkv.flatten(1))
    # The converted dict holds the Linear's (3C, C): a plain strict load_state_dict takes it, into either model.
    converted = convert_official_checkpoint(official_mini_state_dict)
    assert converted["stages.0.blocks.0.attn.qkv.weight"].shape == qkv.shape[:2]
    twin.load_state_dict(converted)
    DilateFormer(**MINI).load_state_dict(converted)


def test_weights_saved_with_the_old_conv_qkv_load_everywhere(tmp_path):
    """Before MSDA's qkv became a Linear, this project saved its weight as the 1x1 conv's (3C, C, 1, 1); such
    files load through every path (ours, timm's filter, the trainer's, plain load_state_dict) to the same model."""
    from dilateformer.models import checkpoint_filter_fn
    from dilateformer.train.modeling import load_file_into, load_state_into

    torch.manual_seed(0)
    model = DilateFormer(**MINI).eval()
    msda = {f"{name}.qkv.weight" for name, m in model.named_modules() if isinstance(m, MultiScaleDilatedAttention)}
    old = {k: v[..., None, None] if k in msda else v for k, v in model.state_dict().items()}
    assert len(msda) == 3  # stages 0 and 1
    path = save_weights(old, tmp_path / "old.safetensors")
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
    loaders = {
        "load_into": lambda m: load_into(m, load_weights(path)[0]),
        "load_checkpoint_file": lambda m: load_into(m, load_checkpoint_file(path)),
        "checkpoint_filter_fn": lambda m: m.load_state_dict(checkpoint_filter_fn(load_weights(path)[0], m)),
        "load_state_dict": lambda m: m.load_state_dict(load_weights(path)[0]),
        "train load_file_into": lambda m: load_file_into(m, path),
        "train load_state_into": lambda m: load_state_into(m, load_weights(path)[0], source=str(path)),
    }
    for name, load in loaders.items():
        torch.manual_seed(1)
        fresh = DilateFormer(**MINI).eval()
        load(fresh)
        with torch.no_grad():
            assert torch.equal(fresh(x), expected), name
