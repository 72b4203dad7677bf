"""Input checks that stay in the graph: traceable by torch.fx, scriptable, and a SpachError in eager.

A data-dependent `if ...: raise` inside `forward` cannot be traced by torch.fx. Each module that
calls `check_grid` declares it with `torch.fx.wrap("check_grid")` at module level, so FX records one
call (run with real shapes when the graph runs) instead of tracing into it; the check returns its
input so that no dead-code elimination drops it.
"""
import torch

from spach.errors import SpachError


def check_grid(x: torch.Tensor, height: int, width: int, dim: int, what: str) -> torch.Tensor:
    """`x` unchanged if its sizes along `dim` and `dim + 1` are `height` and `width`; else one line
    naming `what` was built for and the fix."""
    if x.shape[dim] != height or x.shape[dim + 1] != width:
        raise SpachError(
            f"{what}: built for {height}x{width}, got {x.shape[dim]}x{x.shape[dim + 1]}; "
            "its weights tie the model to its input size: build it with the img_size it runs at"
        )
    return x


def check_global_pool(global_pool: str) -> str:
    """timm's pooling names that spach models support: 'avg' (mean over the grid) or '' (none)."""
    if global_pool not in ("avg", ""):
        raise SpachError(f"global_pool must be 'avg' (mean over the grid) or '' (no pooling), not {global_pool!r}")
    return global_pool
