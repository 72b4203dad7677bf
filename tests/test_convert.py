"""Official checkpoints: conversion both ways, safe strict loading, same function as the official code."""
import argparse

import pytest
import timm
import torch
from conftest import randomize_
from official_reference import forward as official_forward

import spach

TINY = dict(img_size=32, num_classes=5)
TINY_ARCHS = {
    "single_attn": dict(net_arch=[("attn", 2)], hidden_dim=32, num_heads=4, patch_size=4),
    "single_mlp": dict(net_arch=[("mlp", 2)], hidden_dim=16, patch_size=4),
    "single_conv": dict(net_arch=[("conv", 2)], hidden_dim=16, patch_size=4),
    "ms_hybrid": dict(net_arch=[[("conv", 1)], [("conv", 1), ("attn", 1)], [("mlp", 1)], [("attn", 2)]], hidden_dim=8, num_heads=2, patch_size=2),
    "ms_conv4": dict(net_arch=[[("conv", 1)], [("attn", 1)], [("attn", 1)], [("conv", 1)]], hidden_dim=8, num_heads=2, patch_size=2, stem_type="conv4"),
    "shared": dict(net_arch=[[("conv", 1)], [("mlp", 2)], [("attn", 2)], [("mlp", 1)]], hidden_dim=8, num_heads=2, patch_size=2, shared_spatial_func=True),
}


def _tiny(arch: str, **kw) -> spach.SpachNet:
    return randomize_(spach.create_model("spach", **TINY, **TINY_ARCHS[arch], **kw)).eval()


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_round_trip_official_spach_official_is_identity(arch):
    official = spach.spach_to_official(_tiny(arch).state_dict())
    back = spach.spach_to_official(spach.official_to_spach(official))
    assert list(back) == list(official)
    assert all(torch.equal(back[k], official[k]) for k in official)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_loaded_official_checkpoint_computes_the_official_function(arch, tmp_path):
    source = _tiny(arch)
    official = spach.spach_to_official(source.state_dict())
    path = tmp_path / "official.pth"
    torch.save({"model": official, "args": argparse.Namespace(model="x", lr=5e-4), "epoch": 299}, path)

    model = spach.create_model("spach", pretrained=str(path), **TINY, **TINY_ARCHS[arch]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, ref = model(x), official_forward(official, x, num_heads=TINY_ARCHS[arch].get("num_heads", 1))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_zoo_model_loads_official_layout_through_spach_and_timm(tmp_path):
    name = "spach_ms_xxs_patch4_224_attn"
    src = randomize_(spach.create_model(name, img_size=64)).eval()
    official = spach.spach_to_official(src.state_dict())
    path = tmp_path / "w.pth"
    torch.save(official, path)  # a bare state dict
    a = spach.create_model(name, pretrained=str(path), img_size=64).eval()
    b = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = official_forward(official, x, num_heads=1)
        torch.testing.assert_close(a(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b(x), ref, rtol=1e-5, atol=1e-5)


def test_spach_checkpoint_and_ema_choice(tmp_path):
    m, ema = _tiny("single_attn"), _tiny("single_attn")
    randomize_(ema, seed=1)
    path = tmp_path / "c.pth"
    torch.save({"model": m.state_dict(), "model_ema": ema.state_dict()}, path)
    plain = spach.create_model("spach", pretrained=str(path), **TINY, **TINY_ARCHS["single_attn"])
    with_ema = spach.create_model("spach", pretrained=str(path), use_ema=True, **TINY, **TINY_ARCHS["single_attn"])
    assert torch.equal(plain.head.weight, m.head.weight)
    assert torch.equal(with_ema.head.weight, ema.head.weight)


def test_new_head_for_fine_tuning_keeps_the_backbone(tmp_path):
    src = _tiny("single_conv")
    path = tmp_path / "c.pth"
    torch.save(spach.spach_to_official(src.state_dict()), path)
    ft = spach.create_model("spach", pretrained=str(path), img_size=32, num_classes=3, **TINY_ARCHS["single_conv"])
    assert ft.head.out_features == 3 and torch.count_nonzero(ft.head.weight) == 0
    assert torch.equal(ft.stem.proj.weight, src.stem.proj.weight)


def test_checkpoint_of_another_model_fails_with_one_clear_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": spach.spach_to_official(_tiny("single_attn").state_dict())}, path)
    with pytest.raises(spach.CheckpointError) as e:
        spach.create_model("spach", pretrained=str(path), **TINY, **TINY_ARCHS["single_mlp"])
    msg = str(e.value)
    assert "\n" not in msg and "missing keys" in msg and "unexpected keys" in msg and "shape mismatches" in msg


def test_timm_route_gives_the_same_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(spach.spach_to_official(spach.create_model("spach_ms_xxs_patch4_224_conv", img_size=64).state_dict()), path)
    with pytest.raises(spach.CheckpointError, match="missing keys"):
        timm.create_model("spach_ms_xxs_patch4_224_attn", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_mlp_checkpoint_at_another_resolution_names_the_shapes(tmp_path):
    path = tmp_path / "mlp.pth"
    torch.save(_tiny("single_mlp").state_dict(), path)
    with pytest.raises(spach.CheckpointError, match="shape mismatches: .*mixer.fc1.weight"):
        spach.create_model("spach", pretrained=str(path), img_size=64, num_classes=5, **TINY_ARCHS["single_mlp"])


def test_corrupt_missing_and_unsafe_files(tmp_path):
    kw = {**TINY, **TINY_ARCHS["single_conv"]}
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(spach.CheckpointError, match="cannot read checkpoint"):
        spach.create_model("spach", pretrained=str(corrupt), **kw)
    with pytest.raises(spach.CheckpointError, match="does not exist"):
        spach.create_model("spach", pretrained=str(tmp_path / "nope.pth"), **kw)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "hook": _Evil()}, unsafe)
    with pytest.raises(spach.CheckpointError, match="refuses to unpickle"):
        spach.create_model("spach", pretrained=str(unsafe), **kw)
    assert not _Evil.ran


class _Evil:
    ran = False

    def __reduce__(self):
        return (_Evil._run, ())

    @staticmethod
    def _run():
        _Evil.ran = True


def test_pos_embed_model_cannot_be_exported_to_official_layout():
    m = spach.create_model("spach", **TINY, **TINY_ARCHS["single_attn"], cpe=False, pos_embed=True)
    with pytest.raises(spach.CheckpointError, match="position embedding"):
        spach.spach_to_official(m.state_dict())


def test_namespace_args_still_load_after_timm_loaded_a_checkpoint(tmp_path):
    """timm's loader allows argparse.Namespace only inside its own load (and then removes it from
    torch's global list): ours must not depend on that list."""
    bare, with_args = tmp_path / "bare.pth", tmp_path / "args.pth"
    src = _tiny("single_conv")
    torch.save(src.state_dict(), bare)
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1.0)}, with_args)
    timm.create_model("spach_ms_xxs_patch4_224_conv", pretrained=True, pretrained_cfg_overlay=dict(file=str(with_args)),
                      **TINY, **TINY_ARCHS["single_conv"])
    m = spach.create_model("spach", pretrained=str(with_args), **TINY, **TINY_ARCHS["single_conv"])
    assert torch.equal(m.stem.proj.weight, src.stem.proj.weight)
