"""`pretrained=True`: the official checkpoints downloaded once into the cache, validated before they
enter it, loaded through spach's loader; every failure one line that leaves the cache clean. Served
by a local HTTP server (no internet) with official-layout checkpoints of random values built from the
reference layouts, the sources pointed at it with SPACH_WEIGHTS_URL."""
import argparse
import errno
import importlib
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch
from conftest import REFERENCE

import spach
from spach.cli import main
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
    """`/ok/FILE` serves the file (404 when there is none), `/cut/FILE` half of it under its full
    Content-Length, `/html/FILE` an error page, `/wrong/FILE` ShiftViT-T light's checkpoint, `/stall/FILE`
    its headers and a quarter of it, then nothing until the server shuts down, `/mute/FILE` nothing at all."""

    daemon_threads = True

    def __init__(self, files: dict):
        self.files, self.requests, self.stop = files, [], threading.Event()
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        kind, _, name = self.path.strip("/").partition("/")
        if kind == "mute":
            self.server.stop.wait(30)
            return
        body = self.server.files.get("shiftvit_tiny_light.pth" if kind == "wrong" else name)
        if kind == "html":
            body = b"<!DOCTYPE html>\n<html><body>Too many requests</body></html>"
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "stall":
            self.wfile.write(body[: len(body) // 4])
            self.wfile.flush()
            self.server.stop.wait(30)
            return
        self.wfile.write(body[: len(body) // 2] if kind == "cut" else body)
        self.close_connection = True

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


FAILURES = {
    "404": ("ok", r"cannot download the official weights of {name} from {src} \(HTTP 404 Not Found\); copy "
                  r"https://github.com/microsoft/SPACH/releases/download/v1.0/{file} to {cache}/{file}, set SPACH_WEIGHTS_URL "
                  r"to a mirror URL or a folder holding {file}, or load a copy with pretrained_cfg_overlay=dict\(file=PATH\)"),
    "refused": ("refused", r"cannot download the official weights of {name} from {src} \(\[Errno 111\] Connection refused\); "),
    "truncated": ("cut", r"the file downloaded from {src} is not the official checkpoint of {name} \(cannot read the file: "
                         r"the file is truncated or not a PyTorch checkpoint .*\); nothing was cached: try again, or copy "
                         r"the right file to {cache}/{file}$"),
    "html": ("html", r"the file downloaded from {src} is not the official checkpoint of {name} \(cannot read the file: it is "
                     r"a web page \(HTML\), not a checkpoint"),
    "wrong model": ("wrong", r"the file downloaded from {src} is not the official checkpoint of {name} \(checkpoint does not "
                             r"fit model {name} \(missing keys: .*; it is a ShiftViT checkpoint\)"),
    "stalled": ("stall", r"cannot download the official weights of {name} from {src} \(the server sent nothing for 0.5 s; "
                         r"SPACH_DOWNLOAD_TIMEOUT sets how long to wait\); copy "),
    "mute": ("mute", r"cannot download the official weights of {name} from {src} \(the server sent nothing for 0.5 s; "),
    "read-only cache": ("ok", r"cannot write to the weights cache {cache} \(Read-only file system\); point TORCH_HOME at a "
                              r"writable folder .*pretrained_cfg_overlay=dict\(file=PATH\)"),
}


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
    base = f"http://127.0.0.1:{port}/{kind}/"
    monkeypatch.setenv(weights.MIRROR_ENV, base)
    monkeypatch.setenv(weights.TIMEOUT_ENV, "0.5")
    expected = pattern.format(name=name, src=base + file, file=file, cache=_cache(tmp_path))
    with pytest.raises(spach.SpachError, match=expected) as e:
        timm.create_model(name, pretrained=True)
    assert "\n" not in str(e.value) and _cached(tmp_path) == []
    with pytest.raises(SystemExit) as exit_:  # the command line: the same line, exit 2
        main(["eval", "--model", name, "--pretrained", "--dataset", "tiny"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("spach eval: error: ")
    assert _cached(tmp_path) == []
    if case == "read-only cache":
        _cache(tmp_path).chmod(0o755)
        monkeypatch.undo()
        return
    # the next call downloads again, and succeeds once the source is right
    server.files = served
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}/ok/")
    before = len(server.requests)
    spach.create_model(name, pretrained=True)
    assert len(server.requests) == before + 1 and _cached(tmp_path) == [file]


def test_the_timeout_is_checked_and_put_back(server, monkeypatch, tmp_path):
    import socket
    for bad in ["0", "-3", "soon", "nan"]:
        monkeypatch.setenv(weights.TIMEOUT_ENV, bad)
        with pytest.raises(spach.SpachError, match=r"^SPACH_DOWNLOAD_TIMEOUT=.* is not a number of seconds above 0; "
                                                   r"e.g. SPACH_DOWNLOAD_TIMEOUT=120$"):
            spach.create_model(XXS, pretrained=True)
        assert _cached(tmp_path) == []
    monkeypatch.setenv(weights.TIMEOUT_ENV, "7")
    seen = []
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, progress=False: (seen.append(socket.getdefaulttimeout()),
                                                          Path(dst).write_bytes(served_file(server, url))))
    spach.create_model(XXS, pretrained=True)
    assert seen == [7.0] and socket.getdefaulttimeout() is None and _cached(tmp_path) == ["spach_ms_conv_xxs.pth"]


def served_file(server, url: str) -> bytes:
    return server.files[url.rsplit("/", 1)[1]]


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
    def cut(url, dst, progress=False):
        Path(dst).write_bytes(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.hub, "download_url_to_file", cut)
    with pytest.raises(KeyboardInterrupt):
        spach.create_model(XXS, pretrained=True)
    assert _cached(tmp_path) == []


def test_timm_cache_dir_is_honoured(server, tmp_path):
    timm.create_model(SHIFT, pretrained=True, cache_dir=tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["shiftvit_tiny_light.pth"] and _cached(tmp_path) == []
