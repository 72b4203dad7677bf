"""Cost matching: the width (`hidden_dim`) at which a SPACH layout costs what a target says.

    m = match_width("spach", {"net_arch": [["scan", 6]], "patch_size": 4, "num_heads": 2},
                    target=5e6, by="macs", img_size=32, in_chans=1, num_classes=10, tolerance=0.1)
    m.width, m.cost, m.error        # 30, 4.9e6, -0.02

Every other model argument stays as given. A width is valid when the model builds with it (attention's
`num_heads` must divide every stage's width, a mixer may need a least width, ...). Costs grow with the
width (about as its square), so a search over the valid widths (interpolating on the cost's square
root, bisecting when that stalls) finds the two that bracket the target; the closer one (in relative
error) is the match. Models are built on the meta device: counting needs shapes only.
`spach models match` prints matches; a battle contestant states `match = { macs = ... }` instead of a
width (`spach.battle.matching`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from spach.errors import SpachError
from spach.humanize import count, parse_count
from spach.models.flops import count_macs, count_params
from spach.models.registry import family_of_variant
from spach.models.spach_variants import FAMILY as SPACH
from spach.models.zoo import create_model

COSTS = ("macs", "params")
MAX_WIDTH = 1 << 14
_SCAN = 64  # widths tried in a row for a valid one (e.g. a multiple of num_heads)


@dataclass(frozen=True)
class Match:
    width: int
    cost: int      # MACs per image or parameters, at that width
    target: float
    by: str        # "macs" or "params"

    @property
    def error(self) -> float:
        """Relative error of the cost against the target (+0.03: 3% above)."""
        return self.cost / self.target - 1


def model_cost(model: nn.Module, by: str, img_size: int | None = None) -> int:
    """MACs of one image (at `img_size`, default the model's input size), or its parameters."""
    if by not in COSTS:
        raise SpachError(f"a cost is 'macs' or 'params', not {by!r}")
    return count_macs(model, img_size) if by == "macs" else count_params(model)


def spec_cost(model: str, kwargs: dict[str, Any], by: str, img_size: int, in_chans: int, num_classes: int) -> int:
    """The cost of zoo model (or "spach") `model` built with `kwargs` at this input."""
    with torch.device("meta"):
        built = create_model(model, **{**kwargs, "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes})
    return model_cost(built, by)


def match_width(model: str, kwargs: dict[str, Any], target: float, by: str = "macs", img_size: int = 224,
                in_chans: int = 3, num_classes: int = 1000, tolerance: float | None = 0.1) -> Match:
    """The valid `hidden_dim` whose cost is closest to `target` (relative error), for SPACH model `model`
    ("spach" or a SPACH zoo name) built with `kwargs`; a SpachError when its error exceeds `tolerance`
    (None: any)."""
    if by not in COSTS:
        raise SpachError(f"a cost is 'macs' or 'params', not {by!r}")
    if not target > 0:
        raise SpachError(f"the target cost must be > 0, got {target!r}")
    if "hidden_dim" in kwargs:
        raise SpachError("matching picks hidden_dim: leave it out of the spec")
    if model != "spach" and family_of_variant(model) is not SPACH:
        raise SpachError(f"matching sets hidden_dim, a SPACH model's width; {model!r} is not a SPACH model "
                         "(give 'spach' with a net_arch, or a SPACH zoo name: see 'spach models')")
    what = describe(model, kwargs)
    built: dict[int, nn.Module | None] = {}
    costs: dict[int, int] = {}
    errors: list[SpachError] = []

    def valid(width: int) -> bool:
        """Whether the model builds with `width` (on the meta device: shapes only)."""
        if width not in built:
            try:
                with torch.device("meta"):
                    built[width] = create_model(model, **kwargs, hidden_dim=width, img_size=img_size,
                                                in_chans=in_chans, num_classes=num_classes)
            except SpachError as e:
                errors.append(e)
                built[width] = None
        return built[width] is not None

    def cost(width: int) -> int:
        if width not in costs:
            costs[width] = model_cost(built[width], by)
        return costs[width]

    def valid_near(guess: int, lo: int, hi: int) -> int | None:
        """The valid width in (lo, hi) nearest to `guess`, if one lies within _SCAN of it."""
        for step in range(_SCAN):
            for w in (guess + step, guess - step):
                if lo < w < hi and valid(w):
                    return w
        return None

    lo = next((w for w in range(1, _SCAN + 1) if valid(w)), 0)
    if not lo:
        raise SpachError(f"{what} builds with no hidden_dim from 1 to {_SCAN}: {errors[-1]}")
    if cost(lo) >= target:
        return _checked(Match(lo, cost(lo), target, by), what, tolerance)
    hi = lo
    while cost(hi) < target:  # grow (costs rise about as the width squared) until the target is passed
        lo = hi
        if lo >= MAX_WIDTH:
            raise SpachError(f"{what}: even hidden_dim {lo} costs only {count(cost(lo))} {_unit(by)}, under the "
                             f"target {count(target)}")
        guess = min(MAX_WIDTH, max(lo + 1, math.ceil(lo * max(1.25, 1.05 * math.sqrt(target / cost(lo))))))
        hi = next((w for w in range(guess, min(guess + _SCAN, MAX_WIDTH + 1)) if valid(w)), 0)
        if not hi:
            raise SpachError(f"{what} builds with no hidden_dim from {guess} to {min(guess + _SCAN, MAX_WIDTH + 1) - 1}: "
                             f"{errors[-1]}")
    side, interpolate = 0, True
    while True:  # narrow the bracket: interpolation on the square root of the cost, bisection when it stalls
        if interpolate:
            root_lo, root_hi = math.sqrt(cost(lo)), math.sqrt(cost(hi))
            guess = round(lo + (math.sqrt(target) - root_lo) / (root_hi - root_lo) * (hi - lo))
        else:
            guess = (lo + hi) // 2
        w = valid_near(min(hi - 1, max(lo + 1, guess)), lo, hi)
        if w is None:
            break
        if cost(w) >= target:
            hi, new_side = w, 1
        else:
            lo, new_side = w, -1
        interpolate, side = new_side != side, new_side
    best = min((lo, hi), key=lambda w: abs(cost(w) / target - 1))
    return _checked(Match(best, cost(best), target, by), what, tolerance)


def _checked(m: Match, what: str, tolerance: float | None) -> Match:
    if tolerance is not None and abs(m.error) > tolerance:
        raise SpachError(f"no hidden_dim of {what} costs {count(m.target)} {_unit(m.by)} within {tolerance * 100:g}%: the "
                         f"closest, hidden_dim {m.width}, costs {count(m.cost)} ({m.error:+.1%}); raise the tolerance "
                         "or change the layout (depths, patch size)")
    return m


def _unit(by: str) -> str:
    return "MACs" if by == "macs" else "parameters"


def describe(model: str, kwargs: dict[str, Any]) -> str:
    """A spec as the user wrote it: the zoo name, or the JSON of its arguments."""
    spec = json.dumps(kwargs, separators=(", ", ": "), default=str)
    return spec if model == "spach" else (f"{model} {spec}" if kwargs else model)


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME` (a zoo model) or a JSON object of SPACH arguments, optionally naming its `model`."""
    text = text.strip()
    if not text.startswith("{"):
        return text, {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpachError(f"{text!r} is not valid JSON ({e}); give a zoo name or a JSON object such as "
                         "'{\"net_arch\": [[\"attn\", 6]], \"patch_size\": 4}'") from None
    if not isinstance(kwargs, dict):
        raise SpachError(f"{text!r} is not a JSON object of model arguments")
    return str(kwargs.pop("model", "spach")), kwargs


def match_command(specs: list[str], macs: str | None = None, params: str | None = None, like: str | None = None,
                  by: str = "macs", img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                  tolerance: float = 0.1, as_json: bool = False, out: Callable[[str], None] = print) -> list[Match]:
    """`spach models match`: the width of each spec that meets the target (`macs`, `params`, or the
    cost of the model `like`), printed as a table (or JSON)."""
    if sum(x is not None for x in (macs, params, like)) != 1:
        raise SpachError("give one target: --macs N, --params N, or --like MODEL (a zoo name or a JSON spec)")
    if not specs:
        raise SpachError("give the layouts to match with --arch SPEC (a JSON object or a zoo name; repeatable)")
    if not 0 < tolerance:
        raise SpachError(f"--tolerance must be > 0 (a fraction: 0.1 is 10%), got {tolerance}")
    if like is not None:
        like_model, like_kwargs = parse_spec(like)
        target = float(spec_cost(like_model, like_kwargs, by, img_size, in_chans, num_classes))
        source = f" (the {_unit(by)} of {describe(like_model, like_kwargs)})"
    else:
        by = "macs" if macs is not None else "params"
        text = macs if macs is not None else params
        try:
            target = parse_count(text)
        except ValueError:
            raise SpachError(f"--{by} {text!r} is not a count; give e.g. 5e6, 5.2M or 800k") from None
        source = ""
    matches = [match_width(*parse_spec(s), target, by, img_size, in_chans, num_classes, tolerance) for s in specs]
    if as_json:
        out(json.dumps([dict(spec=s, hidden_dim=m.width, **{by: m.cost}, target=m.target, error=m.error)
                        for s, m in zip(specs, matches)], indent=2))
        return matches
    out(f"target: {count(target)} {_unit(by)}{source} at {in_chans}x{img_size}x{img_size}, {num_classes} classes; "
        f"tolerance {tolerance * 100:g}%")
    names = [describe(*parse_spec(s)) for s in specs]
    width = max(len("spec"), *(len(n) for n in names))
    out(f"{'spec':<{width}}  {'hidden_dim':>10}  {_unit(by):>10}  {'error':>7}")
    for name, m in zip(names, matches):
        out(f"{name:<{width}}  {m.width:>10}  {count(m.cost):>10}  {m.error:>+7.1%}")
    return matches
