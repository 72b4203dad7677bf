"""timm's model contract, checked the way timm's own tests/test_models.py checks its models (forward,
backward, default cfg fields, features_only, forward_intermediates, TorchScript, FX forward/backward),
on small configs of every family the package registers."""
import math

import pytest
import timm
import torch
import torch.fx
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import spach

# Registered names with small overrides (their own widths and layouts, fewer blocks, 64x64 inputs).
SMALL = {
    "spach_xxs_patch16_224_attn": dict(img_size=64, net_arch=[("attn", 3)]),
    "spach_xxs_patch16_224_mlp": dict(img_size=64, net_arch=[("mlp", 3)]),
    "spach_ms_xxs_patch4_224_conv": dict(img_size=64),
    "spach_ms_xxs_patch4_224_mlp": dict(img_size=64),
    "spach_ms_xs_patch4_224_hybrid": dict(
        img_size=64, net_arch=[[("conv", 1)], [("conv", 1)], [("conv", 1), ("attn", 1)], [("attn", 1)]],
    ),
    "smlpnet_tiny": dict(img_size=64, depths=(1, 1, 2, 1)),
    "shiftvit_r2_tiny": dict(img_size=64, depths=(1, 1, 2, 1)),
    # the mixers after SPACH, in the layouts of registered names (`model`) with their own net_arch
    "spach_ms_gatedconv": dict(model="spach_ms_xxs_patch4_224_conv", img_size=64,
                               net_arch=[[("conv", 1)], [("gatedconv", 1)], [("gatedconv", 2)], [("gatedconv", 1)]]),
    "spach_ms_scan": dict(model="spach_ms_xxs_patch4_224_conv", img_size=64,
                          net_arch=[[("conv", 1)], [("scan", 1)], [("scan", 2)], [("scan", 1)]]),
    "spach_ss_scan": dict(model="spach_xxs_patch16_224_attn", img_size=64, net_arch=[("scan", 3)]),
    # window attention (window4: the second block of a stage shifted), large kernels, gMLP's gating, focal modulation
    **{f"spach_ms_{m}": dict(model="spach_ms_xxs_patch4_224_conv", img_size=64,
                             net_arch=[[("conv", 1)], [(m, 2)], [(m, 2)], [(m, 1)]])
       for m in ("window4", "dwconv7", "gmlp", "focal2")},
    "spach_ss_window4": dict(model="spach_xxs_patch16_224_attn", img_size=64, patch_size=4, net_arch=[("window4", 3)]),
}
NAMES = sorted(SMALL)
BATCH = 2


def _model(name: str, **kw) -> torch.nn.Module:
    cfg = {**SMALL[name], **kw}
    return timm.create_model(cfg.pop("model", name), **cfg)


def _input(model: torch.nn.Module) -> torch.Tensor:
    return torch.randn(BATCH, *model.pretrained_cfg["input_size"])


@pytest.mark.parametrize("name", NAMES)
def test_model_forward(name):
    model = _model(name).eval()
    out = model(_input(model))
    assert out.shape == (BATCH, model.num_classes) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_backward(name):
    model = _model(name, num_classes=5)
    model.train()
    out = model(_input(model))
    out.mean().backward()
    assert out.shape == (BATCH, 5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_model_default_cfgs(name):
    model = _model(name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, state_dict = model.pretrained_cfg, model.state_dict()
    pool_size, x = cfg["pool_size"], _input(model)
    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial, feat = get_spatial_dim(output_fmt), get_channel_dim(output_fmt)
    assert output_fmt == ("NHWC" if name.startswith("spach") else "NCHW")

    features = model.forward_features(x)
    pre = model.forward_head(features, pre_logits=True)
    assert (features.shape[spatial[0]], features.shape[spatial[1]]) == pool_size
    assert features.shape[feat] == model.num_features and pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    out = model(x)
    assert out.shape == pre.shape == (BATCH, model.head_hidden_size)
    model.reset_classifier(0, "")
    out = model(x)
    assert out.ndim == 4 and (out.shape[spatial[0]], out.shape[spatial[1]]) == pool_size

    out = _model(name, num_classes=0, global_pool="").eval()(x)
    assert out.ndim == 4 and (out.shape[spatial[0]], out.shape[spatial[1]]) == pool_size
    out = _model(name, num_classes=3, global_pool="").eval()(x)  # per-position logits
    assert out.shape[feat] == 3 and (out.shape[spatial[0]], out.shape[spatial[1]]) == pool_size
    with pytest.raises(spach.SpachError, match="global_pool must be 'avg'"):
        model.reset_classifier(0, "max")

    assert cfg["classifier"] + ".weight" in state_dict and cfg["first_conv"] + ".weight" in state_dict
    assert cfg["fixed_input_size"] == ("mlp" in name)  # the MLP models and gMLP


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_features(name):
    model = _model(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    x = torch.randn(BATCH, *model.pretrained_cfg["input_size"])
    outputs = model(x)
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[1] == c and o.shape[0] == BATCH and not torch.isnan(o).any()
        assert o.shape[2] <= math.ceil(x.shape[2] / r) + 1 and o.shape[3] <= math.ceil(x.shape[3] / r) + 1


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_intermediates(name):
    model = _model(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = _input(model)
    output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(info.channels())
    if name.startswith(("spach_xxs_patch16", "spach_ss_")):
        assert len(intermediates) == 3  # one per block on single-stage models, as timm's ViTs
    for r, c, o in zip(info.reduction(), info.channels(), intermediates):
        assert o.shape[1] == c
        assert o.shape[2] <= math.ceil(x.shape[2] / r) + 1 and o.shape[3] <= math.ceil(x.shape[3] / r) + 1
    torch.testing.assert_close(output, model.forward_features(x))
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(output, output3, rtol=1e-4, atol=1e-5)
    last = model.forward_intermediates(x, indices=1, intermediates_only=True, stop_early=True)
    torch.testing.assert_close(last[0], intermediates[-1])


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_recomputes_and_gives_the_same_gradients(name):
    model = _model(name, num_classes=4)
    x = _input(model)
    model.train()
    torch.manual_seed(0)
    model(x).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    calls = []
    block = next(m for n, m in model.named_modules() if n.endswith("blocks.0"))
    block.register_forward_pre_hook(lambda *a: calls.append(1))  # recomputation may stop before the end
    torch.manual_seed(0)
    model(x).square().mean().backward()
    assert len(calls) == 2  # forward, then again in the backward pass
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_torchscript(name):
    model = _model(name).eval()
    x = _input(model)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """As timm's tests build it: torchvision's FX feature extractor returning the last node."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs,
    )


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_fx(name):
    model = _model(name).eval()
    x = _input(model)
    fx_model = _fx_model(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(tuple(fx_model(x).values())), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_model_backward_fx(name):
    model = _model(name, num_classes=5)
    model.train()
    fx_model = _fx_model(model)
    out = torch.cat(tuple(fx_model(_input(model)).values()))
    out.mean().backward()
    assert out.shape == (BATCH, 5)
    assert all(p.grad is not None for p in fx_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_fx_torchscript(name):
    model = _model(name).eval()
    x = _input(model)
    scripted = torch.jit.script(_fx_model(model))
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(tuple(scripted(x).values())), model(x))


def test_fx_traced_fixed_size_models_keep_their_size_check():
    for name in ("spach_ms_xxs_patch4_224_mlp", "smlpnet_tiny"):
        traced = torch.fx.symbolic_trace(_model(name).eval())
        with pytest.raises(spach.SpachError, match="built for"):
            traced(torch.randn(1, 3, 96, 96))
