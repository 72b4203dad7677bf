"""The fast modules against a straightforward transcription of the formulas (the oracle).

Our modules keep tokens as channels-last images `(B, H, W, C)`, use fused attention and multiply the
token-mixing weights from the left; the oracle (`official_reference`) works on official `(B, N, C)`
tokens with transposes and an explicit softmax. Same weights, same input => same output: fp32 within
a relative error of 1e-5, bf16 autocast within 2e-2.
"""
import collections

import official_reference as ref
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from torch.utils._python_dispatch import TorchDispatchMode

import spach
from spach.models.blocks import LayerNorm

HEADS = 4
ARCH = [[("conv", 1)], [("attn", 1)], [("mlp", 1)], [("attn", 1)]]
FP32_TOL, BF16_TOL = 1e-5, 2e-2


def _model(**kw) -> spach.SpachNet:
    cfg = dict(net_arch=ARCH, hidden_dim=32, num_heads=HEADS, patch_size=2, img_size=32, num_classes=7)
    return randomize_(spach.create_model("spach", **{**cfg, **kw})).eval()


def _rel_err(ours: torch.Tensor, oracle: torch.Tensor) -> float:
    return ((ours.float() - oracle).abs().max() / oracle.abs().max()).item()


def _official_block_sd(block: torch.nn.Module) -> dict:
    """The block's weights under official names, prefix `blocks.0` (single-stage layout)."""
    return spach.spach_to_official({f"stages.0.blocks.0.{k}": v for k, v in block.state_dict().items()})


def _stage_input(stage: int, batch: int = 3) -> tuple[torch.nn.Module, torch.Tensor]:
    model = _model()
    torch.manual_seed(stage)
    width, (h, w) = model.config.width(stage), model.config.grid(stage)
    return model.stages[stage], torch.randn(batch, h, w, width)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


@pytest.mark.parametrize("stage", [0, 1, 2], ids=["conv", "attn", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixing_block_matches_the_oracle(stage, dtype):
    blocks, x = _stage_input(stage)
    block = blocks.blocks[0]
    b, h, w, c = x.shape
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = block(x)
    with torch.no_grad():
        oracle = ref.block(_tokens(x), _official_block_sd(block), "blocks.0", h, w, HEADS)
    assert _rel_err(_tokens(ours), oracle) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("stage", [1, 2], ids=["attn", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spatial_mixer_matches_the_oracle(stage, dtype):
    blocks, x = _stage_input(stage)
    mixer = blocks.blocks[0].mixer
    sd = _official_block_sd(blocks.blocks[0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = mixer(x)
    with torch.no_grad():
        p = "blocks.0.spatial_func"
        oracle = ref.attention(_tokens(x), sd, p, HEADS) if stage == 1 else ref.token_mlp(_tokens(x), sd, p)
    assert _rel_err(_tokens(ours), oracle) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_downsample_matches_the_oracle(dtype):
    _, x = _stage_input(0)  # the downsample opening stage 1 reads stage-0 tokens
    down = _model().stages[1].downsample
    b, h, w, c = x.shape
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = down(x)
    with torch.no_grad():
        img = F.conv2d(_tokens(x).transpose(1, 2).reshape(b, c, h, w), down.conv.weight, stride=2)
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        var = img.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        img = (img - mean) / torch.sqrt(var + 1e-5) * down.norm.weight[:, None, None] + down.norm.bias[:, None, None]
        oracle = img.flatten(2).transpose(1, 2)
    assert _rel_err(_tokens(ours), oracle) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_whole_hybrid_model_matches_the_oracle(dtype):
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = model(x)
    with torch.no_grad():
        oracle = ref.forward(spach.spach_to_official(model.state_dict()), x, HEADS)
    assert _rel_err(ours, oracle) < (FP32_TOL if dtype == torch.float32 else BF16_TOL)


def test_gradients_match_the_oracle_in_training_mode():
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    ours = {k: p.grad for k, p in model.named_parameters()}

    sd = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in spach.spach_to_official(model.state_dict()).items()}
    ref.forward(sd, x, HEADS).square().mean().backward()
    for key, grad in spach.official_to_spach({k: v.grad for k, v in sd.items() if v.grad is not None}).items():
        assert _rel_err(ours[key], grad.reshape(ours[key].shape)) < 1e-4, key


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_inference_forward_makes_no_layout_copies():
    """Tokens stay channels-last end to end: the only copy is the input image to channels-last."""
    model = _model()
    with torch.no_grad(), _OpCounter() as counter:
        model(torch.randn(2, 3, 32, 32))
    copies = {op: n for op, n in counter.ops.items() if op in ("clone", "copy_", "_to_copy", "contiguous", "_unsafe_view")}
    assert copies == {"clone": 1}
    assert counter.ops["_scaled_dot_product_flash_attention_for_cpu"] == 2  # fused attention, no explicit softmax
    assert "softmax" not in counter.ops and "_softmax" not in counter.ops


@pytest.mark.parametrize("width", [24, 32])
def test_layernorm_of_a_bf16_input_matches_fp32_rounded(width):
    """The block LayerNorm normalises narrow bf16 widths in fp32: the result is the fp32 one, rounded."""
    norm = randomize_(LayerNorm(width, eps=1e-6))
    x = torch.randn(4, 5, width).bfloat16().requires_grad_()
    y = norm(x)
    expected = F.layer_norm(x.detach().float(), (width,), norm.weight, norm.bias, 1e-6)
    assert y.dtype == torch.bfloat16 and list(norm.state_dict()) == ["weight", "bias"]
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
