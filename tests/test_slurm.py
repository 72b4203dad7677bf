"""Battles of batch jobs (issue 13): `--launcher submitit-local` runs real jobs through submitit's
LocalExecutor; `--launcher slurm` runs against a fake Slurm on PATH (tests/fake_slurm.py: sbatch,
srun, sacct and scontrol that record their arguments and answer like Slurm, and run the submitted
sbatch script as slurmd would). Tiny studies on the built-in `tiny` dataset: seconds per run."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import fake_slurm
import numpy as np
import pytest
import torch
from conftest import spawn

import spach
from spach.battle.job import JobLog, RunJob, distributed_env
from spach.battle.launchers import SubmititLauncher, make_launcher
from spach.battle.plan import plan
from spach.battle.runner import run_battle
from spach.battle.study import load_study, parse_study
from spach.cli import main
from spach.errors import SpachError
from spach.files import read_jsonl

try:
    import submitit  # noqa: F401
except ImportError:
    if os.environ.get("CI"):  # CI installs spach[test], which brings spach[slurm]
        raise
    pytest.skip("submitit is not installed: pip install 'spach[slurm]'", allow_module_level=True)

HOOKS = Path(__file__).with_name("job_hooks.py")
STUDY = f"""
[study]
name = "jobs"
seeds = [0, 1]
imports = ["{HOOKS}"]

[data]
dataset = "tiny"
train_subset = 64
val_subset = 32
workers = 0

[recipe]
epochs = 2
batch_size = 16
lr = 3e-3
lr_base_size = 0
warmup_epochs = 0
mixup = 0.0
cutmix = 0.0
aa = "none"
color_jitter = 0.0
reprob = 0.0
repeated_aug = 1
model_ema = false
drop_path = 0.0
eval_batch_size = 32

[[contestant]]
name = "conv"
arch = {{ net_arch = [["conv", 1]], hidden_dim = 8, patch_size = 4, num_heads = 1 }}

[[contestant]]
name = "attn"
arch = {{ net_arch = [["attn", 1]], hidden_dim = 8, patch_size = 4, num_heads = 1 }}
"""


def _metrics(out: Path) -> dict[str, list]:
    return {str(p.relative_to(out)): [(r["epoch"], r["train_loss"], r["top1"]) for r in read_jsonl(p)]
            for p in sorted(out.glob("runs/*/*/metrics.jsonl"))}


def same_metrics(a: dict[str, list], b: dict[str, list], rtol: float = 1e-5) -> bool:
    """The same runs, epochs and top-1, and training losses equal to `rtol`. A run trained or resumed in another
    process can differ in the last digits of its loss (CPU BLAS kernels may depend on memory alignment): seen
    2e-8 after a mid-epoch resume, 6e-6 between processes."""
    return a.keys() == b.keys() and all(
        [(e, t) for e, _, t in a[k]] == [(e, t) for e, _, t in b[k]]
        and np.allclose([x for _, x, _ in a[k]], [x for _, x, _ in b[k]], rtol=rtol, atol=0) for k in a)


def _events(out: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(out)): [e["event"] for e in read_jsonl(p)] for p in sorted(out.glob("runs/*/*.jobs.jsonl"))}


@pytest.fixture(autouse=True)
def jobs_env(monkeypatch):
    """Job processes import the spach under test, and a Slurm state cached by an earlier test is forgotten."""
    import submitit

    src = str(Path(spach.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    submitit.SlurmJob.watcher.clear()


@pytest.fixture
def fake_slurm_on_path(tmp_path, monkeypatch):
    def install(run: bool = False) -> Path:
        for key, value in fake_slurm.install(tmp_path / "bin", tmp_path / "slurm", run=run).items():
            monkeypatch.setenv(key, value)
        return tmp_path / "slurm"
    yield install
    fake_slurm.kill_jobs(tmp_path / "slurm")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The study's metrics trained by the local pool in one thread (the jobs train with cpus_per_task = 1)."""
    out = tmp_path_factory.mktemp("local") / "b"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_battle(parse_study(STUDY), out, report=False, stream=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    return _metrics(out)


def _study(tmp_path: Path, text: str = STUDY) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ submitit-local: real jobs here
@pytest.mark.slow
def test_local_jobs_finish_and_a_preempted_one_resumes_exactly(tmp_path, monkeypatch, uninterrupted):
    monkeypatch.setenv("SPACH_TEST_PREEMPT", str(tmp_path / "preempted"))
    out, log = tmp_path / "b", io.StringIO()
    launcher = make_launcher("submitit-local", out, {"cpus_per_task": 1})
    report = run_battle(load_study(_study(tmp_path)), out, stream=log, launcher=launcher)
    text = log.getvalue()
    assert report.is_file() and "queue: 0 pending, 0 running, 0 requeued; 4 done, 0 failed (of 4 runs)" in text
    assert same_metrics(_metrics(out), uninterrupted)  # the requeued run too: it resumed from its mid-epoch checkpoint
    events = _events(out)
    assert sorted(events.values()) == [["submitted", "started", "finished"]] * 3 + [
        ["submitted", "started", "requeued", "started", "finished"]]  # one job per run, one requeued in place
    assert "was preempted or reached its time limit" in text and "(start 2: resuming from its checkpoint)" in text
    ledger = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in ledger] == ["done"] * 4 and len({r["job_id"] for r in ledger}) == 4
    assert all(r["launcher"] == "submitit-local" and Path(r["log"]).is_file() for r in ledger)
    assert json.loads((out / "launcher.json").read_text())["flags"] == {"cpus_per_task": 1}


@pytest.mark.slow
def test_the_monitor_stopped_and_rerun_watches_the_same_jobs(tmp_path, monkeypatch):
    go = tmp_path / "go"
    monkeypatch.setenv("SPACH_TEST_HOLD", str(go))  # the jobs wait at their first step until the test says go
    study, out = _study(tmp_path), tmp_path / "b"
    with (tmp_path / "first.txt").open("w") as first_log:
        first = spawn([sys.executable, "-m", "spach", "battle", str(study), "--output", str(out), "--launcher",
                       "submitit-local", "--cpus-per-task", "1"], stdout=first_log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    _wait_until_started(out, 4, deadline)
    first.send_signal(signal.SIGINT)  # Ctrl-C for the monitor only: its jobs go on
    assert first.wait(timeout=60) == 130
    assert "monitor stopped: 4 job(s) stay running on this machine and keep training" in (tmp_path / "first.txt").read_text()
    second_log = tmp_path / "second.txt"
    with second_log.open("w") as f:  # no --launcher: the study folder's own (submitit-local, --cpus-per-task 1)
        second = spawn([sys.executable, "-m", "spach", "battle", "--output", str(out)], stdout=f, stderr=subprocess.STDOUT)
        while second_log.read_text().count("already in the queue (running") < 4 and time.time() < deadline:
            time.sleep(0.2)
        go.touch()
        assert second.wait(timeout=240) == 0, second_log.read_text()[-3000:]
    text = second_log.read_text()
    assert "submitted:" not in text and "queue: 0 pending, 0 running, 0 requeued; 4 done" in text
    assert sorted(events for events in _events(out).values()) == [["submitted", "started", "finished"]] * 4
    assert [r["status"] for r in read_jsonl(out / "results.jsonl")] == ["done"] * 4 and (out / "report.html").is_file()


def _wait_until_started(out: Path, jobs: int, deadline: float) -> None:
    while sum(e.count("started") for e in _events(out).values()) < jobs and time.time() < deadline:
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_monitor_started_in_the_background_stops_on_sigint_and_sigterm(stop, tmp_path, monkeypatch):
    """A background job (`spach battle ... &`, nohup, a script's) starts with SIGINT ignored: the monitor
    still stops on SIGINT, and on SIGTERM, with its message; the job stays (the test's clean-up kills it)."""
    monkeypatch.setenv("SPACH_TEST_HOLD", str(tmp_path / "go"))  # the job waits at its first step
    one_job = STUDY.replace("seeds = [0, 1]", "seeds = [0]").split('[[contestant]]\nname = "attn"')[0]
    study, out = _study(tmp_path, one_job), tmp_path / "b"
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        monitor = spawn([sys.executable, "-m", "spach", "battle", str(study), "--output", str(out), "--launcher",
                         "submitit-local", "--cpus-per-task", "1"], stdout=f, stderr=subprocess.STDOUT, background=True)
    _wait_until_started(out, 1, time.time() + 240)
    monitor.send_signal(stop)
    assert monitor.wait(timeout=60) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "monitor stopped: 1 job(s) stay running on this machine and keep training" in text
    assert text.rstrip().endswith("spach battle: interrupted") and "Traceback" not in text


def test_a_two_task_job_is_one_distributed_training(tmp_path):
    import submitit

    study = parse_study(STUDY.replace("seeds = [0, 1]", "seeds = [0]"))
    run = plan(study, tmp_path / "b")[0]
    executor = submitit.AutoExecutor(tmp_path / "jobs", cluster="local")
    executor.update_parameters(tasks_per_node=2, timeout_min=10)  # what --gpus-per-node 2 asks for, on CPU (gloo)
    record, other = executor.submit(RunJob(run, study.imports, threads=1)).results()
    assert record["status"] == "done" and other is None  # rank 0 records, rank 1 only trains
    resolved = json.loads((run.folder / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["total_batch"] == 32
    assert [e["event"] for e in JobLog(run).events()] == ["started", "finished"]


def test_tasks_get_torchruns_variables():
    env = SimpleNamespace(num_tasks=16, num_nodes=2, global_rank=9, local_rank=1, job_id="4242", hostnames=["n1", "n2"])
    assert distributed_env(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                                    "MASTER_ADDR": "n1", "MASTER_PORT": str(20000 + 4242)}
    assert distributed_env(SimpleNamespace(num_tasks=1)) == {}


# ------------------------------------------------------------------ Slurm (fake, on PATH)
def test_the_paper_presets_first_job_script(tmp_path, fake_slurm_on_path):
    slurm = fake_slurm_on_path()
    study = load_study(preset="paper")
    study.data["data_path"] = "/data/imagenet"
    out = tmp_path / "battles" / "paper"
    launcher = make_launcher("slurm", out, {"gpus_per_node": 8, "cpus_per_task": 10, "partition": "learnfair",
                                            "timeout_min": 4320, "account": "vision", "extra": {"qos": "high"}})
    launcher.check(study)
    run = plan(study, out)[0]
    job = launcher.submit(run)
    script = (slurm / f"job{job.job_id}.sh").read_text()
    for line in ("#SBATCH --nodes=1", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --partition=learnfair", "#SBATCH --account=vision",
                 "#SBATCH --qos=high", "#SBATCH --time=4320", "#SBATCH --job-name=spach-paper-conv-xxs-seed0",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@120", f"#SBATCH --error={out}/jobs/%j_0_log.err"):
        assert line in script.splitlines(), line
    assert script.splitlines()[-1].startswith("srun --unbuffered") and "-m submitit.core._submit" in script
    assert [(e["event"], e["job_id"]) for e in JobLog(run).events()] == [("submitted", job.job_id)]


@pytest.mark.slow
def test_slurm_jobs_preempted_requeued_or_killed_are_recorded(tmp_path, monkeypatch, fake_slurm_on_path, uninterrupted):
    slurm = fake_slurm_on_path(run=True)
    monkeypatch.setenv("SPACH_TEST_KILL", str(tmp_path / "killed"))  # the first job at epoch 1 step 2 is killed
    monkeypatch.setenv("SPACH_TEST_PREEMPT", str(tmp_path / "preempted"))  # the next at epoch 2 step 2 preempted
    study = load_study(_study(tmp_path, STUDY.replace("seeds = [0, 1]", "seeds = [0]")))
    out, log = tmp_path / "b", io.StringIO()
    run_battle(study, out, stream=log, launcher=SubmititLauncher("slurm", out, {"cpus_per_task": 1}, poll_s=0.3))
    ledger = {r["contestant"]: r for r in read_jsonl(out / "results.jsonl")}
    done, failed = (next(r for r in ledger.values() if r["status"] == s) for s in ("done", "failed"))
    assert fake_slurm.calls(slurm, "scontrol") == [f"requeue {done['job_id']}"]  # submitit's requeue, as on Slurm
    assert _events(out)[f"runs/{done['contestant']}/seed0.jobs.jsonl"] == [
        "submitted", "started", "requeued", "started", "finished"]
    key = f"runs/{done['contestant']}/seed0/metrics.jsonl"
    assert same_metrics({key: _metrics(out)[key]}, {key: uninterrupted[key]})
    assert failed["error"] == f"job {failed['job_id']} ended (FAILED) without finishing"
    assert failed["log"] == str(out / "jobs" / f"{failed['job_id']}_0_log.err")
    error_file = out / "runs" / failed["contestant"] / "seed0.error.txt"
    assert error_file.read_text().startswith(f"{failed['error']}\nlog: {failed['log']}")
    assert f"FAILED: {failed['error']} (traceback: {error_file}, log: {failed['log']})" in log.getvalue()


def _cli(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["battle", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line, no traceback
    return err


def test_slurms_refusal_is_one_line_and_nothing_is_submitted(tmp_path, capsys, fake_slurm_on_path):
    slurm = fake_slurm_on_path()
    out = tmp_path / "b"
    err = _cli(capsys, str(_study(tmp_path)), "--output", str(out), "--launcher", "slurm", "--partition", "nope")
    assert err == ("spach battle: error: Slurm refused the job of conv seed 0: invalid partition specified: nope; Batch "
                   "job submission failed: Invalid partition name specified; check --partition, --account and --slurm "
                   "(sinfo lists the partitions, sacctmgr show associations user=$USER your accounts)\n")
    assert len(fake_slurm.calls(slurm, "sbatch")) == 1 and _events(out) == {} and not (out / "launcher.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--launcher", "pbs"], "unknown launcher 'pbs'; choose one of local, submitit-local, slurm"),
    (["--launcher", "slurm"], ("--launcher slurm: sbatch is not on PATH (no Slurm here); run the battle on the "
                               "cluster's login node, or use --launcher local")),
    (["--partition", "gpu"], "--partition sets the resources of a batch job; add --launcher slurm (or submitit-local)"),
    (["--launcher", "submitit-local", "--nodes", "0"], "--nodes: must be >= 1, got 0"),
    (["--launcher", "submitit-local", "--nodes", "2"], ("--nodes: --launcher submitit-local runs on this machine; got 2 "
                                                        "nodes, use 1")),
    (["--launcher", "submitit-local", "--slurm", "qos"], "--slurm expects KEY=VALUE"),
    (["--launcher", "submitit-local", "--slurm", "nodes=0"], "--slurm nodes: is set by --nodes, which checks it against "
                                                              "the study; use --nodes instead"),
    (["--launcher", "submitit-local", "--slurm", "NODES=2"], "--slurm nodes: is set by --nodes, which checks it against "
                                                             "the study; use --nodes instead"),
    (["--launcher", "submitit-local", "--slurm", "Gpus-Per-Node=2"], "--slurm gpus_per_node: is set by --gpus-per-node"),
    (["--launcher", "submitit-local", "--slurm", "gpus_per_node=2"], "--slurm gpus_per_node: is set by --gpus-per-node"),
    (["--launcher", "submitit-local", "--slurm", "ntasks_per_node=4"], ("--slurm ntasks_per_node: is set by "
                                                                        "--gpus-per-node (one task per GPU)")),
    (["--launcher", "submitit-local", "--slurm", "timeout_min=-5"], "use --timeout-min instead"),
    (["--launcher", "submitit-local", "--slurm", "slurm_cpus_per_task=0"], "use --cpus-per-task instead"),
    (["--launcher", "submitit-local", "--slurm", "time=60"], "--slurm time: is set by --timeout-min"),
    (["--launcher", "submitit-local", "--slurm", "colour=blue"], ("submitit refuses slurm_colour = 'blue': Unknown "
                                                                  "argument 'colour' for executor 'slurm'")),
])
def test_bad_launcher_input_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here
    out = tmp_path / "b"
    assert message in _cli(capsys, str(_study(tmp_path)), "--output", str(out), *args)
    assert not (out / "runs").exists()


def test_gpus_for_a_cpu_study_are_refused(tmp_path, capsys, fake_slurm_on_path):
    fake_slurm_on_path()
    study = _study(tmp_path, STUDY.replace("epochs = 2", "epochs = 2\ndevice = \"cpu\""))
    err = _cli(capsys, str(study), "--output", str(tmp_path / "b"), "--launcher", "slurm", "--gpus-per-node", "2")
    assert err == ("spach battle: error: --gpus-per-node: 2 GPU(s) per node asked for, but the study's recipe says "
                   "device = \"cpu\"; ask for no GPU, or set recipe.device = \"auto\"\n")
    study.write_text(study.read_text() + "\n[slurm]\ngpus_per_node = 4\npartition = \"gpu\"\n")
    assert f"{study}: slurm.gpus_per_node: 4 GPU(s) per node" in _cli(capsys, str(study), "--output", str(tmp_path / "b"),
                                                                     "--launcher", "slurm")


def test_the_slurm_table_is_checked_by_field():
    for table, message in (("gpu_per_node = 2", "slurm.gpu_per_node: unknown key; did you mean 'gpus_per_node'?"),
                           ("nodes = \"two\"", "slurm.nodes: expected an integer, got 'two'"),
                           ("timeout_min = 0", "slurm.timeout_min: must be >= 1, got 0"),
                           ("extra = 3", "slurm.extra: expected a table, got 3"),
                           ("extra = { nodes = 0 }", "slurm.extra.nodes: is set by slurm.nodes, which checks it"),
                           ("extra = { NODES = 2 }", "slurm.extra.NODES: is set by slurm.nodes, which checks it"),
                           ("extra = { ntasks_per_node = 4 }", "slurm.extra.ntasks_per_node: is set by "
                                                               "slurm.gpus_per_node .one task per GPU.")):
        with pytest.raises(SpachError, match=message):
            parse_study(STUDY + f"\n[slurm]\n{table}\n", source="s.toml")
    study = parse_study(STUDY + "\n[slurm]\ngpus_per_node = 8\nextra = { QOS = \"high\", mem-gb = 64 }\n")
    assert study.slurm == {"gpus_per_node": 8, "extra": {"qos": "high", "mem_gb": 64}}  # submitit's names
