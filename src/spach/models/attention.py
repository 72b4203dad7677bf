"""Multi-head self-attention whose kernel is picked by measured speed.

    y = multi_head_attention(qkv, num_heads)     # qkv (B, N, 3C) from the qkv Linear -> y (B, N, C)

The qkv projection's last axis splits as (3, heads, head_dim) (the official layout); every
implementation computes `softmax((q * head_dim**-0.5) k^T) v` per head and merges the heads in order:

- `sdpa`: `F.scaled_dot_product_attention` with torch's own backend choice (the flash kernel on CPU);
- `sdpa_flash`, `sdpa_efficient`, `sdpa_cudnn`: the same call restricted to one CUDA backend;
- `sdpa_math`: the same call restricted to torch's reference (math) backend;
- `matmul`: per head, two batched matmuls straight on strided views of the qkv output (no layout
  copies in forward or backward) around one softmax kernel; heads merged by one concatenation;
- `matmul_batched`: the official code's way, heads folded into the batch (q, k, v and the output
  copied once each), so two matmuls and one softmax in all.

No kernel wins everywhere. On the 2-core AVX-512/AMX CPU the flash kernel is fastest for inference,
but its backward in bf16 is several times slower than two bf16 matmuls (most at short sequences), so
bf16 training wants `matmul` (docs/benchmarks.md has the measurements).

**Choice.** The first call for a key `(device, dtype, heads, head_dim, tokens, training)` times each
implementation that can run there on that call's own tensors (forward, plus backward when training;
candidates alternate, best of 3 rounds; the explicit ones only while the scores stay under
`SCORES_LIMIT` bytes) and caches the fastest for the process (`spach.models.choice`, shared with the
token-mixing MLP; a training checkpoint carries the choices). Inside a `torch.compile`/FX/JIT trace,
under a `TorchDispatchMode` (the FLOP counter, fake tensors) or during CUDA-graph capture nothing is
timed: the fixed default `sdpa` runs there.

**Override** (first match wins): `with attention_implementation("matmul"):` (also usable as a
decorator), `set_attention_implementation("matmul")` (process-wide; None clears it), the environment
variable `SPACH_ATTENTION=matmul`. The name `auto` means measure; `attention_choices()` shows the
cache, `clear_attention_cache()` empties it.
"""

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from spach.models.choice import Choice, fastest

ENV_VAR = "SPACH_ATTENTION"
DEFAULT = "sdpa"
Key = tuple[str, torch.dtype, int, int, int, bool]

_SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
_CUDA_ONLY = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
_EXPLICIT = ("sdpa_math", "matmul", "matmul_batched")  # materialise the (B, heads, N, N) scores
SCORES_LIMIT = 2**30  # bytes of scores above which the explicit implementations are not even tried


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v  # (B, heads, N, head_dim) strided views


def _sdpa(qkv: torch.Tensor, num_heads: int, dropout_p: float) -> torch.Tensor:
    B, N, C3 = qkv.shape
    y = F.scaled_dot_product_attention(*_split_heads(qkv, num_heads), dropout_p=dropout_p)
    return y.transpose(1, 2).reshape(B, N, C3 // 3)


def _sdpa_backend(backend: SDPBackend) -> Callable[[torch.Tensor, int, float], torch.Tensor]:
    def run(qkv: torch.Tensor, num_heads: int, dropout_p: float) -> torch.Tensor:
        with sdpa_kernel(backend):
            return _sdpa(qkv, num_heads, dropout_p)
    return run


def _matmul(qkv: torch.Tensor, num_heads: int, dropout_p: float) -> torch.Tensor:
    B, N, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    # unbind (not indexing): its backward stacks the head gradients in one pass over qkv's gradient
    parts = qkv.reshape(B, N, 3 * num_heads, d).unbind(2)
    heads = []
    for i in range(num_heads):
        q, k, v = parts[i], parts[num_heads + i], parts[2 * num_heads + i]  # (B, N, d), row stride 3C
        p = torch.bmm(q * d**-0.5, k.transpose(1, 2)).softmax(dim=-1)
        if dropout_p:
            p = F.dropout(p, dropout_p)
        heads.append(torch.bmm(p, v))
    return heads[0] if num_heads == 1 else torch.cat(heads, dim=-1)


def _matmul_batched(qkv: torch.Tensor, num_heads: int, dropout_p: float) -> torch.Tensor:
    B, N, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    q, k, v = _split_heads(qkv, num_heads)
    # heads folded into the batch: one copy of each of q (by the scaling), k and v, and of the output
    q, k, v = (q * d**-0.5).reshape(-1, N, d), k.reshape(-1, N, d), v.reshape(-1, N, d)
    p = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return torch.bmm(p, v).view(B, num_heads, N, d).transpose(1, 2).reshape(B, N, C3 // 3)


IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
    "sdpa": _sdpa,
    **{name: _sdpa_backend(backend) for name, backend in _SDPA_BACKENDS.items()},
    "matmul": _matmul,
    "matmul_batched": _matmul_batched,
}


CHOICE = Choice("attention", IMPLEMENTATIONS, DEFAULT, ENV_VAR)


def set_attention_implementation(name: str | None) -> None:
    """Use `name` for every attention call of this process (`auto`: measure; None: back to the
    environment variable, else `auto`)."""
    CHOICE.set(name)


@contextlib.contextmanager
def attention_implementation(name: str) -> Iterator[None]:
    """`with attention_implementation("matmul"): ...` runs the attention inside with `name`."""
    with CHOICE.use(name):
        yield


def attention_choices() -> dict[Key, str]:
    """The measured choices so far: {(device, dtype, heads, head_dim, tokens, training): name}."""
    return dict(CHOICE.cache)


def clear_attention_cache() -> None:
    CHOICE.cache.clear()


def candidates(device: torch.device, score_bytes: int = 0, num_heads: int = 2) -> list[str]:
    """The implementations worth timing on `device` (the CUDA-only backends only on a GPU; the ones
    that materialise the scores only when those take at most SCORES_LIMIT bytes; `matmul_batched`
    only for several heads, with one it is `matmul`)."""
    return [n for n in IMPLEMENTATIONS if (device.type == "cuda" or n not in _CUDA_ONLY)
            and (score_bytes <= SCORES_LIMIT or n not in _EXPLICIT) and (num_heads > 1 or n != "matmul_batched")]


def measure(qkv: torch.Tensor, num_heads: int, training: bool, dropout_p: float = 0.0, rounds: int = 3) -> dict[str, float]:
    """Seconds per call of each implementation that runs on these tensors (forward, plus backward when
    `training`): one untimed call each, then `rounds` rounds alternating them; the best time each."""
    x = qkv.detach().requires_grad_(training)
    grad = torch.ones(*qkv.shape[:-1], qkv.shape[-1] // 3, dtype=qkv.dtype, device=qkv.device) if training else None

    def step(name: str) -> Callable[[], object]:
        def run() -> object:
            x.grad = None
            with torch.set_grad_enabled(training):
                y = IMPLEMENTATIONS[name](x, num_heads, dropout_p)
                if training:
                    y.backward(grad.to(y.dtype))
            return y
        return run

    B, N, _ = qkv.shape
    names = candidates(qkv.device, B * num_heads * N * N * qkv.element_size(), num_heads)
    return fastest({name: step(name) for name in names}, qkv.device, rounds)


def choose(qkv: torch.Tensor, num_heads: int, training: bool, dropout_p: float = 0.0) -> str:
    """The implementation for this call: the override, else the cached or freshly measured fastest
    (the fixed default while tracing or on a device autocast does not know)."""
    name = CHOICE.fixed()  # first: under FX tracing the tensors are proxies
    if name is not None:
        return name
    kind = qkv.device.type
    if not torch.amp.is_autocast_available(kind):  # a meta/odd device: nothing to time
        return DEFAULT
    B, N, C3 = qkv.shape
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else qkv.dtype
    key = (str(qkv.device), dtype, num_heads, C3 // (3 * num_heads), N, training)
    return CHOICE.pick(key, lambda: measure(qkv, num_heads, training, dropout_p))


def multi_head_attention(qkv: torch.Tensor, num_heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Self-attention of the `(B, N, 3C)` qkv projection with `num_heads` heads -> `(B, N, C)`
    (TorchScript and FX graphs take the fixed default)."""
    if torch.jit.is_scripting():
        return _sdpa(qkv, num_heads, dropout_p)
    return _chosen(qkv, num_heads, dropout_p)


@torch.jit.unused
def _chosen(qkv: torch.Tensor, num_heads: int, dropout_p: float) -> torch.Tensor:
    training = torch.is_grad_enabled() and qkv.requires_grad
    return IMPLEMENTATIONS[choose(qkv, num_heads, training, dropout_p)](qkv, num_heads, dropout_p)
