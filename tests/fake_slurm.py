"""A fake Slurm for the tests (there is none on the CI machine): `install(bin_dir, state_dir)` writes
sbatch, srun, sacct and scontrol scripts that record their arguments in `state_dir` and answer like
Slurm. sbatch refuses a script asking for partition "nope" with Slurm's own messages; otherwise it
keeps the script as `job<id>.sh` and, when `state_dir/run` exists, runs it in the background as
slurmd would: SLURM_* variables, srun writing the task's logs, and `scontrol requeue <id>` (what
submitit calls on preemption) running the same job again once its process has exited. Each such slurmd
is a session of its own (as slurmd is no child of sbatch); `kill_jobs(state_dir)` ends them all."""
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

TOOLS = ("sbatch", "srun", "sacct", "scontrol")
SCRIPT = """#!{python}
import sys
sys.path.insert(0, {here!r})
import fake_slurm
fake_slurm.{tool}(sys.argv[1:])
"""


def install(bin_dir: Path, state_dir: Path, run: bool = False) -> dict[str, str]:
    """Write the tools; returns the environment variables that put them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(SCRIPT.format(python=sys.executable, here=str(Path(__file__).parent), tool=tool))
        path.chmod(0o755)
    if run:
        (state_dir / "run").touch()
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(state_dir)}


def calls(state_dir: Path, tool: str) -> list[str]:
    path = Path(state_dir) / f"{tool}.calls"
    return path.read_text().splitlines() if path.is_file() else []


def _dir() -> Path:
    return Path(os.environ["FAKE_SLURM"])


def _record(tool: str, args: list[str]) -> None:
    with open(_dir() / f"{tool}.calls", "a") as f:
        f.write(" ".join(args) + "\n")


def _state(job_id: str, state: str) -> None:
    (_dir() / f"state.{job_id}").write_text(state)


def sbatch(args: list[str]) -> None:
    _record("sbatch", args)
    script = Path(args[-1]).read_text()
    if "--partition=nope" in script:
        print("sbatch: error: invalid partition specified: nope", file=sys.stderr)
        print("sbatch: error: Batch job submission failed: Invalid partition name specified", file=sys.stderr)
        sys.exit(1)
    job_id = str(1001 + len(list(_dir().glob("job*.sh"))))
    (_dir() / f"job{job_id}.sh").write_text(script)
    _state(job_id, "PENDING")
    if (_dir() / "run").exists():
        subprocess.Popen([sys.executable, __file__, job_id], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job_id}")


def slurmd(job_id: str) -> None:
    """Run job `job_id`'s script as Slurm would, again after each `scontrol requeue`."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # slurmd is no child of sbatch: no signal mask of the monitor's
    (_dir() / f"slurmd.{job_id}").write_text(str(os.getpid()))
    requeue = _dir() / f"requeue.{job_id}"
    while True:
        _state(job_id, "RUNNING")
        env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "fakenode"}
        code = subprocess.call(["bash", str(_dir() / f"job{job_id}.sh")], env=env)
        if requeue.exists():
            requeue.unlink()
            _state(job_id, "REQUEUED")
            continue
        _state(job_id, "COMPLETED" if code == 0 else "FAILED")
        return


def kill_jobs(state_dir: Path) -> None:
    """SIGKILL to every job's slurmd session (the job's processes): none outlives the test that started it."""
    for path in Path(state_dir).glob("slurmd.*"):
        try:
            os.killpg(int(path.read_text()), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass


def srun(args: list[str]) -> None:
    """srun [--unbuffered] --output OUT --error ERR [--flags] CMD...: one task, its logs where Slurm writes them."""
    logs, i = {}, 0
    while i < len(args) and args[i].startswith("--"):
        if args[i] in ("--output", "--error"):
            logs[args[i]] = args[i + 1].replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0")
            i += 1
        i += 1
    with open(logs["--output"], "a") as out, open(logs.get("--error", logs["--output"]), "a") as err:
        sys.exit(subprocess.call(args[i:], stdout=out, stderr=err))


def sacct(args: list[str]) -> None:
    """sacct -o JobID,State,NodeList --parsable2 -j ID ...: the states slurmd wrote."""
    _record("sacct", args)
    print("JobID|State|NodeList")
    for flag, job_id in itertools.pairwise(args):
        path = _dir() / f"state.{job_id}"
        if flag == "-j" and path.is_file():
            print(f"{job_id}|{path.read_text()}|fakenode")


def scontrol(args: list[str]) -> None:
    _record("scontrol", args)
    if args[:1] == ["requeue"]:
        (_dir() / f"requeue.{args[1]}").touch()


if __name__ == "__main__":
    slurmd(sys.argv[1])
