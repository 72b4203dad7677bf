"""The `scan` mixer (VMamba's SS2D): the chunked scan against the plain step-by-step recurrence, forward
and backward; the merge of the four directions against doing each by hand; parameters and MACs against
hand formulas; float32, float64 and bf16 autocast."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

import spach
from spach.models.flops import count_macs, count_module_macs, count_params
from spach.models.mixers import MixerContext, build_mixer
from spach.models.scan import SelectiveScan2D, cross_merge, cross_scan, linear_scan, selective_scan

CHUNKS = (2, 3, 5, 8)  # 3 and 5 divide neither 37 nor 64; 8 divides 64, not 37


def recurrence(a, u, reverse=False):
    """h_t = a_t h_{t-1} + u_t along dim 0, one step at a time."""
    if reverse:
        return recurrence(a.flip(0), u.flip(0)).flip(0)
    h, out = torch.zeros_like(u[0]), []
    for t in range(u.shape[0]):
        h = a[t] * h + u[t]
        out.append(h)
    return torch.stack(out)


def reference_scan(x, dt, A_log, B, C, D, dt_bias):
    """Mamba's selective scan as DESIGN.md 2c writes it, token by token: x, dt (T, b, K, E); B, C (T, b, K, N)."""
    delta = F.softplus(dt + dt_bias)
    A = -torch.exp(A_log)
    h, ys = torch.zeros(*x.shape[1:], A.shape[-1], dtype=x.dtype), []
    for t in range(x.shape[0]):
        h = torch.exp(delta[t, ..., None] * A) * h + delta[t, ..., None] * B[t, :, :, None, :] * x[t, ..., None]
        ys.append((h * C[t, :, :, None, :]).sum(-1) + D * x[t])
    return torch.stack(ys)


def scan_inputs(T, b=2, K=2, E=3, N=4, dtype=torch.float64, dt_shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(T, b, K, E), dt=r(T, b, K, E) + dt_shift, A_log=r(K, E, N) * 0.5, B=r(T, b, K, N), C=r(T, b, K, N),
                D=r(K, E), dt_bias=r(K, E) * 0.5)


@pytest.mark.parametrize("T", [1, 37, 64])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_linear_scan_is_the_recurrence_both_ways(T, chunk):
    g = torch.Generator().manual_seed(T)
    a, u = torch.rand(T, 3, 5, generator=g, dtype=torch.float64), torch.randn(T, 3, 5, generator=g, dtype=torch.float64)
    for reverse in (False, True):
        torch.testing.assert_close(linear_scan(a, u, chunk, reverse), recurrence(a, u, reverse), rtol=1e-12, atol=1e-12)
    assert not torch.equal(linear_scan(a, u, chunk), torch.zeros_like(u)) and a.shape == (T, 3, 5)  # inputs untouched


@pytest.mark.parametrize("T", [37, 64])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_selective_scan_forward_and_backward_match_the_step_by_step_recurrence(T, chunk):
    """float64: every input's gradient (x, dt, A_log, B, C, D, dt_bias) to rounding."""
    inputs = scan_inputs(T)
    ours = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, y_ref = selective_scan(**ours, chunk=chunk), reference_scan(**ref)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * weight).sum().backward()
    (y_ref * weight).sum().backward()
    errors = {"y": (y - y_ref).abs().max().item()} | {k: (ours[k].grad - ref[k].grad).abs().max().item() for k in ours}
    print(f"T={T} chunk={chunk}: max abs error {max(errors.values()):.1e} " + " ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert max(errors.values()) < 1e-10, errors
    assert all(ours[k].grad.abs().max() > 0 for k in ours)


def test_selective_scan_in_float32_and_with_strong_decays():
    """float32 against the float64 recurrence; steps with exp(delta A) down to ~0 neither overflow nor lose the input."""
    for shift in (0.0, 6.0):  # softplus(dt + 6) ~ 6: exp(delta A) as small as exp(-6 e^1.5)
        inputs = scan_inputs(64, dt_shift=shift)
        y = selective_scan(**{k: v.float() for k, v in inputs.items()})
        y_ref = reference_scan(**inputs)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        err = (y.double() - y_ref).abs().max().item() / y_ref.abs().max().item()
        print(f"dt shift {shift}: float32 relative max error {err:.1e}")
        assert err < 1e-5
    low = {k: v.to(torch.bfloat16) for k, v in scan_inputs(64).items()}  # bf16 inputs (autocast's) scan in float32
    y = selective_scan(**low)
    assert y.dtype == torch.bfloat16 and torch.equal(y, selective_scan(**{k: v.float() for k, v in low.items()}).bfloat16())


def test_the_directions_merge_as_each_scanned_by_hand():
    mixer = randomize_(build_mixer("scan", MixerContext(dim=12, grid_size=(3, 5))))
    x = torch.randn(2, 3, 5, 12)
    with torch.no_grad():
        u, z = mixer.in_proj(x).chunk(2, dim=-1)
        u = F.silu(mixer.conv(u.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)           # (B, H, W, E)
        rows = u.reshape(2, 15, 12)                                                    # row-major
        cols = u.transpose(1, 2).reshape(2, 15, 12)                                    # column-major
        sequences = [rows, cols, rows.flip(1), cols.flip(1)]
        merged = torch.zeros(2, 3, 5, 12)
        for k, seq in enumerate(sequences):
            proj = seq @ mixer.x_proj_weight[k].t()                                    # (B, T, R + 2N)
            dt, B, C = proj.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
            y = reference_scan(seq.transpose(0, 1)[:, :, None], (dt @ mixer.dt_proj_weight[k].t()).transpose(0, 1)[:, :, None],
                               mixer.A_log[k:k + 1], B.transpose(0, 1)[:, :, None], C.transpose(0, 1)[:, :, None],
                               mixer.D[k:k + 1], mixer.dt_proj_bias[k:k + 1])[:, :, 0].transpose(0, 1)  # (B, T, E)
            if k >= 2:
                y = y.flip(1)
            merged += y.reshape(2, 3, 5, 12) if k % 2 == 0 else y.reshape(2, 5, 3, 12).transpose(1, 2)
        expected = mixer.out_proj(mixer.out_norm(merged) * F.silu(z))
        torch.testing.assert_close(mixer(x), expected, rtol=1e-4, atol=1e-5)
    # two directions: rows both ways
    seq = torch.randn(6, 2, 2, 4)
    y = torch.stack([seq[:, :, 0], seq[:, :, 0].flip(0)], dim=2)
    torch.testing.assert_close(cross_merge(y, 2, 2, 3), (2 * seq[:, :, 0]).transpose(0, 1).reshape(2, 2, 3, 4))
    grid = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(cross_scan(grid, 2)[:, 0, 1], cross_scan(grid, 2)[:, 0, 0].flip(0))


def _mixer_macs(dim, tokens, d_state=1, expand=1.0, directions=4, dt_rank=0):
    """Per image: in_proj 2EC, the 3x3 depthwise conv 9E, x_proj K E (R + 2N), dt_proj K R E, the scan
    K E (9N + 1) (Mamba's count of the recurrence, and D x), out_proj E C; per token."""
    E, N, K, R = int(expand * dim), d_state, directions, dt_rank or math.ceil(dim / 16)
    return tokens * (2 * E * dim + 9 * E + K * E * (R + 2 * N) + K * R * E + K * E * (9 * N + 1) + E * dim)


def _mixer_params(dim, d_state=1, expand=1.0, directions=4, dt_rank=0):
    E, N, K, R = int(expand * dim), d_state, directions, dt_rank or math.ceil(dim / 16)
    return 2 * E * dim + 10 * E + K * (R + 2 * N) * E + K * (E * R + E) + K * E * N + K * E + 2 * E + E * dim


def test_params_and_macs_are_counted_exactly():
    x = torch.randn(1, 6, 4, 20)
    default = build_mixer("scan", MixerContext(dim=20, grid_size=(6, 4)))
    assert count_module_macs(default, x) == _mixer_macs(20, 24) and count_params(default) == _mixer_params(20)
    other = SelectiveScan2D(20, d_state=3, expand=1.5, directions=2, dt_rank=4)
    assert count_module_macs(other, x) == _mixer_macs(20, 24, 3, 1.5, 2, 4)
    assert count_params(other) == _mixer_params(20, 3, 1.5, 2, 4)
    # in a model: the same model with "conv" instead differs by the mixers, LN1 and gamma (norms count 0 MACs)
    arch = lambda m: [[("conv", 1)], [(m, 2)], [(m, 1)]]  # noqa: E731
    kw = dict(hidden_dim=16, num_heads=2, patch_size=4, img_size=64, num_classes=3)
    with_scan, without = (spach.create_model("spach", net_arch=arch(m), **kw) for m in ("scan", "conv"))
    assert count_macs(with_scan) - count_macs(without) == 2 * _mixer_macs(32, 64) + _mixer_macs(64, 16)
    ln_gamma = lambda c: 3 * c  # noqa: E731
    assert count_params(with_scan) - count_params(without) == 2 * (_mixer_params(32) + ln_gamma(32)) + _mixer_params(64) + ln_gamma(64)
    with torch.device("meta"):  # what cost matching counts: shapes only, the same number
        assert count_macs(spach.create_model("spach", net_arch=arch("scan"), **kw)) == count_macs(with_scan)


def test_trains_in_both_layouts_and_under_bf16_autocast():
    for arch in ([("scan", 2)], [[("conv", 1)], [("scan", 1)], [("scan", 1), ("attn", 1)]]):
        m = randomize_(spach.create_model("spach", net_arch=arch, hidden_dim=16, num_heads=2, patch_size=4, img_size=32,
                                          num_classes=3))
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
        F.cross_entropy(m(x), y).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        with torch.no_grad():
            exact = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
            F.cross_entropy(low, y).backward()
        err = ((low.float() - exact).abs().max() / exact.abs().max()).item()
        print(f"{arch}: bf16 autocast relative max error {err:.1e}")
        assert torch.isfinite(low).all() and err < 0.05
    assert m.no_weight_decay() >= {"stages.1.blocks.0.mixer.A_log", "stages.1.blocks.0.mixer.D",
                                   "stages.1.blocks.0.mixer.dt_proj_bias"}


def test_scripted_model_matches_and_refuses_to_train():
    m = randomize_(spach.create_model("spach", net_arch=[("scan", 1)], hidden_dim=16, patch_size=4, img_size=32)).eval()
    scripted = torch.jit.script(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), m(x))
    with pytest.raises(torch.jit.Error, match="TorchScript scan mixer has no gradient: run it under torch.no_grad"):
        scripted(x)
