"""The models: spatial mixers and their registry, the SPACH backbone, sMLPNet and ShiftViT, the shared
family registry (pretrained configs, timm builder), the official zoo and checkpoint conversion."""

# The mixers that came after SPACH (DESIGN.md 2c), each in its own module, register themselves with
# `spach.models.mixers.register_mixer` (beside the paper's, registered there): importing anything from
# spach.models registers them all.
from spach.models import dwconv, focal, gmlp, window  # noqa: F401
