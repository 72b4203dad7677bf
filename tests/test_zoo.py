"""The official model zoo: every model builds, counts and layouts match the official reference."""
import pytest
import timm
import torch

import spach
from spach.models.flops import count_macs, count_params


def _meta_model(entry: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return spach.create_model(entry["factory"], **entry["factory_kwargs"])


def test_zoo_has_every_official_name(layout):
    names = set(spach.list_models())
    assert {e["factory"] for e in layout.values()} <= names
    assert len(names) == 21 and "spach_ms_s_plus_patch4_224_hybrid" in names


def test_params_macs_and_layout_match_reference(layout):
    for key, entry in layout.items():
        model = _meta_model(entry)
        assert count_params(model) == entry["params"], key
        macs = count_macs(model)
        assert abs(macs - entry["macs"]) / entry["macs"] < 0.005, (key, macs, entry["macs"])
        exported = {k: list(v.shape) for k, v in spach.spach_to_official(model.state_dict()).items()}
        assert exported == {k: list(v) for k, v in entry["state_dict"].items()}, key


def test_plus_model_is_hybrid_s_with_conv4_stem(layout):
    plus = _meta_model({"factory": "spach_ms_s_plus_patch4_224_hybrid", "factory_kwargs": {}})
    assert count_params(plus) == layout["spach_ms_s_patch4_224_hybrid_conv4stem"]["params"]
    assert plus.config.stem_type == "conv4"


@pytest.mark.parametrize("name", spach.list_models())
def test_every_model_runs_forward(name):
    with torch.device("meta"):
        probe = spach.create_model(name)
    # conv/attn models accept any size the strides divide; MLP models are built for the size they run at
    size = 64 if probe.family != "mlp" else 224
    if probe.family == "mlp" and probe.num_features > 512:
        size = 128 if len(probe.stages) > 1 else 112
    model = spach.create_model(name, img_size=size, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_pretrained_cfg_is_timm_style():
    m = spach.create_model("spach_ms_xxs_patch4_224_conv")
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["num_classes"] == 1000 and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    resolved = timm.data.resolve_data_config({}, model=m)
    assert resolved["input_size"] == (3, 224, 224)


def test_official_top1_is_listed():
    assert spach.OFFICIAL_TOP1["spach_ms_s_plus_patch4_224_hybrid"] == 83.9
    assert set(spach.OFFICIAL_TOP1) <= set(spach.list_models())


def test_timm_create_model_builds_registered_names():
    m = timm.create_model("spach_ms_xxs_patch4_224_attn", num_classes=3, img_size=64)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)
