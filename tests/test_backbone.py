"""The one backbone: layouts, options, timm conventions, bad configurations."""
import pytest
import timm
import timm.optim
import torch
from conftest import randomize_

import spach

MS = dict(net_arch=[[("conv", 1)], [("attn", 2)], [("mlp", 2)], [("attn", 1)]], hidden_dim=8, num_heads=2, patch_size=4, img_size=64, num_classes=4)


def test_shared_spatial_mixer_is_one_tensor_per_stage():
    m = spach.create_model("spach", **{**MS, "shared_spatial_func": True})
    blocks = m.stages[1].blocks
    assert blocks[0].mixer is blocks[1].mixer
    assert blocks[0].mixer.qkv.weight.data_ptr() == blocks[1].mixer.qkv.weight.data_ptr()
    assert blocks[0].norm1 is not blocks[1].norm1 and blocks[0].gamma is not blocks[1].gamma
    unshared = spach.create_model("spach", **MS)
    per_mixer = sum(p.numel() for p in unshared.stages[1].blocks[1].mixer.parameters())
    per_mixer += sum(p.numel() for p in unshared.stages[2].blocks[1].mixer.parameters())
    assert sum(p.numel() for p in unshared.parameters()) - sum(p.numel() for p in m.parameters()) == per_mixer


def test_drop_path_schedules_and_eval_determinism():
    ms = spach.create_model("spach", **{**MS, "drop_path_rate": 0.3})
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for s in ms.stages for b in s.blocks]
    assert rates == pytest.approx([0.3 * i / 5 for i in range(6)])
    ss = spach.create_model("spach", net_arch=[("attn", 3)], hidden_dim=8, num_heads=2, patch_size=8, img_size=32, drop_path_rate=0.2)
    assert [b.drop_path.drop_prob for b in ss.stages[0].blocks] == [0.2] * 3

    randomize_(ms).eval()
    plain = spach.create_model("spach", **MS).eval()
    plain.load_state_dict(ms.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ms(x), ms(x))
        torch.testing.assert_close(ms(x), plain(x))
        ms.train()
        assert not torch.allclose(ms(x), plain(x))


def test_features_only_gives_nchw_stage_maps():
    f = spach.create_model("spach_ms_xxs_patch4_224_conv", features_only=True, img_size=64)
    feats = f(torch.randn(2, 3, 64, 64))
    assert [tuple(t.shape) for t in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    t = timm.create_model("spach_ms_xxs_patch4_224_attn", features_only=True, out_indices=(1, 3), img_size=64)
    assert [tuple(x.shape) for x in t(torch.randn(1, 3, 64, 64))] == [(1, 64, 8, 8), (1, 256, 2, 2)]
    assert t.feature_info.channels() == [64, 256] and t.feature_info.reduction() == [8, 32]


def test_forward_head_reset_classifier_and_no_weight_decay():
    m = spach.create_model("spach", **MS)
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 2, 2, 64)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features) == (2, 64)
    m.reset_classifier(11)
    assert m(x).shape == (2, 11)
    nwd = m.no_weight_decay()
    assert "stages.1.blocks.0.gamma" in nwd and "norm.weight" in nwd and "head.bias" in nwd
    assert "stages.1.blocks.0.mixer.qkv.weight" not in nwd
    groups = timm.optim.create_optimizer_v2(m, "adamw", weight_decay=0.05).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.stages[1].blocks[0].gamma) in no_decay and id(m.stages[1].blocks[0].mixer.qkv.weight) not in no_decay


def test_conv_family_block_has_no_mixer_norm_or_gamma():
    m = spach.create_model("spach", net_arch=[("conv", 1)], hidden_dim=8, patch_size=4, img_size=16)
    names = {n for n, _ in m.named_parameters()}
    assert not any(".norm1." in n or n.endswith(".gamma") for n in names)
    assert "stages.0.blocks.0.cpe.weight" in names


def test_options_cpe_layer_scale_pos_embed_and_sizes():
    no_cpe = spach.create_model("spach", **{**MS, "cpe": False})
    assert all(b.cpe is None for s in no_cpe.stages for b in s.blocks)
    no_ls = spach.create_model("spach", **{**MS, "layer_scale": None})
    assert not any(n.endswith("gamma") for n, _ in no_ls.named_parameters())
    ls = spach.create_model("spach", **{**MS, "layer_scale": 0.5})
    assert torch.all(ls.stages[1].blocks[0].gamma == 0.5)
    pe = spach.create_model("spach", **{**MS, "cpe": False, "pos_embed": True})
    assert pe.pos_embed.shape == (1, 16, 16, 8) and pe(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    gray = spach.create_model("spach", **{**MS, "in_chans": 1, "img_size": (32, 64)})
    assert gray(torch.randn(1, 1, 32, 64)).shape == (1, 4)
    assert spach.create_model("spach", **MS).family == "hybrid"


def test_conv_and_attn_models_run_at_other_resolutions_mlp_refuses():
    m = spach.create_model("spach", **{**MS, "net_arch": [[("conv", 1)], [("attn", 1)]]}).eval()
    assert m(torch.randn(1, 3, 96, 96)).shape == (1, 4)
    mlp = spach.create_model("spach", **{**MS, "net_arch": [[("conv", 1)], [("mlp", 1)]]})
    with pytest.raises(spach.SpachError, match="tie the model to its input size"):
        mlp(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("kwargs, match", [
    (dict(img_size=60), "not divisible by the total stride 32"),
    (dict(net_arch=[[("conv", 1)], [("nope", 1)]]), "unknown spatial mixer 'nope'"),
    (dict(net_arch=[("attn", 0)]), "depth >= 1"),
    (dict(net_arch=[]), "net_arch is empty"),
    (dict(stem_type="conv9"), "stem_type"),
    (dict(num_heads=3), "not divisible by num_heads"),
    (dict(bogus=1), "unknown model option"),
])
def test_bad_configurations_fail_with_clear_errors(kwargs, match):
    with pytest.raises(spach.SpachError, match=match):
        spach.create_model("spach", **{**MS, **kwargs})


def test_unknown_model_suggests_close_names():
    with pytest.raises(spach.SpachError, match="did you mean spach_ms_s_patch4_224_attn"):
        spach.create_model("spach_ms_s_patch4_224_atn")
