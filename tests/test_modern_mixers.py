"""The mixers that came after SPACH (DESIGN.md 2c): window attention, large-kernel depthwise conv, gMLP's
spatial gating and focal modulation. Each equals timm's module with the same (random) weights, is
counted exactly (parameters and MACs against hand formulas), builds and trains in both layouts, and
runs in a tiny battle."""
import io
import json
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import randomize_
from test_battle import TINY
from timm.layers import GatedMlp
from timm.models.convnext import ConvNeXtBlock
from timm.models.focalnet import FocalModulation
from timm.models.mlp_mixer import SpatialGatingUnit
from timm.models.swin_transformer import SwinTransformerBlock, get_relative_position_index

import spach
from spach.battle.runner import run_battle
from spach.battle.study import parse_study
from spach.export import TOLERANCE, export
from spach.files import read_jsonl
from spach.models.flops import count_macs, count_module_macs, count_params
from spach.models.mixers import MixerContext, build_mixer, canonical_mixer
from spach.models.window import relative_position_index
from spach.train import engine
from spach.train.evaluate import evaluate_checkpoint
from spach.train.presets import resolve

MODERN = ("window4", "dwconv7", "gmlp", "focal2")


def _mixer(name: str, dim: int = 16, grid=(8, 8), num_heads: int = 2, block_index: int = 0, seed: int = 0) -> nn.Module:
    ctx = MixerContext(dim=dim, grid_size=grid, num_heads=num_heads, block_index=block_index)
    return randomize_(build_mixer(name, ctx), seed).eval()


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.abs().max() > 0.01  # a real comparison, not zeros against zeros
    return (a - b).abs().max().item()


# --- equal to timm's modules, weights copied ------------------------------------------------------
@pytest.mark.parametrize("grid, window, block_index", [
    ((8, 8), 4, 0), ((8, 8), 4, 1), ((14, 14), 7, 1), ((12, 6), 3, 1),
    ((8, 4), 4, 1),   # shifted along the height only: the width is one window
    ((4, 4), 7, 1),   # a grid no larger than the window: one window, no shift (Swin's rule)
])
def test_window_attention_equals_timm_swin_block_attention(grid, window, block_index):
    dim, heads = 16, 2
    mine = _mixer(f"window{window}", dim, grid, heads, block_index)
    ref = SwinTransformerBlock(dim, grid, num_heads=heads, window_size=window, shift_size=window // 2 * block_index).eval()
    assert ref.window_size == (mine.wh, mine.ww) and ref.shift_size == (mine.sh, mine.sw)
    with torch.no_grad():
        for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"):
            ref.attn.get_parameter(name).copy_(mine.get_parameter(name))
        x = torch.randn(3, *grid, dim)
        err = _max_error(mine(x), ref._attn(x))
    print(f"window{window} grid {grid} block {block_index}: max abs error against timm {err:.1e}")
    assert err < 1e-5


def test_relative_position_index_is_swins():
    for wh, ww in ((4, 4), (3, 5), (7, 7)):
        assert torch.equal(relative_position_index(wh, ww), get_relative_position_index(wh, ww))


@pytest.mark.parametrize("k", [3, 7, 31])
def test_dwconv_equals_conv2d_and_timm_convnext_conv_dw(k):
    dim = 16
    mine = _mixer(f"dwconv{k}", dim)
    ref = ConvNeXtBlock(dim, kernel_size=k).conv_dw.eval()
    with torch.no_grad():
        ref.weight.copy_(mine.conv.weight)
        ref.bias.copy_(mine.conv.bias)
        x = torch.randn(2, 8, 8, dim)
        y = mine(x).permute(0, 3, 1, 2)
        plain = F.conv2d(x.permute(0, 3, 1, 2), mine.conv.weight, mine.conv.bias, padding=k // 2, groups=dim)
        err = _max_error(y, ref(x.permute(0, 3, 1, 2)))
        torch.testing.assert_close(y, plain)
    print(f"dwconv{k}: max abs error against timm ConvNeXt conv_dw {err:.1e}")
    assert err < 1e-5


def test_gmlp_equals_timm_gated_mlp_with_spatial_gating_unit():
    dim, grid = 16, (8, 6)
    n = grid[0] * grid[1]
    mine = _mixer("gmlp", dim, grid)
    sgu = partial(SpatialGatingUnit, seq_len=n, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ref = GatedMlp(dim, 2 * dim, act_layer=nn.GELU, gate_layer=sgu).eval()
    with torch.no_grad():
        for a, b in (("fc1", "fc1"), ("fc2", "fc2"), ("gate.norm", "norm"), ("gate.proj", "token_proj")):
            ref.get_submodule(a).load_state_dict(mine.get_submodule(b).state_dict())
        x = torch.randn(3, *grid, dim)
        err = _max_error(mine(x).reshape(3, n, dim), ref(x.reshape(3, n, dim)))
    print(f"gmlp: max abs error against timm GatedMlp + SpatialGatingUnit {err:.1e}")
    assert err < 1e-5


@pytest.mark.parametrize("level", [1, 2, 3])
def test_focal_equals_timm_focal_modulation(level):
    dim = 16
    mine = _mixer(f"focal{level}", dim)
    ref = FocalModulation(dim, focal_window=3, focal_level=level).eval()
    assert ref.kernel_sizes == [m.kernel_size[0] for m in mine.focal_layers]
    with torch.no_grad():
        for name in ("f", "h", "proj"):
            ref.get_submodule(name).weight.copy_(mine.get_submodule(name).weight[:, :, None, None])
            ref.get_submodule(name).bias.copy_(mine.get_submodule(name).bias)
        for theirs, ours in zip(ref.focal_layers, mine.focal_layers):
            theirs[0].weight.copy_(ours.weight)
        x = torch.randn(2, 8, 8, dim)
        err = _max_error(mine(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    print(f"focal{level}: max abs error against timm FocalModulation {err:.1e}")
    assert err < 1e-5


# --- counted exactly -------------------------------------------------------------------------------
def _hand(name: str, h: int, w: int, c: int, heads: int = 2) -> tuple[int, int]:
    """(parameters, MACs per image) by hand, on an h x w grid of width c (DESIGN.md 2c's per-token counts)."""
    n = h * w
    if name.startswith("window"):
        m = min(int(name[6:]), h)  # square grids here
        return 4 * c * c + 4 * c + (2 * m - 1) ** 2 * heads, n * (4 * c * c + 2 * m * m * c)
    if name.startswith("dwconv"):
        k = int(name[6:])
        return k * k * c + c, n * k * k * c
    if name == "gmlp":  # Linear(C, 2C), LN(C), the N x N map and its bias, Linear(C, C)
        return 2 * c * c + 2 * c + 2 * c + n * n + n + c * c + c, n * (3 * c * c + n * c)
    level = int(name[5:])
    kernels = sum((3 + 2 * i) ** 2 for i in range(level))
    f = c * (2 * c + level + 1)
    return f + 2 * c + level + 1 + c * kernels + 2 * (c * c + c), n * (f + 2 * c * c + c * kernels)


@pytest.mark.parametrize("name", [*MODERN, "window8", "dwconv31", "focal3"])
def test_parameters_and_macs_match_hand_counts(name):
    params, macs = _hand(name, 8, 8, 24)
    mixer = _mixer(name, 24, (8, 8))
    assert count_params(mixer) == params
    assert count_module_macs(mixer, torch.randn(1, 8, 8, 24)) == macs
    # in a whole model: the same model with the mixer swapped for "conv" (no module) differs by exactly the mixers
    arch = lambda m: [[("conv", 1)], [(m, 2)], [(m, 1)]]  # noqa: E731
    kw = dict(hidden_dim=12, num_heads=2, patch_size=4, img_size=64, num_classes=3)
    with_mixer = spach.create_model("spach", net_arch=arch(name), **kw)
    without = spach.create_model("spach", net_arch=arch("conv"), **kw)
    (p16, m16), (p8, m8) = _hand(name, 8, 8, 24), _hand(name, 4, 4, 48)
    assert count_macs(with_mixer) - count_macs(without) == 2 * m16 + m8
    assert count_params(with_mixer) - count_params(without) == 2 * p16 + p8 + 2 * 24 * 3 + 48 * 3  # + LN1 and gamma


# --- how they sit in the skeleton -----------------------------------------------------------------
def test_odd_blocks_of_a_window_run_are_shifted_and_a_shared_mixer_is_not():
    def shifts(**kw):
        m = spach.create_model("spach", **{"hidden_dim": 16, "num_heads": 2, "patch_size": 4, "img_size": 32, **kw})
        return [(b.mixer.sh, b.mixer.sw) if b.mixer is not None else None for b in m.stages[-1].blocks]

    assert shifts(net_arch=[("window4", 3)]) == [(0, 0), (2, 2), (0, 0)]
    # the first block of a window run is unshifted whatever precedes it in the stage
    assert shifts(net_arch=[[("conv", 1), ("window4", 2)]]) == [None, (0, 0), (2, 2)]
    assert shifts(net_arch=[("window", 2)], img_size=56) == [(0, 0), (3, 3)]  # `window` is window7
    assert shifts(net_arch=[("window4", 2)], shared_spatial_func=True) == [(0, 0), (0, 0)]


def test_numbered_names_resolve_and_list():
    assert [canonical_mixer(n) for n in ("window", "window4", "dwconv", "dwconv31", "focal", "focal3", "gmlp")] == [
        "window7", "window4", "dwconv7", "dwconv31", "focal2", "focal3", "gmlp"]
    assert {"window7", "dwconv7", "gmlp", "focal2"} <= set(spach.list_mixers())
    assert {"window<window_size>", "dwconv<kernel_size>", "focal<focal_level>"} <= set(spach.list_mixers(forms=True))
    m = spach.create_model("spach", net_arch=[("dwconv", 1)], hidden_dim=8, patch_size=4, img_size=32)
    assert m.config.net_arch == [[("dwconv7", 1)]] and m.family == "dwconv7"
    with pytest.raises(ValueError, match="already registered"):
        spach.register_mixer("dwconv5")(nn.Identity)
    with pytest.raises(ValueError, match="an integer argument"):
        spach.register_mixer("test_numbered", param="size")(nn.Identity)


@pytest.mark.parametrize("kw, match", [
    (dict(net_arch=[("window", 1)], img_size=32),   # 8x8 grid, 7x7 windows
     r"^window7: 7x7 windows do not tile this stage's 8x8 token grid; name a window size dividing 8 \(window<M>, e.g. window4\), "
     r"or an img_size whose token grids 7 divides$"),
    (dict(net_arch=[("window0", 1)]), r"^window0: the window size must be at least 1"),
    (dict(net_arch=[("dwconv4", 1)]), r"^dwconv4: the kernel size must be odd .*use e.g. dwconv7"),
    (dict(net_arch=[("focal0", 1)]), r"^focal0: focal modulation needs at least 1 level"),
    (dict(net_arch=[("windows", 1)]), r"unknown spatial mixer 'windows'; known: .*dwconv<kernel_size>.*window<window_size>"),
])
def test_bad_mixer_settings_are_one_line_errors(kw, match):
    with pytest.raises(spach.SpachError, match=match) as e:
        spach.create_model("spach", **{"hidden_dim": 8, "num_heads": 2, "patch_size": 4, "img_size": 32, **kw})
    assert "\n" not in str(e.value)


def test_a_grid_the_window_does_not_tile_and_gmlps_grid_are_refused_at_run_time():
    window = spach.create_model("spach", net_arch=[("window4", 2)], hidden_dim=8, num_heads=2, patch_size=4, img_size=32)
    assert window(torch.randn(1, 3, 48, 48)).shape == (1, 1000)  # 12x12: the 4x4 windows tile it
    with pytest.raises(spach.SpachError, match=r"^window attention: 4x4 windows do not tile a 10x10 token grid; run the model"):
        window(torch.randn(1, 3, 40, 40))
    traced = torch.fx.symbolic_trace(window.eval())  # the check stays in an FX graph (timm's feature extraction)
    with pytest.raises(spach.SpachError, match="4x4 windows do not tile a 10x10 token grid"):
        traced(torch.randn(1, 3, 40, 40))
    gmlp = spach.create_model("spach", net_arch=[("gmlp", 1)], hidden_dim=8, patch_size=4, img_size=32)
    assert gmlp.fixed_input_size and gmlp.pretrained_cfg["fixed_input_size"]
    with pytest.raises(spach.SpachError, match="gMLP gating mixer's token grid: built for 8x8, got 12x12"):
        gmlp(torch.randn(1, 3, 48, 48))


def test_gmlp_gate_starts_as_identity():
    m = spach.create_model("spach", net_arch=[("gmlp", 1)], hidden_dim=8, patch_size=4, img_size=32)
    gate = m.stages[0].blocks[0].mixer.token_proj
    assert torch.equal(gate.bias, torch.ones(64)) and gate.weight.abs().max() < 1e-4  # not the backbone's xavier init


def test_the_relative_position_bias_table_skips_weight_decay():
    m = spach.create_model("spach", net_arch=[("window4", 2)], hidden_dim=8, num_heads=2, patch_size=4, img_size=32)
    assert {"stages.0.blocks.0.mixer.relative_position_bias_table",
            "stages.0.blocks.1.mixer.relative_position_bias_table"} <= m.no_weight_decay()


@pytest.mark.parametrize("name", MODERN)
def test_modern_mixers_work_in_both_layouts_and_train(name):
    for arch in ([(name, 2)], [[("conv", 1)], [(name, 2)], [(name, 1), ("attn", 1)]]):
        m = spach.create_model("spach", net_arch=arch, hidden_dim=16, num_heads=2, patch_size=4, img_size=32, num_classes=3)
        randomize_(m)
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_a_tiny_battle_with_one_contestant_per_modern_mixer(tmp_path):
    """The battle's scale: 1-channel 32x32 images, patch 4, an 8x8 token grid; one epoch each."""
    text = TINY.format(epochs=1, second="attn", mixer="attn", study_extra="").replace("seeds = [0, 1]", "seeds = [0]")
    for name in MODERN:
        text += (f'\n[[contestant]]\nname = "{name}"\n'
                 f'arch = {{ net_arch = [["{name}", 2]], hidden_dim = 8, patch_size = 4, num_heads = 2 }}\n')
    out = tmp_path / "b"
    run_battle(parse_study(text), out, report=False, stream=io.StringIO())
    ledger = read_jsonl(out / "results.jsonl")
    assert {r["contestant"]: r["status"] for r in ledger} == {n: "done" for n in ("conv", "attn", *MODERN)}
    costs = json.loads((out / "costs.json").read_text())
    assert {n: costs[n]["family"] for n in MODERN} == {n: n for n in MODERN}
    assert all(costs[n]["macs"] > costs["conv"]["macs"] for n in MODERN)


def test_a_window_model_trained_at_32_pixels_evaluates_and_exports(tmp_path):
    """Window sizes that tile the battle's grids need not tile 224's (window4: 56, 28, 14, 7): the
    evaluation's and the export's model probes are built at the run's size, not the model's default."""
    run = tmp_path / "run"
    kw = dict(net_arch=[[["conv", 1]], [["window4", 2]], [["window4", 1]]], hidden_dim=8, num_heads=2, patch_size=4)  # 224: 14x14
    summary = engine.train(resolve("tiny", model="spach", model_kwargs=kw, output=str(run), progress="none", epochs=1))
    r = evaluate_checkpoint(None, str(run / "best.pth"), None, "tiny", batch_size=16)
    assert abs(r["top1"] - summary["best_top1"]) < 1e-6
    assert export(None, tmp_path / "w.pt", "torchscript", pretrained=str(run / "best.pth"))["max_abs_error"] <= TOLERANCE
