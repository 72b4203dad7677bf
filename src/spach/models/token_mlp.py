"""The token-mixing MLP's product, `y = W2 act(W1 x + b1) + b2` along the token axis, in the form that
is fastest where it runs.

    y = token_mlp(t, fc1, fc2, act, drop)      # t (B, N, C) tokens, fc1 Linear(N, Nh), fc2 Linear(Nh, N)

Every form computes the same products (the weights keep the official `nn.Linear(N, N*ratio)` layout);
they differ in layout and in how many matrix products run:

- `left`: multiply from the left per image (`baddbmm` with the weight expanded over the batch), the
  `(B, N, C)` tokens never transposed; the fastest in fp32 and at a few hundred tokens or fewer;
- `folded`: the batch folded into the columns, one `(Nh, N) @ (N, B*C)` product per layer (one copy of the
  tokens in, the output a strided view): one large product and one weight gradient instead of B small
  ones; 2-3x faster in bf16 training at 784 tokens, where autocast would otherwise cast the expanded
  weight B times;
- `linear`: the official code's way, `Linear` on transposed tokens.

The choice (`spach.models.choice`) is measured once per (device, dtype, batch, tokens, hidden, channels,
training) and keeps `left` unless another form is more than 15% faster. Below `MIN_TOKENS` tokens
nothing is timed and `left` runs: there the per-image products are small, the forms lie within a few
percent of each other, and single timings of them scatter by up to 2x (the battle's 64-token eval
batches picked `linear` in 3 of 8 processes), so a measured choice would flip, and the rounding with
it, from one run to the next for no gain. Override: `SPACH_TOKEN_MLP=folded`, `TOKEN_MLP.set("folded")`,
`with TOKEN_MLP.use("folded"):`. Tracing (FX, FLOP counting, export) and TorchScript use `left`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from spach.models.choice import Choice, fastest

Act = Callable[[torch.Tensor], torch.Tensor]


def _left(t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, act: Act, drop: Act) -> torch.Tensor:
    B = t.shape[0]
    h = drop(act(torch.baddbmm(b1[:, None], w1.expand(B, -1, -1), t)))
    return drop(torch.baddbmm(b2[:, None], w2.expand(B, -1, -1), h))


def _folded(t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, act: Act, drop: Act) -> torch.Tensor:
    B, N, C = t.shape
    h = drop(act(torch.addmm(b1[:, None], w1, t.transpose(0, 1).reshape(N, B * C))))
    return drop(torch.addmm(b2[:, None], w2, h)).view(N, B, C).transpose(0, 1)


def _linear(t: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, act: Act, drop: Act) -> torch.Tensor:
    u = drop(act(nn.functional.linear(t.transpose(1, 2), w1, b1)))
    return drop(nn.functional.linear(u, w2, b2)).transpose(1, 2)


FORMS = {"left": _left, "folded": _folded, "linear": _linear}
TOKEN_MLP = Choice("token-MLP", FORMS, "left", "SPACH_TOKEN_MLP", keep_default_within=0.15)
MIN_TOKENS = 196  # below this the forms are not timed: `left` runs


def measure(t: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, act: Act, training: bool, rounds: int = 3) -> dict[str, float]:
    """Seconds per call of each form on these tokens (forward, plus backward to the tokens and weights
    when `training`), best of `rounds` alternating rounds; the module's own gradients are not touched."""
    x = t.detach().requires_grad_(training)
    params = [p.detach().requires_grad_(training) for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    grad = torch.ones_like(t)

    def step(form: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.set_grad_enabled(training):
                y = form(x, *params, act, nn.Identity())
                if training:
                    torch.autograd.backward(y, grad.to(y.dtype))
            return y
        return run

    return fastest({name: step(form) for name, form in FORMS.items()}, t.device, rounds)


def token_mlp(t: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, act: Act, drop: Act) -> torch.Tensor:
    """`fc2(act(fc1(.)))` along the token axis of `(B, N, C)` tokens, in the form chosen for this call
    (the result may be a strided view)."""
    name = TOKEN_MLP.fixed()  # first: under FX tracing the tensors are proxies
    if name is None:
        kind = t.device.type
        B, N, C = t.shape
        if N >= MIN_TOKENS and torch.amp.is_autocast_available(kind):
            training = torch.is_grad_enabled() and (t.requires_grad or fc1.weight.requires_grad)
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype
            key = (str(t.device), dtype, B, N, fc1.out_features, C, training)
            name = TOKEN_MLP.pick(key, lambda: measure(t, fc1, fc2, act, training))
        else:  # few tokens, or a meta/odd device: nothing worth timing
            name = TOKEN_MLP.default
    return FORMS[name](t, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, drop)
