"""The mixer registry: a new spatial mixer is a small class and one registration line."""
import pytest
import torch
import torch.nn as nn
from conftest import randomize_

import spach
from spach.bench import BenchSettings, bench_model
from spach.models.flops import count_macs, count_module_macs
from spach.models.mixers import MixerContext, build_mixer


@spach.register_mixer("test_pool")
class Pool(nn.Module):
    """PoolFormer-style token mixing (the README's worked example)."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

    def forward(self, x):
        y = x.permute(0, 3, 1, 2)
        return (self.pool(y) - y).permute(0, 2, 3, 1)


def test_custom_mixer_works_in_both_layouts_and_trains_one_step():
    assert "test_pool" in spach.list_mixers()
    for arch in ([("test_pool", 2)], [[("conv", 1)], [("test_pool", 1)], [("test_pool", 1), ("attn", 1)]]):
        m = spach.create_model("spach", net_arch=arch, hidden_dim=16, num_heads=2, patch_size=4, img_size=32, num_classes=3)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        before = [p.detach().clone() for p in m.parameters()]
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert m.family == "hybrid"


def test_builder_passes_only_what_the_mixer_asks_for():
    ctx = MixerContext(dim=16, grid_size=(4, 8), num_heads=4, token_ratio=0.25)
    attn = build_mixer("attn", ctx)
    assert attn.num_heads == 4 and attn.qkv.in_features == 16
    mlp = build_mixer("mlp", ctx)
    assert mlp.fc1.weight.shape == (8, 32)
    assert build_mixer("pass", ctx) is None and build_mixer("conv", ctx) is None


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        spach.register_mixer("attn")(Pool)


# --- the mixers beyond the paper: shift, smlp, pool, identity ------------------------------------
NEW_MIXERS = ("shift", "smlp", "pool", "identity")


def _mixer_macs(name: str, h: int, w: int, c: int) -> int:
    """Hand counts per image on an h x w grid of width c (elementwise ops count 0, as everywhere)."""
    return {
        "shift": 0,                                      # data movement only
        "identity": 0,
        "pool": 9 * h * w * c,                           # a 3x3 window per output, like a depthwise conv
        "smlp": h * w * c * (w + h) + 3 * h * w * c * c,  # width mix, height mix, fuse(3C -> C)
    }[name]


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_new_mixer_macs_match_a_hand_count(name):
    ctx = MixerContext(dim=24, grid_size=(6, 4))
    mixer = build_mixer(name, ctx).eval()
    assert count_module_macs(mixer, torch.randn(1, 6, 4, 24)) == _mixer_macs(name, 6, 4, 24)
    # in a whole model: the same model with the mixer swapped for "conv" (no module) differs by exactly the mixers
    arch = lambda m: [[("conv", 1)], [(m, 2)], [(m, 1)]]  # noqa: E731
    kw = dict(hidden_dim=12, num_heads=2, patch_size=4, img_size=64, num_classes=3)
    with_mixer = count_macs(spach.create_model("spach", net_arch=arch(name), **kw))
    without = count_macs(spach.create_model("spach", net_arch=arch("conv"), **kw))
    assert with_mixer - without == 2 * _mixer_macs(name, 8, 8, 24) + _mixer_macs(name, 4, 4, 48)


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_new_mixers_work_in_both_layouts_and_train(name):
    for arch, size in (([(name, 2)], 32), ([[("conv", 1)], [(name, 1)], [(name, 1), ("attn", 1)]], 32)):
        m = spach.create_model("spach", net_arch=arch, hidden_dim=16, num_heads=2, patch_size=4, img_size=size, num_classes=3)
        randomize_(m)
        x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in m.parameters())
    assert m.fixed_input_size == (name == "smlp")


def test_new_mixers_compute_what_design_2b_says():
    x = torch.randn(2, 5, 6, 24)
    assert torch.equal(build_mixer("identity", MixerContext(dim=24, grid_size=(5, 6)))(x), x)
    pool = build_mixer("pool", MixerContext(dim=24, grid_size=(5, 6)))
    y = x.permute(0, 3, 1, 2)
    corner = y[:, :, :2, :2].mean(dim=(2, 3)) - y[:, :, 0, 0]  # padding not counted in the average
    torch.testing.assert_close(pool(x)[:, 0, 0], corner)
    shift = build_mixer("shift", MixerContext(dim=24, grid_size=(5, 6)))  # g = 24 // 12 = 2
    s = shift(x)
    assert torch.equal(s[:, :, :-1, 0:2], x[:, :, 1:, 0:2]) and torch.all(s[:, :, -1, 0:2] == 0)  # left along W
    assert torch.equal(s[:, 1:, :, 6:8], x[:, :-1, :, 6:8]) and torch.all(s[:, 0, :, 6:8] == 0)   # down along H
    assert torch.equal(s[..., 8:], x[..., 8:])
    smlp = build_mixer("smlp", MixerContext(dim=24, grid_size=(5, 6)))
    assert smlp.proj_w.weight.shape == (6, 6) and smlp.proj_h.weight.shape == (5, 5)
    with torch.no_grad():
        z = nn.functional.gelu(x)
        a = torch.einsum("vw,bhwc->bhvc", smlp.proj_w.weight, z) + smlp.proj_w.bias[:, None]
        b = torch.einsum("gh,bhwc->bgwc", smlp.proj_h.weight, z) + smlp.proj_h.bias[:, None, None]
        torch.testing.assert_close(smlp(x), torch.cat([z, a, b], -1) @ smlp.fuse.weight.t())


def test_smlp_mixer_is_tied_to_its_grid_and_shift_needs_channels():
    m = spach.create_model("spach", net_arch=[[("conv", 1)], [("smlp", 1)]], hidden_dim=16, patch_size=4, img_size=32)
    with pytest.raises(spach.SpachError, match="sparse-MLP mixer's token grid: built for 4x4, got 6x6"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(spach.SpachError, match="width 8 moves none"):
        spach.create_model("spach", net_arch=[("shift", 1)], hidden_dim=8, patch_size=4, img_size=32)


@pytest.mark.parametrize("name", NEW_MIXERS)
def test_new_mixers_in_the_benchmark(name):
    arch = [[("conv", 1)], [(name, 1)], [(name, 1)], [(name, 1)]]
    settings = BenchSettings(batch_size=2, img_size=64, quick=True, latency=False, mode="both")
    build = lambda: spach.create_model("spach", net_arch=arch, hidden_dim=16, num_heads=2, patch_size=4, img_size=64)  # noqa: E731
    rec = bench_model(build, settings)
    assert rec.infer_img_s > 0 and rec.train_img_s > 0 and rec.macs > 0
