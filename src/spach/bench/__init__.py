"""Cost of models: params, MACs, throughput, latency, memory and distance to the matmul peak
(`spach bench`), and the fastest inference setup (`spach.optimize`)."""
from spach.bench.command import command, format_table, run, sweep
from spach.bench.measure import (
           BenchRecord,
           BenchSettings,
           Protocol,
           bench_model,
           matmul_peak,
)
from spach.bench.mixers import mixer_sweep

__all__ = ["BenchRecord", "BenchSettings", "Protocol", "bench_model", "command", "format_table", "matmul_peak",
           "mixer_sweep", "run", "sweep"]
