"""The models: spatial mixers and their registry, the SPACH backbone, the official zoo and checkpoint
conversion."""
