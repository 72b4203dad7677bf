"""`pretrained=True`: the official checkpoints downloaded once into the cache, validated before they
enter it, loaded through spach's loader; every failure one line that leaves the cache clean. Served
by a local HTTP server (no internet) with official-layout checkpoints of random values built from the
reference layouts, the sources pointed at it with SPACH_WEIGHTS_URL."""
import argparse
import errno
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
from conftest import REFERENCE, spawn

import spach
from spach.cli import main
from spach.files import FolderLock
from spach.models import weights
from spach.models.registry import family_of_variant
from spach.models.table import model_rows

XXS = "spach_ms_xxs_patch4_224_conv"
SHIFT = "shiftvit_light_tiny"


@pytest.fixture(scope="session")
def released(layout, layout_2b) -> dict:
    path = REFERENCE / "official_weights.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())["weights"]


def _official_shapes(name: str, layout: dict, layout_2b: dict) -> dict:
    if name == "spach_ms_s_plus_patch4_224_hybrid":
        return layout["spach_ms_s_patch4_224_hybrid_conv4stem"]["state_dict"]
    return next(e["state_dict"] for e in [*layout.values(), *layout_2b.values()]
                if e["factory"] == name and not e["factory_kwargs"])


def _official_checkpoint(shapes: dict, seed: int) -> dict:
    """An official-layout checkpoint of random values that costs a few kB: each tensor is a random
    last-axis vector broadcast over its shape (torch.save stores only the vector)."""
    g = torch.Generator().manual_seed(seed)
    model = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            model[key] = torch.tensor(7)
        else:
            model[key] = (torch.randn(shape[-1] if shape else (), generator=g) * 0.1 + 0.05).expand(shape)
    return {"model": model, "args": argparse.Namespace(model="official"), "epoch": 299}


@pytest.fixture(scope="session")
def served(released, layout, layout_2b, tmp_path_factory) -> dict:
    """File name -> bytes of each of the 14 official checkpoints (random values, official layout)."""
    folder = tmp_path_factory.mktemp("official")
    files = {}
    for seed, (name, entry) in enumerate(sorted(released.items())):
        path = folder / os.path.basename(entry["url"])
        torch.save(_official_checkpoint(_official_shapes(name, layout, layout_2b), seed), path)
        files[path.name] = path.read_bytes()
    return files


class Server(ThreadingHTTPServer):
    """`/<kind>/FILE`: `ok` serves the file (404 when there is none); `cut` half of it under its full
    Content-Length, `short` half of it under a Content-Length that says so; `html` an error page; `wrong`
    ShiftViT-T light's checkpoint; `stall` its headers and a quarter of it, then nothing until the server
    shuts down; `mute` nothing at all; `drip` its headers, then a byte a second (for 30 s). Broken HTTP: `garbage` a
    status line of garbage (with an ESC byte), `longheader` a 70 kB header line, `headers` 200 headers,
    `chunkcut` a chunked body cut in its first chunk, `chunkbad` a chunk size that is no number, `loop`
    a redirect to itself."""

    daemon_threads = True

    def __init__(self, files: dict):
        self.files, self.requests, self.stop = files, [], threading.Event()
        super().__init__(("127.0.0.1", 0), Handler)

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (a broken pipe): nothing to tell, and nothing on the stderr the tests read


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        kind, _, name = self.path.strip("/").partition("/")
        self.close_connection = True
        if kind == "mute":
            self.server.stop.wait(30)
            return
        if kind == "garbage":
            self.wfile.write(b"GARBAGE \x1b[31m\r\n\r\n")
            return
        if kind in ("loop", "longheader", "headers"):
            self.send_response(302 if kind == "loop" else 200)
            headers = {"loop": [("Location", self.path)], "longheader": [("X-Padding", "a" * 70_000)],
                       "headers": [(f"X-Header-{i}", "1") for i in range(200)]}[kind]
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            return
        body = self.server.files.get("shiftvit_tiny_light.pth" if kind == "wrong" else name)
        if kind == "html":
            body = b"<!DOCTYPE html>\n<html><body>Too many requests</body></html>"
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if kind in ("chunkcut", "chunkbad"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"zz\r\n" if kind == "chunkbad" else b"%x\r\n" % len(body) + body[: len(body) // 2])
            return
        self.send_header("Content-Length", str(len(body) // 2 if kind == "short" else len(body)))
        self.end_headers()
        if kind in ("stall", "drip"):
            self.wfile.write(body[: len(body) // 4] if kind == "stall" else b"")
            self.wfile.flush()
            for byte in body[:30] if kind == "drip" else []:
                if self.server.stop.wait(1):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            self.server.stop.wait(30)
            return
        self.wfile.write(body[: len(body) // 2] if kind in ("cut", "short") else body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(served, monkeypatch, tmp_path):
    srv = Server(served)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{srv.server_address[1]}/ok/")
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


def _cache(tmp_path) -> Path:
    return tmp_path / "torch" / "hub" / "checkpoints"


def _cached(tmp_path) -> list[str]:
    return sorted(p.name for p in _cache(tmp_path).iterdir()) if _cache(tmp_path).is_dir() else []


def test_every_released_checkpoint_is_its_models_source(released):
    for name, entry in released.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == entry["url"] and cfg.has_weights, name
        assert spach.OFFICIAL_TOP1[name] == entry["top1"] and str(entry["top1"]) in cfg.notes[0]
    assert weights.with_weights() == sorted(released)
    without = set(spach.list_models()) - set(released)
    assert not any(timm.models.get_pretrained_cfg(n).url for n in without)
    assert {m.split(".")[0] for m in timm.list_models(["spach*", "smlpnet*", "shiftvit*"], pretrained=True)} == set(released)


def test_every_released_checkpoint_downloads_and_validates(server, released, tmp_path):
    # the reference model is built on the meta device: all 14 conversions and strict fits in seconds
    for name, entry in released.items():
        path = weights.official_weights(name)
        assert path == _cache(tmp_path) / os.path.basename(entry["url"])
    assert _cached(tmp_path) == sorted(os.path.basename(e["url"]) for e in released.values())
    assert len(server.requests) == 14


def test_download_once_then_the_cache(server, tmp_path, served, capsys):
    model = timm.create_model(XXS, pretrained=True)
    official = torch.load(_cache(tmp_path) / "spach_ms_conv_xxs.pth", weights_only=False)["model"]
    assert official.keys() == spach.spach_to_official(model.state_dict()).keys()
    assert all(torch.equal(v, official[k]) for k, v in spach.spach_to_official(model.state_dict()).items())
    assert server.requests == ["/ok/spach_ms_conv_xxs.pth"] and _cached(tmp_path) == ["spach_ms_conv_xxs.pth"]
    assert "%|" not in capsys.readouterr().err  # no progress bar off a terminal
    again = spach.create_model(XXS, pretrained=True, num_classes=10)  # the cache: no second request
    assert len(server.requests) == 1 and again.get_classifier().out_features == 10
    assert torch.equal(again.state_dict()["stem.proj.weight"], model.state_dict()["stem.proj.weight"])


def test_progress_bar_on_a_terminal(server, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    spach.create_model(SHIFT, pretrained=True)
    assert "100%|" in capsys.readouterr().err


def test_file_overlay_and_features_still_take_their_ways(server, tmp_path):
    path = weights.official_weights(SHIFT)
    n = len(server.requests)
    own = timm.create_model(SHIFT, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    feats = timm.create_model(SHIFT, pretrained=True, features_only=True, out_indices=(3,))
    assert len(server.requests) == n
    key = "layers.3.blocks.0.mlp.fc1.weight"
    assert torch.equal(own.state_dict()[key], feats.model.state_dict()[key])


def _refuse_writes(monkeypatch) -> None:
    """A read-only cache: chmod does not stop root, so root sees the file system's EROFS."""
    real = Path.open

    def open_(self, mode="r", *args, **kwargs):
        if any(c in mode for c in "wxa"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


CANNOT = r"cannot download the official weights of {name} from {src} "
FAILURES = {
    "404": ("ok", CANNOT + r"\(HTTP 404 Not Found\); copy "
                  r"https://github.com/microsoft/SPACH/releases/download/v1.0/{file} to {cache}/{file}, set SPACH_WEIGHTS_URL "
                  r"to a mirror URL or a folder holding {file}, or load a copy with pretrained_cfg_overlay=dict\(file=PATH\)"),
    "refused": ("refused", CANNOT + r"\(\[Errno 111\] Connection refused\); "),
    "cut": ("cut", CANNOT + r"\(the server closed the connection after [\d.]+[kM]?B of [\d.]+[kM]?B\); copy "),
    "truncated": ("short", r"the file downloaded from {src} is not the official checkpoint of {name} \(cannot read the file: "
                           r"the file is truncated or not a PyTorch checkpoint .*\); nothing was cached: try again, or copy "
                           r"the right file to {cache}/{file}$"),
    "html": ("html", r"the file downloaded from {src} is not the official checkpoint of {name} \(cannot read the file: it is "
                     r"a web page \(HTML\), not a checkpoint"),
    "wrong model": ("wrong", r"the file downloaded from {src} is not the official checkpoint of {name} \(checkpoint does not "
                             r"fit model {name} \(missing keys: .*; it is a ShiftViT checkpoint\)"),
    "stalled": ("stall", CANNOT + r"\(the server sent nothing for 0.5 s; SPACH_DOWNLOAD_TIMEOUT sets how long to wait\); copy "),
    "mute": ("mute", CANNOT + r"\(the server sent nothing for 0.5 s; "),
    "dripping": ("drip", CANNOT + r"\(too slow: \d+B in 4 s, below the 1 MiB per 2 s a download must average; a higher "
                                  r"SPACH_DOWNLOAD_TIMEOUT allows a slower link\); copy "),
    "garbage status line": ("garbage", CANNOT + r"\(the server's answer is not valid HTTP \(BadStatusLine: GARBAGE "
                                                r"\\x1b\[31m\)\); copy "),
    "70 kB header line": ("longheader", CANNOT + r"\(the server's answer is not valid HTTP \(LineTooLong: got more than "
                                                 r"65536 bytes when reading header line\)\); copy "),
    "200 headers": ("headers", CANNOT + r"\(the server's answer is not valid HTTP \(HTTPException: got more than 100 "
                                        r"headers\)\); copy "),
    "cut chunked body": ("chunkcut", CANNOT + r"\(the connection broke off in the middle of the file\); copy "),
    "broken chunked body": ("chunkbad", CANNOT + r"\(the connection broke off in the middle of the file\); copy "),
    "redirect loop": ("loop", CANNOT + r"\(HTTP 302: the redirects go round in a loop or past 10\); copy "),
    "malformed URL": ("ok", r"cannot download the official weights of {name} from http://127.0.0.1:bad/ok/{file} "
                            r"\(not a valid URL: nonnumeric port: 'bad'\); copy "),
    "read-only cache": ("ok", r"cannot write to the weights cache {cache} \(Read-only file system\); point TORCH_HOME at a "
                              r"writable folder .*pretrained_cfg_overlay=dict\(file=PATH\)"),
}
# The cases about time: a stall or a mute server fails after 0.5 s; a byte a second keeps every read alive, so
# only the minimum rate stops it. Every other case gets time enough that a loaded machine cannot turn it into a
# "too slow" failure (the rate is checked after twice the timeout).
TIMEOUTS = {"stalled": "0.5", "mute": "0.5", "dripping": "2"}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failures_are_one_line_and_leave_the_cache_clean(case, server, served, monkeypatch, tmp_path, capsys):
    kind, pattern = FAILURES[case]
    name, file = XXS, "spach_ms_conv_xxs.pth"
    port = server.server_address[1]
    if case == "404":
        server.files = {k: v for k, v in served.items() if k != file}
    if case == "refused":
        probe = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a port nothing listens on once closed
        port = probe.server_address[1]
        probe.server_close()
    if case == "read-only cache":
        _cache(tmp_path).mkdir(parents=True)
        _cache(tmp_path).chmod(0o555)
        _refuse_writes(monkeypatch)
    base = f"http://127.0.0.1:{'bad' if case == 'malformed URL' else port}/{kind}/"
    monkeypatch.setenv(weights.MIRROR_ENV, base)
    monkeypatch.setenv(weights.TIMEOUT_ENV, TIMEOUTS.get(case, "10"))
    expected = pattern.format(name=name, src=re.escape(base + file), file=file, cache=_cache(tmp_path))
    with pytest.raises(spach.SpachError, match=expected) as e:
        timm.create_model(name, pretrained=True)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and _cached(tmp_path) == []
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained traceback either
    with pytest.raises(SystemExit) as exit_:  # the command line: the same line, exit 2
        main(["eval", "--model", name, "--pretrained", "--dataset", "tiny"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("spach eval: error: ")
    assert re.search(expected, err) and "Traceback" not in err and _cached(tmp_path) == []
    if case == "read-only cache":
        _cache(tmp_path).chmod(0o755)
        monkeypatch.undo()
        return
    # the next call downloads again, and succeeds once the source is right
    server.files = served
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}/ok/")
    monkeypatch.setenv(weights.TIMEOUT_ENV, "30")
    before = len(server.requests)
    spach.create_model(name, pretrained=True)
    assert len(server.requests) == before + 1 and _cached(tmp_path) == [file]


def test_the_timeout_is_checked_and_bounds_each_read(server, monkeypatch, tmp_path):
    import socket
    for bad in ["0", "-3", "soon", "nan"]:
        monkeypatch.setenv(weights.TIMEOUT_ENV, bad)
        with pytest.raises(spach.SpachError, match=r"^SPACH_DOWNLOAD_TIMEOUT=.* is not a number of seconds above 0; "
                                                   r"e.g. SPACH_DOWNLOAD_TIMEOUT=120$"):
            spach.create_model(XXS, pretrained=True)
        assert _cached(tmp_path) == []
    monkeypatch.setenv(weights.TIMEOUT_ENV, "7")
    seen, real = [], socket.create_connection

    def connect(address, timeout=None, *args, **kwargs):
        seen.append(timeout)
        return real(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", connect)
    spach.create_model(XXS, pretrained=True)
    assert seen == [7.0] and socket.getdefaulttimeout() is None and _cached(tmp_path) == ["spach_ms_conv_xxs.pth"]


def test_mirror_may_be_a_local_folder(served, monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "shiftvit_tiny_light.pth").write_bytes(served["shiftvit_tiny_light.pth"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(weights.MIRROR_ENV, str(mirror))
    spach.create_model(SHIFT, pretrained=True)
    assert _cached(tmp_path) == ["shiftvit_tiny_light.pth"]
    with pytest.raises(spach.SpachError, match=r"from file://.*/mirror/spach_ms_conv_xxs.pth \(\[Errno 2\] No such file"):
        spach.create_model(XXS, pretrained=True)


def test_models_without_weights_say_so_and_list_those_with():
    with pytest.raises(spach.SpachError) as e:
        timm.create_model("spach_ms_xs_patch4_224_hybrid", pretrained=True)
    msg = str(e.value)
    assert msg.startswith("no official weights are published for spach_ms_xs_patch4_224_hybrid; these models have them: "
                          "shiftvit_light_small, ") and "spach_ms_xxs_patch4_224_mlp;" in msg and "\n" not in msg
    with pytest.raises(spach.SpachError, match="no official weights are published for smlpnet_tiny"):
        spach.create_model("smlpnet_tiny", pretrained=True)


def test_eval_pretrained_without_a_path_evaluates_the_official_weights(server, monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_eval(model, pretrained, *args):
        seen.update(model=model, pretrained=pretrained)
        return dict(model=model, dataset="imagefolder", n=1, top1=1.0, top5=1.0, loss=1.0)

    monkeypatch.setattr(importlib.import_module("spach.train.evaluate"), "evaluate_checkpoint", fake_eval)  # what the CLI calls
    main(["eval", "--model", XXS, "--pretrained", "--data-path", str(tmp_path)])
    assert seen == dict(model=XXS, pretrained=str(_cache(tmp_path) / "spach_ms_conv_xxs.pth"))
    with pytest.raises(SystemExit):
        main(["eval", "--pretrained", "--data-path", str(tmp_path)])
    assert "--pretrained without a path evaluates the official weights of --model NAME" in capsys.readouterr().err


def test_models_table_shows_which_have_weights(capsys):
    rows = {r["name"]: r for r in model_rows("spach_ms_xs*")}
    assert rows["spach_ms_xs_patch4_224_hybrid"]["weights"] is None
    main(["models", "spach_ms_xxs*"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-1] == "weights" and all(line.split()[-1] == "yes" for line in out[2:])


@pytest.mark.slow
def test_timm_create_model_pretrained_for_all_14(server, released, tmp_path):
    for name, entry in released.items():
        model = timm.create_model(name, pretrained=True)
        assert model.pretrained_cfg["top1"] == entry["top1"]
        expected = family_of_variant(name).filter_fn(spach.read_checkpoint(weights.cache_path(entry["url"])), model)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), name
    assert len(server.requests) == 14


def test_an_interrupted_download_leaves_nothing(server, monkeypatch, tmp_path):
    def cut(url, out, timeout, progress=False):
        out.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "download", cut)
    with pytest.raises(KeyboardInterrupt):
        spach.create_model(XXS, pretrained=True)
    assert _cached(tmp_path) == []


KILLED = "import spach, sys; spach.create_model(sys.argv[1], pretrained=True)"


def _killed_download(tmp_path, how: signal.Signals) -> subprocess.Popen:
    """A download in another process, `how` sent to it once part of the file is in the cache."""
    proc = spawn([sys.executable, "-c", KILLED, XXS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.is_file() and p.stat().st_size and p.name != ".lock" for p in _cache(tmp_path).rglob("*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(how)
    proc.wait(timeout=60)
    return proc


@pytest.mark.slow
def test_sigterm_mid_download_leaves_nothing(server, monkeypatch, tmp_path):
    port = server.server_address[1]
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{port}/stall/")  # a quarter, then it waits
    proc = _killed_download(tmp_path, signal.SIGTERM)
    assert proc.returncode != 0 and _cached(tmp_path) == [], proc.stderr.read()[-2000:]


@pytest.mark.slow
def test_a_download_killed_with_sigkill_is_cleaned_up_by_the_next(server, monkeypatch, tmp_path):
    port = server.server_address[1]
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{port}/stall/")
    _killed_download(tmp_path, signal.SIGKILL)
    assert _cached(tmp_path)  # what the killed download left: nobody could remove it then
    # an earlier spach's temporary and torch.hub's, long abandoned; a recent one of torch.hub; a running download's
    old = [_cache(tmp_path) / ".spach_ms_conv_xxs.pth.0123abcd.part", _cache(tmp_path) / "spach_ms_conv_xxs.pth.4567ef.partial"]
    recent = _cache(tmp_path) / "spach_ms_conv_xxs.pth.89ab.partial"
    for path in [*old, recent]:
        path.write_bytes(b"half")
    for path in old:
        os.utime(path, (time.time() - 2 * weights.LEGACY_STALE_S,) * 2)
    running = FolderLock(_cache(tmp_path) / ".spach-download-1-running", "download folder").acquire()
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{port}/ok/")
    spach.create_model(XXS, pretrained=True)
    assert _cached(tmp_path) == [".spach-download-1-running", "spach_ms_conv_xxs.pth", recent.name]
    running.release()


def test_timm_cache_dir_is_honoured(server, tmp_path):
    timm.create_model(SHIFT, pretrained=True, cache_dir=tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["shiftvit_tiny_light.pth"] and _cached(tmp_path) == []
