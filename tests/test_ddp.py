"""The 2-process CPU DDP run (gloo) that CI runs: torchrun -m spach train."""
import json
import os
import sys

from conftest import run_process
from test_engine import TINY


def test_two_process_ddp_run(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "spach", "train",
           "--preset", "tiny", "--model", "spach", "--model-kwargs", json.dumps(TINY), "--epochs", "2",
           "--repeated-aug", "3", "--eval-train-subset", "30", "--output", "run"]
    p = run_process(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("epoch 2/2 train_loss") == 1  # only rank 0 reports
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:  # metrics are reduced over both shards: whole-image fractions of 64 val and 30 train-eval images
        assert abs(r["top1"] * 64 / 100 - round(r["top1"] * 64 / 100)) < 1e-6
        assert abs(r["train_eval_top1"] * 30 / 100 - round(r["train_eval_top1"] * 30 / 100)) < 1e-6
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["total_batch"] == 64
