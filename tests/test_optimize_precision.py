"""`spach.optimize(..., dtype="bf16", precision="weights")`: weights converted once, LayerNorm kept fp32."""
import pytest
import torch
from conftest import randomize_

import spach
from spach.errors import SpachError

ARCH = [[("conv", 1)], [("attn", 1)], [("mlp", 1)], [("attn", 1)]]


def _model() -> spach.SpachNet:
    cfg = dict(net_arch=ARCH, hidden_dim=32, num_heads=4, patch_size=2, img_size=32, num_classes=7)
    return randomize_(spach.create_model("spach", **cfg)).eval()


def test_bf16_weights_matches_fp32_and_keeps_layernorm_fp32():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    net = _model()
    ref = spach.optimize(net, "cpu", "fp32")(x)
    fast = spach.optimize(net, "cpu", "bf16", precision="weights")
    out = fast(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-2
    for m in fast.model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert m.weight.dtype == torch.float32
        elif isinstance(m, torch.nn.Linear):
            assert m.weight.dtype == torch.bfloat16


def test_autocast_precision_leaves_weights_fp32_and_unknown_precision_fails():
    net = _model()
    spach.optimize(net, "cpu", "bf16")
    assert all(p.dtype == torch.float32 for p in net.parameters())
    with pytest.raises(SpachError):
        spach.optimize(net, "cpu", "bf16", precision="half")
