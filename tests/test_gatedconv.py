"""The `gatedconv` block (MambaOut's Gated CNN): equal to timm's GatedConvBlock on copied random weights,
placed in the channel MLP's slot of the skeleton's block, parameters and MACs against hand formulas."""
from functools import partial

import pytest
import torch
import torch.nn as nn
from timm.layers import LayerNorm
from timm.models.mambaout import GatedConvBlock

import spach
from spach.models.flops import count_macs, count_module_macs, count_params
from spach.models.gated import GatedConv


@pytest.mark.parametrize("channel_ratio", [2.0, 4.0])  # 4: MambaOut's own 8/3 expansion
def test_equals_timms_gated_conv_block(channel_ratio):
    model = spach.create_model("spach", net_arch=[("gatedconv", 1)], hidden_dim=24, patch_size=4, img_size=32,
                               channel_ratio=channel_ratio, cpe=False)
    block = model.stages[0].blocks[0]
    ref = GatedConvBlock(24, expansion_ratio=2 * channel_ratio / 3, kernel_size=7, conv_ratio=1.0,
                         norm_layer=partial(LayerNorm, eps=1e-6)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name in ("fc1", "conv", "fc2"):
            getattr(ref, name).load_state_dict(getattr(block.mlp, name).state_dict())
        ref.norm.load_state_dict(block.norm2.state_dict())
        x = torch.randn(2, 8, 8, 24, generator=g)
        err = (block(x) - ref(x)).abs().max().item()
    print(f"channel_ratio {channel_ratio}: max abs error against timm's GatedConvBlock {err:.1e}")
    assert list(ref.split_indices) == block.mlp.split_sizes and err < 1e-6


def test_it_takes_the_channel_mlps_place():
    m = spach.create_model("spach", net_arch=[[("conv", 1)], [("gatedconv", 2)]], hidden_dim=12, patch_size=4, img_size=32,
                           drop_path_rate=0.1)
    block = m.stages[1].blocks[1]
    assert isinstance(block.mlp, GatedConv) and block.mixer is None and not hasattr(block, "norm1")
    assert block.cpe is not None and block.drop_path.drop_prob == pytest.approx(0.1)
    assert m.family == "gatedconv"
    shared = spach.create_model("spach", net_arch=[("gatedconv", 2)], hidden_dim=12, patch_size=4, img_size=32,
                                shared_spatial_func=True)
    assert shared.stages[0].blocks[0].mlp is shared.stages[0].blocks[1].mlp
    with pytest.raises(spach.SpachError, match="channel_ratio of at least 1.5"):
        spach.create_model("spach", net_arch=[("gatedconv", 1)], hidden_dim=12, patch_size=4, img_size=32, channel_ratio=1.0)


def test_params_and_macs_are_counted_exactly():
    """Per token: the linears 3hC (h = int(2/3 r C)) and the 7x7 conv 49C; a gatedconv model differs
    from a conv one of the same width by exactly (unit - channel MLP) per block."""
    unit = GatedConv(30)
    h = int(2 * 2.0 / 3 * 30)
    assert count_module_macs(unit, torch.randn(1, 5, 4, 30)) == 20 * (3 * h * 30 + 49 * 30)
    assert count_params(unit) == (2 * h * 30 + 2 * h) + (49 * 30 + 30) + (h * 30 + 30)
    arch = lambda m: [[("conv", 1)], [(m, 2)], [(m, 1)]]  # noqa: E731
    kw = dict(hidden_dim=12, num_heads=2, patch_size=4, img_size=64, num_classes=3)
    gated, conv = (spach.create_model("spach", net_arch=arch(m), **kw) for m in ("gatedconv", "conv"))
    mlp_macs = lambda c: 2 * (2 * c) * c  # noqa: E731
    unit_macs = lambda c: 3 * int(4 * c / 3) * c + 49 * c  # noqa: E731
    assert count_macs(gated) - count_macs(conv) == 64 * 2 * (unit_macs(24) - mlp_macs(24)) + 16 * (unit_macs(48) - mlp_macs(48))
    mlp_params = lambda c: 2 * (2 * c) * c + 2 * c + c  # noqa: E731
    unit_params = lambda c: count_params(GatedConv(c))  # noqa: E731
    assert count_params(gated) - count_params(conv) == 2 * (unit_params(24) - mlp_params(24)) + unit_params(48) - mlp_params(48)


def test_trains_in_both_layouts():
    for arch in ([("gatedconv", 2)], [[("conv", 1)], [("gatedconv", 1)], [("gatedconv", 1), ("attn", 1)]]):
        m = spach.create_model("spach", net_arch=arch, hidden_dim=16, num_heads=2, patch_size=4, img_size=32, num_classes=3)
        loss = nn.functional.cross_entropy(m(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())
