import contextlib
import json
import os
import pathlib
import resource
import signal
import subprocess

import pytest
import torch

from spach.cli import main

# shared/ beside the clone; SPACH_REFERENCE_DIR points elsewhere (a git worktree nested one level deeper)
REFERENCE = pathlib.Path(
    os.environ.get("SPACH_REFERENCE_DIR") or pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
)
LAYOUT_FILE = REFERENCE / "official_checkpoint_layout.json"
LAYOUT_FILE_2B = REFERENCE / "official_checkpoint_layout_smlp_shiftvit.json"


def _read_layout(path: pathlib.Path) -> dict:
    if not path.exists():
        if os.environ.get("CI"):  # CI always has shared/ beside the clone: a missing file is a failure there
            pytest.fail(f"official layout reference not found at {path}")
        pytest.skip(f"official layout reference not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def layout() -> dict:
    """The 21 SPACH entries (DESIGN.md 2)."""
    return _read_layout(LAYOUT_FILE)


@pytest.fixture(scope="session")
def layout_2b() -> dict:
    """The 12 sMLPNet and ShiftViT entries (DESIGN.md 2b)."""
    return _read_layout(LAYOUT_FILE_2B)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the default init hides the mixers behind gamma=1e-4 and a zero head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model


# A small spach model for CLI runs, and the project's bad-input contract (exit 2, one line, no traceback).
TINY_KW = json.dumps({"net_arch": [["conv", 1]], "hidden_dim": 8, "patch_size": 4, "num_heads": 1})


def cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# Processes a test starts: each in a session (process group) of its own, and the whole group killed when
# the test ends, passed, failed or timed out, so nothing it started (battle workers, submitit jobs) runs on.
_STARTED: list[subprocess.Popen] = []


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn(args: list, background: bool = False, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen(args, **kwargs)` in a new session, its process group killed when the test ends.
    `background=True` starts it with SIGINT ignored, as a shell starts a background job (`cmd &`, nohup)."""
    proc = subprocess.Popen(args, start_new_session=True, preexec_fn=_ignore_sigint if background else None, **kwargs)
    _STARTED.append(proc)
    return proc


def run_process(args: list, timeout: float = 300, check: bool = False, capture_output: bool = False,
                **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` through `spawn`: when it times out, its whole process group is killed, not only it."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = spawn(args, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group `spawn` gave `proc` (whatever of it still runs), then reap `proc`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    yield
    while _STARTED:
        kill_group(_STARTED.pop())


@contextlib.contextmanager
def memory_cap(gb: float = 4.0):
    """At most `gb` more of address space inside the block: a test of a size check that regresses fails with
    an allocation error instead of taking the machine's memory (and other processes with it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(pathlib.Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (min(used + int(gb * 2**30), hard if hard != resource.RLIM_INFINITY else 2**62), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
