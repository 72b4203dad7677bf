"""The mixer registry: a new spatial mixer is a small class and one registration line."""
import torch
import torch.nn as nn

import spach
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
    import pytest

    with pytest.raises(ValueError, match="already registered"):
        spach.register_mixer("attn")(Pool)
