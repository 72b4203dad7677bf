"""The attention implementations against the formula (fp32 and bf16, forward and backward, odd shapes),
the measured choice (cached once per key, never timed while tracing) and its overrides."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import spach
from spach.models import attention as A
from spach.models.mixers import Attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (batch, heads, head_dim, tokens): one head, head_dim 8..64 (not only powers of 2), 16..3136 tokens
SHAPES = [(3, 1, 8, 16), (2, 3, 24, 49), (2, 2, 48, 64), (1, 2, 64, 196), (2, 1, 32, 785), (1, 1, 8, 3136)]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    A.set_attention_implementation(None)
    A.clear_attention_cache()
    yield
    A.set_attention_implementation(None)
    A.clear_attention_cache()


def formula(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax((q * d**-0.5) k^T) v per head, in float64, heads merged in order."""
    B, N, C3 = qkv.shape
    d = C3 // 3 // heads
    q, k, v = qkv.double().reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    y = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, N, heads * d)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def _runs_here(name: str, device: str, dtype: torch.dtype, head_dim: int) -> bool:
    if name not in A.candidates(torch.device(device)):
        return False
    try:
        A.IMPLEMENTATIONS[name](torch.zeros(1, 16, 3 * head_dim, device=device, dtype=dtype), 1, 0.0)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}d{}N{}".format(*s))
@pytest.mark.parametrize("name", list(A.IMPLEMENTATIONS))
def test_every_implementation_matches_the_formula_forward_and_backward(name, shape, dtype, device):
    B, heads, d, N = shape
    if not _runs_here(name, device, dtype, d):
        pytest.skip(f"{name} does not run on {device} in {dtype}")
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * heads * d, device=device, dtype=dtype).requires_grad_()
    g = torch.randn(B, N, heads * d, device=device, dtype=dtype)
    y = A.IMPLEMENTATIONS[name](qkv, heads, 0.0)
    y.backward(g)
    leaf = qkv.detach().double().requires_grad_()
    expected = formula(leaf, heads)
    expected.backward(g.double())
    assert y.shape == expected.shape and y.dtype == dtype
    assert _rel(y, expected) < TOL[dtype]
    assert _rel(qkv.grad, leaf.grad) < TOL[dtype] * (1 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("name", list(A.candidates(torch.device("cpu"))))
def test_the_mixer_runs_every_implementation_under_bf16_autocast(name):
    torch.manual_seed(0)
    mixer = Attention(dim=48, num_heads=2)
    x = torch.randn(2, 5, 7, 48)
    with torch.no_grad():
        expected = mixer(x)
    with A.attention_implementation(name), torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and _rel(y.float(), expected.double()) < TOL[torch.bfloat16]
    assert all(p.grad is not None for p in mixer.parameters())


def test_dropout_is_applied_in_training_only():
    qkv = torch.randn(2, 16, 3 * 8)
    for name in ("sdpa", "matmul"):
        torch.manual_seed(0)
        assert not torch.equal(A.IMPLEMENTATIONS[name](qkv, 1, 0.5), A.IMPLEMENTATIONS[name](qkv, 1, 0.0))
    mixer = Attention(dim=8, num_heads=1, attn_drop=0.5).eval()
    x = torch.randn(1, 4, 4, 8)
    torch.testing.assert_close(mixer(x), mixer(x))


def test_the_choice_is_measured_once_per_key_and_cached(monkeypatch):
    calls = []
    measure = A.measure
    monkeypatch.setattr(A, "measure", lambda *a, **k: calls.append(a[0].shape) or measure(*a, **k))
    qkv = torch.randn(2, 16, 3 * 8)
    for _ in range(3):
        A.multi_head_attention(qkv, 1)
    A.multi_head_attention(qkv.requires_grad_(), 1).sum().backward()  # training: another key
    A.multi_head_attention(torch.randn(2, 25, 3 * 8), 1)  # other token count: another key
    assert len(calls) == 3
    choices = A.attention_choices()
    assert set(choices) == {("cpu", torch.float32, 1, 8, 16, False), ("cpu", torch.float32, 1, 8, 16, True),
                            ("cpu", torch.float32, 1, 8, 25, False)}
    assert set(choices.values()) <= set(A.IMPLEMENTATIONS)


def test_the_choice_is_the_fastest_measured(monkeypatch):
    monkeypatch.setattr(A, "measure", lambda *a, **k: {"sdpa": 2.0, "matmul": 1.0, "sdpa_math": 3.0})
    assert A.choose(torch.randn(1, 16, 24), 1, training=False) == "matmul"


def test_measure_times_every_cpu_candidate_in_both_modes():
    qkv = torch.randn(2, 16, 3 * 16)
    for training in (False, True):
        times = A.measure(qkv, 2, training, rounds=1)
        assert set(times) == set(A.candidates(torch.device("cpu"))) and all(t > 0 for t in times.values())


def test_huge_score_matrices_are_not_materialised_to_be_timed(monkeypatch):
    monkeypatch.setattr(A, "SCORES_LIMIT", 16 * 16 * 4 - 1)
    times = A.measure(torch.randn(1, 16, 3 * 8), 1, training=False, rounds=1)
    assert set(times) == {"sdpa"}


def test_overrides_env_function_and_context_manager(monkeypatch):
    qkv = torch.randn(1, 16, 24)
    monkeypatch.setattr(A, "measure", lambda *a, **k: pytest.fail("an override must not measure"))
    monkeypatch.setenv(A.ENV_VAR, "sdpa_math")
    assert A.choose(qkv, 1, False) == "sdpa_math"
    A.set_attention_implementation("matmul")
    assert A.choose(qkv, 1, False) == "matmul"
    with A.attention_implementation("sdpa"):
        assert A.choose(qkv, 1, False) == "sdpa"
    assert A.choose(qkv, 1, False) == "matmul"
    with pytest.raises(spach.SpachError, match="unknown attention implementation"):
        A.set_attention_implementation("fast")
    A.set_attention_implementation(None)
    monkeypatch.setenv(A.ENV_VAR, "nope")
    with pytest.raises(spach.SpachError, match="SPACH_ATTENTION='nope'"):
        A.choose(qkv, 1, False)


def test_no_timing_under_the_flop_counter_or_a_compiler_trace(monkeypatch):
    monkeypatch.setattr(A, "measure", lambda *a, **k: pytest.fail("timed while tracing"))
    mixer = Attention(dim=16, num_heads=2)
    x = torch.randn(1, 4, 4, 16)
    with FlopCounterMode(display=False) as counter:
        mixer(x)
    assert counter.get_total_flops() == 2 * (4 * 16 * 16 * 16 + 2 * 16 * 16 * 16)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager")
        compiled(x).sum().backward()
    finally:
        torch._dynamo.reset()
    assert A.attention_choices() == {}


def test_meta_tensors_take_the_default_without_timing(monkeypatch):
    monkeypatch.setattr(A, "measure", lambda *a, **k: pytest.fail("timed meta tensors"))
    with torch.device("meta"):
        y = Attention(dim=16, num_heads=2)(torch.randn(1, 4, 4, 16))
    assert y.shape == (1, 4, 4, 16)
