"""The models: spatial mixers and their registry, the SPACH backbone, sMLPNet and ShiftViT, the shared
family registry (pretrained configs, timm builder), the official zoo and checkpoint conversion."""
