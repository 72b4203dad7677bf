"""`spach bench` end to end on a tiny setting: records, table, JSON, CSV and PNG plots."""
import csv
import json
import re

import pytest
import torch

from spach import bench, cli
from spach.errors import SpachError

TINY = ["--img-size", "64", "--batch-size", "2", "--quick", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cli_bench_writes_table_json_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    cli.main([
        "bench", "spach_ms_xxs_patch4_224_attn", "spach_ms_xxs_patch4_224_mlp", *TINY, "--mode", "both",
        "--sweep", "--sweep-batch-sizes", "1,2", "--sweep-img-sizes", "64,96", "--sweep-mixers", "conv,window,window4,dwconv7",
        "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"), "--plots", str(out),
    ])
    printed = capsys.readouterr()
    table = printed.out
    assert "spach_ms_xxs_patch4_224_mlp" in table and "matmul peak" in table
    assert "mixers in spach_ms_xxs_patch4_224_attn's layout and width" in table and "\ndwconv7 " in table
    # a 7x7 window does not tile the 16x16 grid of a 64-pixel pyramid: left out with a note, the sweep goes on
    assert "note: the mixer sweep of spach_ms_xxs_patch4_224_attn leaves out window7: window7: 7x7 windows do not tile" in printed.err

    data = json.loads((tmp_path / "r.json").read_text())
    records, sweep = data["records"], data["sweep"]
    assert [r["model"] for r in records] == ["spach_ms_xxs_patch4_224_attn", "spach_ms_xxs_patch4_224_mlp"]
    for r in records:
        assert r["params"] > 1e6 and r["macs"] > 0 and r["img_size"] == 64 and r["family"] in ("attn", "mlp")
        for key in ("infer_img_s", "latency_ms", "train_img_s", "matmul_peak_gflops", "infer_peak_frac", "train_mem_mb"):
            assert r[key] > 0, key
        assert r["infer_img_s_low"] <= r["infer_img_s"] <= r["infer_img_s_high"]
        assert r["top1"] is None  # released ImageNet numbers hold at 224 px only
    assert {(r["extra"]["sweep"], r["img_size"], r["batch_size"]) for r in sweep if r["model"].endswith("attn")} == {
        ("batch", 64, 1), ("batch", 64, 2), ("img", 64, 2), ("img", 96, 2), ("mixer", 64, 2)}
    mixers = {r["extra"]["mixer"]: r for r in sweep if r["extra"]["sweep"] == "mixer" and r["model"].endswith("attn")}
    assert sorted(mixers) == ["conv", "dwconv7", "window4"] and mixers["conv"]["extra"]["x_conv"] == 1.0
    assert mixers["window4"]["family"] == "window4" and mixers["window4"]["train_img_s"] > 0  # --mode both
    assert mixers["conv"]["macs"] < mixers["dwconv7"]["macs"] < mixers["window4"]["macs"]

    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) + len(sweep) and float(rows[0]["infer_img_s"]) > 0

    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["throughput_vs_batch.png", "throughput_vs_img.png", "throughput_vs_macs.png",
                    "throughput_vs_mixer_spach_ms_xxs_patch4_224_attn.png", "throughput_vs_mixer_spach_ms_xxs_patch4_224_mlp.png"]
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_api_returns_records_and_swin_protocol_counts():
    proto = bench.Protocol.named("swin")
    assert (proto.warmup, proto.repeats, proto.swin) == (50, 30, True)
    assert proto.rate(10, [1.0, 3.0]) == (5.0, 10 / 3, 10.0)  # mean over the total time, min-max spread

    torch.set_num_threads(1)
    [rec] = bench.run(["spach_ms_xxs_patch4_224_conv"], batch_size=2, img_size=32, quick=True, progress=False, latency=False)
    assert rec["infer_img_s"] > 0 and rec["train_img_s"] is None and rec["latency_ms"] is None
    assert rec["mem_method"] in ("vmhwm", "ru_maxrss")


@pytest.mark.parametrize("argv, match", [
    (["bench", "spach_nope"], "unknown model"),
    (["bench", "spach_ms_xxs_patch4_224_conv", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "x"], "cuda|unknown model"),
    (["bench", "spach_ms_xxs_patch4_224_conv", "--threads", "0"], "threads"),
    (["bench", "spach_ms_xxs_patch4_224_conv", "--sweep", "--sweep-mixers", "conv,windw"], "unknown spatial mixer 'windw'"),
])
def test_cli_bench_user_errors_are_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err)


def test_matmul_peak_is_measured():
    torch.set_num_threads(1)
    assert bench.matmul_peak("cpu", "fp32", quick=True) > 0.5
    with pytest.raises(SpachError, match="dtype"):
        bench.matmul_peak("cpu", "fp64")


def test_top1_plots_from_records(tmp_path):
    from spach.bench.plots import write_plots

    [rec] = bench.run(["spach_ms_xxs_patch4_224_conv"], batch_size=1, img_size=64, quick=True, progress=False)
    records = [{**rec, "model": f"m{i}", "top1": 70.0 + i, "macs": rec["macs"] * (i + 1), "family": f}
               for i, f in enumerate(("conv", "attn", "mlp", "hybrid"))]
    [path] = write_plots(records, str(tmp_path), None)[1:]
    assert path.endswith("top1_vs_cost.png") and open(path, "rb").read(4) == b"\x89PNG"
