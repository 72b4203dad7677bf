"""torch.compile(fullgraph=True) traces every family without a graph break, in train and eval, fp32
and under autocast; one real Inductor compile through spach.optimize matches eager."""
import pytest
import torch
from conftest import randomize_

import spach

ARCHS = {
    "conv": [[("conv", 1)], [("conv", 1)]],
    "attn": [[("conv", 1)], [("attn", 1)]],
    "mlp": [[("conv", 1)], [("mlp", 1)]],
    "hybrid": [[("conv", 1)], [("conv", 1), ("attn", 1)]],
}


def _tiny(family: str) -> spach.SpachNet:
    model = spach.create_model("spach", net_arch=ARCHS[family], hidden_dim=16, num_heads=2, patch_size=4,
                               img_size=32, num_classes=5, drop_path_rate=0.1)
    return randomize_(model)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_fullgraph_trace_in_train_and_eval(family):
    model = _tiny(family)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    compiled.train()
    compiled(x).sum().backward()  # train: drop path, autograd through the fused ops
    assert all(p.grad is not None for p in model.parameters())
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(x).dtype == torch.bfloat16


@pytest.mark.slow
def test_inductor_compile_through_optimize_matches_eager():
    model = _tiny("hybrid").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    fast = spach.optimize(model, device="cpu", compile=True)
    torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
