"""MACs of each mixer, block and whole model against hand-counted formulas; throughput runs."""
import pytest
import torch
import torch.nn as nn

import spach
from spach.bench.profile import count_macs, count_module_macs, throughput
from spach.models.mixers import MixerContext, build_mixer

B, H, W, C, HEADS = 1, 6, 5, 16, 4
N = H * W


def _ctx(**kw) -> MixerContext:
    return MixerContext(dim=C, grid_size=(H, W), num_heads=HEADS, **kw)


def _x() -> torch.Tensor:
    return torch.randn(B, H, W, C)


def test_attention_macs():
    # qkv N*C*3C, q k^T N*N*C, attn v N*N*C, proj N*C*C
    assert count_module_macs(build_mixer("attn", _ctx()), _x()) == 4 * N * C * C + 2 * N * N * C


def test_token_mlp_macs():
    hidden = int(N * 0.5)
    assert count_module_macs(build_mixer("mlp", _ctx()), _x()) == 2 * N * hidden * C


@pytest.mark.parametrize("mixer", ["conv", "attn", "mlp"])
def test_mixing_block_macs(mixer):
    block = spach.MixingBlock(C, build_mixer(mixer, _ctx()), channel_ratio=2.0)
    mixer_macs = {"conv": 0, "attn": 4 * N * C * C + 2 * N * N * C, "mlp": 2 * N * int(N * 0.5) * C}[mixer]
    cpe, channel_mlp = 9 * N * C, 2 * N * C * 2 * C
    assert count_module_macs(block, _x()) == mixer_macs + cpe + channel_mlp


def test_whole_multi_stage_model_macs():
    model = spach.create_model("spach", net_arch=[[("conv", 1)], [("attn", 1)], [("mlp", 1)], [("attn", 1)]],
                               hidden_dim=8, num_heads=2, patch_size=4, img_size=64, num_classes=10)
    total, n = 3 * 16 * 8 * 16 * 16, 16 * 16  # stem: per output pixel 3*4*4 inputs x 8 outputs
    for i, mixer in enumerate(["conv", "attn", "mlp", "attn"]):
        c = 8 * 2**i
        if i:
            total += n // 4 * 4 * (c // 2) * c  # 2x2 stride-2 conv, C/2 -> C
            n //= 4
        total += {"conv": 0, "attn": 4 * n * c * c + 2 * n * n * c, "mlp": 2 * n * int(n * 0.5) * c}[mixer]
        total += 9 * n * c + 4 * n * c * c
    total += 64 * 10  # head
    assert count_macs(model) == total


class Shift(nn.Module):
    """A mixer built from ops the FLOP counter does not count; it reports its own MACs."""

    def forward(self, x):
        return torch.roll(x, 1, dims=1) * 0.5

    def uncounted_macs(self, x):
        return x.numel()


def test_a_module_can_add_the_macs_the_counter_misses():
    block = spach.MixingBlock(C, Shift(), cpe=False)
    assert count_module_macs(block, _x()) == N * C + 2 * N * C * 2 * C


def test_throughput_infer_and_train_leave_the_model_unchanged():
    model = spach.create_model("spach", net_arch=[("attn", 1)], hidden_dim=16, num_heads=2, patch_size=8, img_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert throughput(model, batch_size=2, warmup=1, repeats=2) > 0
    assert throughput(model, batch_size=2, mode="train", warmup=1, repeats=2, dtype=torch.bfloat16) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
