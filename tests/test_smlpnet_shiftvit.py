"""sMLPNet and ShiftViT: the official function on official-layout weights (against the DESIGN.md 2b
transcription), safe strict loading through spach and timm, and one-line errors."""
import argparse

import pytest
import timm
import torch
from conftest import randomize_
from official_reference_2b import shift, shiftvit_forward, smlpnet_forward

import spach
from spach.models.mixers import shift_channels
from spach.models.smlpnet import SparseMLP

TINY = {
    "smlpnet_tiny": dict(dim=8, alpha=2, depths=(1, 2, 1, 1), img_size=32, num_classes=5),
    "shiftvit_light_tiny": dict(embed_dim=24, depths=(1, 2, 1, 1), mlp_ratio=2, img_size=32, num_classes=5),
}
TO_OFFICIAL = {"smlpnet_tiny": spach.smlpnet_to_official, "shiftvit_light_tiny": lambda sd: dict(sd)}
ORACLE = {"smlpnet_tiny": smlpnet_forward, "shiftvit_light_tiny": shiftvit_forward}


def _tiny(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    return randomize_(spach.create_model(name, **{**TINY[name], **kw}), seed).eval()


def _save_official(name: str, tmp_path, **kw) -> tuple[dict, str]:
    official = TO_OFFICIAL[name](_tiny(name, **kw).state_dict())
    path = tmp_path / f"{name}.pth"
    torch.save({"model": official, "args": argparse.Namespace(model=name), "epoch": 299}, path)
    return official, str(path)


@pytest.mark.parametrize("name", sorted(TINY))
def test_loaded_official_checkpoint_computes_the_official_function(name, tmp_path):
    official, path = _save_official(name, tmp_path)
    ours = spach.create_model(name, pretrained=path, **TINY[name]).eval()
    via_timm = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **TINY[name]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ORACLE[name](official, x)
        torch.testing.assert_close(ours(x), ref, rtol=1e-4, atol=1e-4)
        # timm drops a head of another class count (5 here, 1000 in its config): compare the features
        torch.testing.assert_close(via_timm.forward_features(x), ours.forward_features(x))
    assert ref.abs().max() > 1e-2  # random weights: the comparison is not between two zeros
    with torch.no_grad():
        with_head = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=5), **TINY[name])
        torch.testing.assert_close(with_head.eval()(x), ref, rtol=1e-4, atol=1e-4)


def test_smlpnet_on_a_non_square_grid_mixes_the_right_axes(tmp_path):
    official, path = _save_official("smlpnet_tiny", tmp_path, img_size=(64, 32))
    assert official["token_mix.0.1.proj_h.weight"].shape[0] == 8 and official["token_mix.0.1.proh_w.weight"].shape[0] == 16
    model = spach.create_model("smlpnet_tiny", pretrained=path, **{**TINY["smlpnet_tiny"], "img_size": (64, 32)}).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), smlpnet_forward(official, x), rtol=1e-4, atol=1e-4)


def test_sparse_mlp_proj_h_mixes_the_width_and_proh_w_the_height():
    m = SparseMLP(dim=2, grid_size=(3, 4)).eval()
    with torch.no_grad():
        m.BN.reset_parameters()
        m.BN.reset_running_stats()
        m.proj_h.weight.copy_(torch.eye(4).flip(0)[:, :, None, None])  # reverses the width
        m.proj_h.bias.zero_()
        m.proh_w.weight.zero_()
        m.proh_w.bias.zero_()
        m.fuse.weight.zero_()
        m.fuse.weight[:, 2:4, 0, 0] = torch.eye(2)  # output = the width-mixed part
        x = torch.randn(1, 2, 3, 4)
        z = torch.nn.functional.gelu(m.BN(x))
        torch.testing.assert_close(m(x), z.flip(-1))


def test_round_trip_smlpnet_official_smlpnet_is_identity():
    ours = _tiny("smlpnet_tiny").state_dict()
    official = spach.smlpnet_to_official(ours)
    assert "token_mix.3.1.proj_h.weight" in official and "to_patch_embedding.2.0.weight" in official
    back = spach.official_to_smlpnet(official)
    assert list(back) == list(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_shift_matches_the_official_slicing():
    x = torch.randn(2, 26, 5, 6)
    torch.testing.assert_close(shift_channels(x, 26 // 12), shift(x, 12))
    y = shift_channels(x, 2)
    assert torch.equal(y[:, 0, :, :-1], x[:, 0, :, 1:]) and torch.all(y[:, 0, :, -1] == 0)
    assert torch.equal(y[:, 6, 1:], x[:, 6, :-1]) and torch.all(y[:, 6, 0] == 0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_new_head_for_fine_tuning_keeps_the_backbone(name, tmp_path):
    official, path = _save_official(name, tmp_path)
    ft = spach.create_model(name, pretrained=path, **{**TINY[name], "num_classes": 3})
    head = ft.get_classifier()
    assert head.out_features == 3
    first = next(iter(official))
    assert torch.equal(TO_OFFICIAL[name](ft.state_dict())[first], official[first])


@pytest.mark.parametrize("name, other, family", [
    ("smlpnet_tiny", "shiftvit_light_tiny", "ShiftViT"),
    ("shiftvit_light_tiny", "smlpnet_tiny", "sMLPNet"),
    ("shiftvit_light_tiny", "spach", "SPACH"),
    ("spach", "smlpnet_tiny", "sMLPNet"),
])
def test_checkpoint_of_another_family_fails_with_one_clear_line(name, other, family, tmp_path):
    spach_kw = dict(net_arch=[("attn", 1)], hidden_dim=8, num_heads=2, patch_size=4, img_size=32, num_classes=5)
    if other == "spach":
        state = spach.spach_to_official(spach.create_model("spach", **spach_kw).state_dict())
    else:
        state = TO_OFFICIAL[other](_tiny(other).state_dict())
    path = tmp_path / "other.pth"
    torch.save({"model": state}, path)
    kw = spach_kw if name == "spach" else TINY[name]
    with pytest.raises(spach.CheckpointError) as e:
        spach.create_model(name, pretrained=str(path), **kw)
    msg = str(e.value)
    assert "\n" not in msg and "missing keys" in msg and "unexpected keys" in msg and f"it is a {family} checkpoint" in msg
    if name != "spach":
        with pytest.raises(spach.CheckpointError, match=f"it is a {family} checkpoint"):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)


def test_smlpnet_checkpoint_at_another_resolution_names_the_shapes(tmp_path):
    _, path = _save_official("smlpnet_tiny", tmp_path)
    shapes = r"shape mismatches: .*proj_h\.weight \(8, 8, 1, 1\) vs model \(16, 16, 1, 1\)"
    with pytest.raises(spach.CheckpointError, match=shapes):
        spach.create_model("smlpnet_tiny", pretrained=path, **{**TINY["smlpnet_tiny"], "img_size": 64})


def test_smlpnet_run_at_another_resolution_fails_with_one_clear_line():
    model = _tiny("smlpnet_tiny")
    with pytest.raises(spach.SpachError, match="sMLPNet input size: built for 32x32, got 64x64;.*img_size") as e:
        model(torch.randn(1, 3, 64, 64))
    assert "\n" not in str(e.value)


def test_shiftvit_runs_at_other_resolutions():
    model = _tiny("shiftvit_light_tiny")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5)


def test_drop_path_rises_linearly_over_all_blocks():
    s = spach.create_model("smlpnet_tiny", **{**TINY["smlpnet_tiny"], "drop_path_rate": 0.4})
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for st in s.stages for b in st.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    v = spach.create_model("shiftvit_light_tiny", **TINY["shiftvit_light_tiny"])  # the official default 0.2
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for layer in v.layers for b in layer.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_shiftvit_init_is_truncated_normal_with_zero_biases():
    v = spach.create_model("shiftvit_light_tiny", **{**TINY["shiftvit_light_tiny"], "embed_dim": 96})
    w = v.layers[0].blocks[0].mlp.fc1.weight  # timm's trunc_normal_ (std 0.02, cut at +-2: the official init)
    assert 0.018 < w.std() < 0.022 and abs(w.mean()) < 0.002
    assert torch.all(v.layers[0].blocks[0].mlp.fc1.bias == 0) and torch.all(v.norm.weight == 1)


@pytest.mark.parametrize("name", ["shiftvit_light_base", "shiftvit_r4_base", "shiftvit_r2_base"])
def test_shiftvit_base_models_shift_c_over_16_channels_per_group(name):
    # widths 48..384: C // 16 and C // 12 differ in every stage, so the outputs tell the two apart
    kw = dict(embed_dim=48, depths=(1, 1, 1, 1), img_size=32, num_classes=5)
    model = randomize_(spach.create_model(name, **kw)).eval()
    assert [b.g for layer in model.layers for b in layer.blocks] == [3, 6, 12, 24]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, shiftvit_forward(model.state_dict(), x, n_div=16), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out, shiftvit_forward(model.state_dict(), x, n_div=12), rtol=1e-2, atol=1e-2)
