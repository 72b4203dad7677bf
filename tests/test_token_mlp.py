"""The token-mixing MLP's forms against the formula (fp32 and bf16, forward and backward to tokens and
weights), its measured choice (kept `left` unless another form is >15% faster, cached per key, never
timed while tracing), the overrides, and the choices a checkpoint carries."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from spach.errors import SpachError
from spach.models import choice as C
from spach.models import token_mlp as T
from spach.models.attention import CHOICE as ATTENTION
from spach.models.mixers import TokenMLP

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (batch, tokens, hidden, channels): one image, odd token and channel counts, the battle's and the XXS models'
SHAPES = [(1, 16, 8, 5), (3, 49, 24, 7), (4, 64, 32, 48), (2, 196, 98, 16)]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(T.TOKEN_MLP.env_var, raising=False)
    for c in (T.TOKEN_MLP, ATTENTION):
        c.set(None)
        c.cache.clear()
    yield
    for c in (T.TOKEN_MLP, ATTENTION):
        c.set(None)
        c.cache.clear()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}h{}C{}".format(*s))
@pytest.mark.parametrize("name", list(T.FORMS))
def test_every_form_matches_the_formula_forward_and_backward(name, shape, dtype):
    B, N, Nh, Cc = shape
    torch.manual_seed(0)
    t = torch.randn(B, N, Cc, dtype=dtype).requires_grad_()
    params = [torch.randn(*s, dtype=dtype).div(N**0.5).requires_grad_() for s in ((Nh, N), (Nh,), (N, Nh), (N,))]
    g = torch.randn(B, N, Cc, dtype=dtype)
    y = T.FORMS[name](t, *params, nn.functional.gelu, nn.Identity())
    y.backward(g)
    leaves = [v.detach().double().requires_grad_() for v in (t, *params)]
    x, w1, b1, w2, b2 = leaves
    expected = w2 @ nn.functional.gelu(w1 @ x + b1[:, None]) + b2[:, None]  # W @ x per image
    expected.backward(g.double())
    assert y.shape == expected.shape and y.dtype == dtype
    assert _rel(y, expected) < TOL[dtype]
    for got, leaf in zip((t, *params), leaves):
        assert _rel(got.grad, leaf.grad) < TOL[dtype] * 2


@pytest.mark.parametrize("name", list(T.FORMS))
def test_the_mixer_runs_every_form_under_bf16_autocast(name):
    torch.manual_seed(0)
    mixer = TokenMLP((4, 6))
    x = torch.randn(3, 4, 6, 10)
    with torch.no_grad(), T.TOKEN_MLP.use("left"):
        expected = mixer(x)
    with T.TOKEN_MLP.use(name), torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)
        y.float().square().sum().backward()
    assert y.shape == x.shape and _rel(y.float(), expected.double()) < 3e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())


def test_the_default_is_kept_unless_another_form_is_clearly_faster():
    best = T.TOKEN_MLP.best
    assert best({"left": 1.10, "folded": 1.0, "linear": 1.3}) == "left"  # 10% slower: within the 15%
    assert best({"left": 1.20, "folded": 1.0, "linear": 1.3}) == "folded"
    assert best({"folded": 1.0, "linear": 0.9}) == "linear"  # the default cannot run: the fastest
    assert best({}) == "left"
    assert ATTENTION.best({"sdpa": 1.01, "matmul": 1.0}) == "matmul"  # attention keeps its plain fastest rule


def test_few_tokens_are_never_timed(monkeypatch):
    monkeypatch.setattr(T, "measure", lambda *a, **k: pytest.fail("timed below MIN_TOKENS"))
    TokenMLP((8, 8))(torch.randn(2, 8, 8, 8))  # the battle's 64-token grid
    assert T.TOKEN_MLP.cache == {} and T.MIN_TOKENS > 64


def test_the_choice_is_measured_once_per_key_and_cached(monkeypatch):
    monkeypatch.setattr(T, "MIN_TOKENS", 16)
    calls = []
    monkeypatch.setattr(T, "measure", lambda *a, **k: calls.append(1) or {"left": 2.0, "folded": 1.0, "linear": 3.0})
    mixer = TokenMLP((4, 4))
    for _ in range(3):
        mixer(torch.randn(2, 4, 4, 8))
    with torch.no_grad():
        mixer(torch.randn(2, 4, 4, 8))
    mixer(torch.randn(5, 4, 4, 8))  # another batch size is another key
    assert len(calls) == 3
    assert set(T.TOKEN_MLP.cache.values()) == {"folded"}
    assert {k[-1] for k in T.TOKEN_MLP.cache} == {True, False}  # training and inference are separate keys


def test_real_measurement_times_every_form():
    mixer = TokenMLP((4, 4))
    for training in (False, True):
        times = T.measure(torch.randn(2, 16, 8), mixer.fc1, mixer.fc2, mixer.act, training, rounds=1)
        assert set(times) == set(T.FORMS) and all(t > 0 for t in times.values())
    assert all(p.grad is None for p in mixer.parameters())  # timing leaves the module's gradients alone


def test_nothing_is_timed_while_tracing_or_counting_flops(monkeypatch):
    monkeypatch.setattr(T, "MIN_TOKENS", 16)
    monkeypatch.setattr(T, "measure", lambda *a, **k: pytest.fail("timed while tracing"))
    mixer = TokenMLP((4, 4))
    with FlopCounterMode(display=False) as counter:
        mixer(torch.randn(2, 4, 4, 8))
    assert counter.get_total_flops() > 0 and T.TOKEN_MLP.cache == {}
    torch.fx.symbolic_trace(mixer)
    assert T.TOKEN_MLP.cache == {}


def test_overrides_and_bad_names(monkeypatch):
    x = torch.randn(1, 16, 8)
    mixer = TokenMLP((4, 4))
    run = lambda: T.token_mlp(x, mixer.fc1, mixer.fc2, mixer.act, mixer.drop)  # noqa: E731
    monkeypatch.setattr(T, "FORMS", {**T.FORMS, "folded": lambda *a: "folded", "linear": lambda *a: "linear"})
    monkeypatch.setenv(T.TOKEN_MLP.env_var, "linear")
    assert run() == "linear"
    T.TOKEN_MLP.set("folded")
    assert run() == "folded"
    with T.TOKEN_MLP.use("linear"):
        assert run() == "linear"
    assert run() == "folded"
    with pytest.raises(SpachError, match="unknown token-MLP implementation 'fast'"):
        T.TOKEN_MLP.set("fast")
    T.TOKEN_MLP.set(None)
    monkeypatch.setenv(T.TOKEN_MLP.env_var, "fast")
    with pytest.raises(SpachError, match="SPACH_TOKEN_MLP='fast' names no token-MLP implementation"):
        run()


def test_choices_survive_a_checkpoint_round_trip():
    T.TOKEN_MLP.cache[("cpu", torch.bfloat16, 64, 64, 32, 48, True)] = "folded"
    ATTENTION.cache[("cpu", torch.float32, 2, 8, 64, False)] = "matmul"
    saved = C.export_choices()
    assert saved["token-MLP"] == [["cpu", "torch.bfloat16", 64, 64, 32, 48, True, "folded"]]
    for c in (T.TOKEN_MLP, ATTENTION):
        c.cache.clear()
    C.restore_choices({**saved, "gone": [["cpu", 1, "x"]], "attention": saved["attention"] + [["cpu", 1, "no-such"]]})
    assert T.TOKEN_MLP.cache == {("cpu", torch.bfloat16, 64, 64, 32, 48, True): "folded"}
    assert ATTENTION.cache == {("cpu", torch.float32, 2, 8, 64, False): "matmul"}
