"""The benchmark baseline (benchmarks/official_layers.py, a module port of the official layers) computes
what the formula transcription (official_reference.py) computes, from the same official state dict."""
import importlib.util
import pathlib

import official_reference as ref
import pytest
import torch
from conftest import randomize_

import spach

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "official_layers.py"
_spec = importlib.util.spec_from_file_location("official_layers", _PATH)
official_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(official_layers)

ARCHS = {
    "multi_stage_hybrid": dict(net_arch=[[("conv", 1)], [("attn", 1)], [("mlp", 1)], [("conv", 1), ("attn", 1)]],
                               hidden_dim=16, num_heads=2, patch_size=2),
    "single_stage_attn": dict(net_arch=[("attn", 2)], hidden_dim=24, num_heads=3, patch_size=4),
    "conv4_stem": dict(net_arch=[[("conv", 1)], [("mlp", 1)], [("conv", 1)], [("attn", 1)]], hidden_dim=8, num_heads=1, patch_size=2, stem_type="conv4"),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_official_layers_match_the_transcription(arch):
    cfg = ARCHS[arch]
    model = randomize_(spach.create_model("spach", img_size=32, num_classes=5, **cfg)).eval()
    sd = spach.spach_to_official(model.state_dict())
    port = official_layers.OfficialNet.from_state_dict(sd, cfg["num_heads"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.forward(sd, x, cfg["num_heads"])
        torch.testing.assert_close(port(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_official_layers_train_like_the_transcription():
    cfg = ARCHS["multi_stage_hybrid"]
    model = randomize_(spach.create_model("spach", img_size=32, num_classes=5, **cfg))
    sd = spach.spach_to_official(model.state_dict())
    port = official_layers.OfficialNet.from_state_dict(sd, cfg["num_heads"]).train()
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in sd.items()}
    x = torch.randn(2, 3, 32, 32)
    port(x).square().mean().backward()
    ref.forward(leaves, x, cfg["num_heads"]).square().mean().backward()
    grads = dict(port.named_parameters())
    for key, leaf in leaves.items():
        if leaf.grad is not None:
            torch.testing.assert_close(grads[key].grad, leaf.grad, rtol=1e-4, atol=1e-4 * leaf.grad.abs().max().item())
