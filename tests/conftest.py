import json
import os
import pathlib

import pytest
import torch

LAYOUT_FILE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_checkpoint_layout.json"


@pytest.fixture(scope="session")
def layout() -> dict:
    if not LAYOUT_FILE.exists():
        if os.environ.get("CI"):  # CI always has shared/ beside the clone: a missing file is a failure there
            pytest.fail(f"official layout reference not found at {LAYOUT_FILE}")
        pytest.skip(f"official layout reference not found at {LAYOUT_FILE}")
    return json.loads(LAYOUT_FILE.read_text())


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the default init hides the mixers behind gamma=1e-4 and a zero head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model
