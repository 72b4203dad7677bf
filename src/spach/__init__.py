"""spach: the SPACH backbones (conv / attention / MLP spatial mixing in one skeleton), exact and fast.

    import spach
    model = spach.create_model("spach_ms_s_patch4_224_hybrid", pretrained="spach_hybrid_ms_s.pth")

Importing spach registers every variant (SPACH, sMLPNet, ShiftViT) with timm.
"""
from spach.bench.optimize import optimize
from spach.errors import CheckpointError, SpachError
from spach.models.backbone import SpachConfig, SpachNet, family_of
from spach.models.blocks import MixingBlock
from spach.models.convert import (
    load_checkpoint,
    official_to_spach,
    read_checkpoint,
    spach_to_official,
)
from spach.models.mixers import MixerContext, list_mixers, register_mixer
from spach.models.registry import OFFICIAL_TOP1
from spach.models.shiftvit import ShiftViT, ShiftViTConfig
from spach.models.smlpnet import SMLPNet, SMLPNetConfig, official_to_smlpnet, smlpnet_to_official
from spach.models.zoo import create_model, list_models

__all__ = [
    "CheckpointError", "MixerContext", "MixingBlock", "OFFICIAL_TOP1", "SMLPNet", "SMLPNetConfig", "ShiftViT",
    "ShiftViTConfig", "SpachConfig", "SpachError", "SpachNet", "create_model", "family_of", "optimize", "list_mixers",
    "list_models", "load_checkpoint", "official_to_smlpnet", "official_to_spach", "read_checkpoint", "register_mixer",
    "smlpnet_to_official", "spach_to_official",
]
__version__ = "0.1.0"
