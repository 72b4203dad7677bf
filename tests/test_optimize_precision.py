"""`spach.optimize(..., dtype="bf16", precision="weights")`: weights converted once, LayerNorm kept fp32."""
import pytest
import torch
from conftest import randomize_

import spach
from spach.bench import optimize as opt
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


def test_auto_precision_keeps_the_faster_setting_once_and_never_converts_the_model(monkeypatch):
    opt._precision_choices.clear()
    torch.manual_seed(0)
    net = _model()
    x = torch.randn(2, 3, 32, 32)
    ref = spach.optimize(net, "cpu", "fp32")(x)
    fast = spach.optimize(net, "cpu", "bf16")
    out = fast(x)
    assert fast.precision in ("autocast", "weights") and out.dtype == torch.float32
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-2
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert len(opt._precision_choices) == 1
    # decided once per (config, device, dtype, batch shape): a second optimize() does not time again
    monkeypatch.setattr(opt, "time_once", lambda *a: pytest.fail("measured twice"))
    again = spach.optimize(_model(), "cpu", "bf16")
    again(x)
    assert again.precision == fast.precision


def _timed(weights_s: float, autocast_s: float):
    return lambda fn, device: (fn(), weights_s if fn.args[-1] == "weights" else autocast_s)[1]


def test_auto_precision_prefers_weights_when_faster_and_autocast_when_they_disagree(monkeypatch):
    x = torch.randn(2, 3, 32, 32)
    opt._precision_choices.clear()
    monkeypatch.setattr(opt, "time_once", _timed(weights_s=1.0, autocast_s=2.0))
    fast = spach.optimize(_model(), "cpu", "bf16")
    fast(x)
    assert fast.precision == "weights" and fast.model.head.weight.dtype == torch.bfloat16

    opt._precision_choices.clear()
    monkeypatch.setattr(opt, "time_once", _timed(weights_s=2.0, autocast_s=1.0))
    slow = spach.optimize(_model(), "cpu", "bf16")
    slow(x)
    assert slow.precision == "autocast" and slow.model.head.weight.dtype == torch.float32

    opt._precision_choices.clear()
    cast = opt.cast_weights

    def broken_cast(model, dtype):
        cast(model, dtype).head.weight.data.mul_(-1)
        return model

    monkeypatch.setattr(opt, "time_once", _timed(weights_s=1.0, autocast_s=2.0))
    monkeypatch.setattr(opt, "cast_weights", broken_cast)
    broken = spach.optimize(_model(), "cpu", "bf16")
    broken(x)
    assert broken.precision == "autocast"
