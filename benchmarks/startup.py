"""Start-up time of the command line and of `import spach`, against `python -c "import torch, timm"`: the
floor, as importing spach registers its models with timm. Each round runs every command once, in turn,
so a change of load hits all of them alike; the medians of wall time and of CPU time (user + system:
on a busy machine the steadier of the two), their gap to the floor and their ratio to it are printed
with the load average. `--before SRC` also times another checkout's `src/` (e.g. main's) in the same
rounds.

    python benchmarks/startup.py --rounds 5 [--before ../main/src]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FLOOR = "import torch, timm"
COMMANDS = {  # name: the interpreter's arguments
    FLOOR: ["-c", "import torch, timm"],
    "import spach": ["-c", "import spach"],
    "spach --help": ["-m", "spach", "--help"],
    "spach models": ["-m", "spach", "models"],
}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(args: list[str], src: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of the interpreter with `src` first on the path (its output discarded)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    started, cpu = time.perf_counter(), _cpu()
    subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, _cpu() - cpu


def measure(checkouts: dict[str, Path], rounds: int) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """{(checkout, command): (wall, CPU) seconds of each round}; the floor does not depend on the checkout."""
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(rounds):
        for name, args in COMMANDS.items():
            for label, src in checkouts.items():
                if name == FLOOR and label != next(iter(checkouts)):
                    continue
                times.setdefault((label, name), []).append(time_once(args, src))
        print(f"round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", type=Path, help="another checkout's src/ folder, timed in the same rounds")
    args = parser.parse_args(argv)
    checkouts = {"this checkout": SRC, **({"before": args.before.resolve()} if args.before else {})}
    load_before = os.getloadavg()
    times = measure(checkouts, args.rounds)
    load_after = os.getloadavg()
    floors = [statistics.median(t[k] for t in times[(next(iter(checkouts)), FLOOR)]) for k in (0, 1)]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; load average (1/5/15 min) {' / '.join(f'{x:.1f}' for x in load_before)} "
          f"before, {' / '.join(f'{x:.1f}' for x in load_after)} after; {args.rounds} rounds; Python {platform.python_version()}")
    head = f"{'median':>7s} {'min-max':^13s} {'- floor':>8s} {'/ floor':>7s}"
    print(f"{'':35s} {'wall time (s)':^38s}   {'CPU time, user + system (s)':^38s}")
    print(f"{'checkout':14s} {'command':20s} {head}   {head}")
    for (label, name), ts in times.items():
        cols = []
        for k, floor in enumerate(floors):
            xs = [t[k] for t in ts]
            med = statistics.median(xs)
            cols.append(f"{med:7.2f} {min(xs):6.2f}-{max(xs):<6.2f} {med - floor:8.2f} {med / floor:7.2f}")
        print(f"{label:14s} {name:20s} {cols[0]}   {cols[1]}")


if __name__ == "__main__":
    main()
