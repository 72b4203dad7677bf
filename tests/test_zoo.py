"""The official model zoo (SPACH, sMLPNet, ShiftViT): every model builds, counts and layouts match the
official references."""
import pytest
import timm
import torch

import spach
from spach.models.flops import count_macs, count_params
from spach.models.table import count_costs
from spach.models.zoo_costs import ZOO_COSTS

# Each family's own layout -> the official one (ShiftViT keeps the official names).
TO_OFFICIAL = {"spach": spach.spach_to_official, "smlp": spach.smlpnet_to_official, "shift": lambda sd: sd}


def _meta_model(entry: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return spach.create_model(entry["factory"], **entry["factory_kwargs"])


def _family(model: torch.nn.Module) -> str:
    return model.family if model.family in ("smlp", "shift") else "spach"


def test_zoo_has_every_official_name(layout, layout_2b):
    names = set(spach.list_models())
    assert {e["factory"] for e in [*layout.values(), *layout_2b.values()]} <= names
    assert len(names) == 33 and "spach_ms_s_plus_patch4_224_hybrid" in names
    assert spach.list_models("smlpnet_*") == ["smlpnet_base", "smlpnet_small", "smlpnet_tiny"]
    assert len(spach.list_models("shiftvit_*")) == 9


def _check_entry(key: str, entry: dict) -> None:
    model = _meta_model(entry)
    assert count_params(model) == entry["params"], key
    macs = count_macs(model)
    assert abs(macs - entry["macs"]) / entry["macs"] < 0.005, (key, macs, entry["macs"])
    if not entry["factory_kwargs"]:  # the stored costs `spach models` shows are this real count
        layout = "multi-stage" if len({f["reduction"] for f in model.feature_info}) > 1 else "single-stage"
        assert ZOO_COSTS[entry["factory"]] == (model.family, layout, entry["params"], macs), key
    exported = {k: list(v.shape) for k, v in TO_OFFICIAL[_family(model)](model.state_dict()).items()}
    assert exported == {k: list(v) for k, v in entry["state_dict"].items()}, key


def test_params_macs_and_layout_match_reference(layout):
    for key, entry in layout.items():
        _check_entry(key, entry)


def test_smlpnet_and_shiftvit_params_macs_and_layout_match_reference(layout_2b):
    assert len(layout_2b) == 12
    for key, entry in layout_2b.items():
        _check_entry(key, entry)


def test_every_zoo_model_has_stored_costs_and_the_one_no_reference_names_is_counted():
    """`spach models` shows ZOO_COSTS without a forward pass: it must cover the zoo, and the entry the
    reference layouts do not check by name (the plus model) must be the real count."""
    assert set(ZOO_COSTS) == set(spach.list_models()), "run: python -m spach.models.table --recount"
    name = "spach_ms_s_plus_patch4_224_hybrid"
    assert ZOO_COSTS[name] == count_costs(name)


def test_plus_model_is_hybrid_s_with_conv4_stem(layout):
    plus = _meta_model({"factory": "spach_ms_s_plus_patch4_224_hybrid", "factory_kwargs": {}})
    assert count_params(plus) == layout["spach_ms_s_patch4_224_hybrid_conv4stem"]["params"]
    assert plus.config.stem_type == "conv4"


@pytest.mark.parametrize("name", spach.list_models())
def test_every_model_runs_forward(name):
    with torch.device("meta"):
        probe = spach.create_model(name)
    # others accept any size the strides divide; MLP and sMLPNet models are built for the size they run at
    size = 64 if probe.family != "mlp" else 224
    if probe.family == "mlp" and probe.num_features > 512:
        size = 128 if len(probe.stages) > 1 else 112
    # sMLPNet / ShiftViT: the variant's widths and ratios, one block per stage (their params and MACs
    # are checked in full above; building 90M random weights here would only cost time)
    short = dict(depths=(1, 1, 1, 1)) if probe.family in ("smlp", "shift") else {}
    model = spach.create_model(name, img_size=size, num_classes=7, **short).eval()
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


@pytest.mark.parametrize("name, top1, pool, fixed", [
    ("spach_ms_s_plus_patch4_224_hybrid", 83.9, (7, 7), False),
    ("spach_xxs_patch16_224_mlp", None, (14, 14), True),
    ("smlpnet_tiny", 81.9, (7, 7), True),
    ("smlpnet_base", 83.4, (7, 7), True),
    ("shiftvit_r2_small", 82.8, (7, 7), False),
    ("shiftvit_light_tiny", 79.4, (7, 7), False),
    ("shiftvit_r4_base", None, (7, 7), False),
])
def test_pretrained_cfg_carries_top1_final_grid_and_fixed_size(name, top1, pool, fixed):
    with torch.device("meta"):
        cfg = spach.create_model(name).pretrained_cfg
    assert (cfg["top1"], cfg["pool_size"], cfg["fixed_input_size"]) == (top1, pool, fixed)
    static = timm.models.get_pretrained_cfg(name)
    assert (static.pool_size, static.fixed_input_size) == (pool, fixed)


def test_pretrained_cfg_follows_img_size():
    with torch.device("meta"):
        cfg = spach.create_model("smlpnet_tiny", img_size=96).pretrained_cfg
    assert cfg["input_size"] == (3, 96, 96) and cfg["pool_size"] == (3, 3) and cfg["top1"] is None
    mlp = spach.create_model("spach_xxs_patch16_224_mlp", img_size=64)
    assert timm.data.resolve_data_config({}, model=mlp)["input_size"] == (3, 64, 64)


def test_official_top1_is_listed():
    assert spach.OFFICIAL_TOP1["spach_ms_s_plus_patch4_224_hybrid"] == 83.9
    assert spach.OFFICIAL_TOP1["smlpnet_small"] == 83.1 and spach.OFFICIAL_TOP1["shiftvit_r2_tiny"] == 81.7
    assert len(spach.OFFICIAL_TOP1) == 16 and set(spach.OFFICIAL_TOP1) <= set(spach.list_models())


def test_timm_create_model_builds_registered_names():
    m = timm.create_model("spach_ms_xxs_patch4_224_attn", num_classes=3, img_size=64)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    for name in ("smlpnet_tiny", "shiftvit_light_tiny"):
        m = timm.create_model(name, num_classes=3, img_size=64, in_chans=1, drop_path_rate=0.05, depths=(1, 2, 1, 1)).eval()
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_official_defaults_and_overrides():
    with torch.device("meta"):
        assert spach.create_model("smlpnet_small").config.drop_path_rate == 0.2
        assert spach.create_model("shiftvit_r2_base").config.drop_path_rate == 0.6
        tiny = spach.create_model("shiftvit_light_tiny", drop_path_rate=0.0, num_classes=10)
    assert tiny.config.drop_path_rate == 0.0 and tiny.head.out_features == 10
    with pytest.raises(spach.SpachError, match="unknown model option.*hidden_dim.*ShiftViT"):
        spach.create_model("shiftvit_light_tiny", hidden_dim=3)
    with pytest.raises(spach.SpachError, match="not divisible by its total stride 32"):
        spach.create_model("smlpnet_tiny", img_size=100)


# official constructor argument -> ours, where the names differ
_OFFICIAL_ARG = {"dp_rate": "drop_path_rate"}


def test_every_smlpnet_and_shiftvit_name_uses_the_official_constructor(layout_2b):
    assert len(layout_2b) == 12
    for key, entry in layout_2b.items():
        with torch.device("meta"):
            config = spach.create_model(entry["factory"], **entry["factory_kwargs"]).config
        ours = {arg: getattr(config, _OFFICIAL_ARG.get(arg, arg)) for arg in entry["official_constructor"]}
        ours = {arg: list(v) if isinstance(v, tuple) else v for arg, v in ours.items()}
        assert ours == entry["official_constructor"], key


def test_token_mlp_too_small_for_its_grid_is_one_line_naming_the_fix(recwarn):
    # a 1x1 grid at the last stage: int(1 * 0.5) = 0 hidden units, which torch builds with only a warning
    with pytest.raises(spach.SpachError, match=r"1x1 token grid has int\(1 \* 0.5\) = 0 hidden units; .*larger img_size "
                                               r"or a token_ratio of at least 1$") as e:
        spach.create_model("spach_ms_xxs_patch4_224_mlp", img_size=32)
    assert "\n" not in str(e.value) and not recwarn.list
    fixed = spach.create_model("spach_ms_xxs_patch4_224_mlp", img_size=32, token_ratio=1.0)
    assert fixed.stages[3].blocks[0].mixer.fc1.out_features == 1
