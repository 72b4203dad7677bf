"""`spach export`: a model as ONNX or TorchScript for deployment, or as a timm model folder (see
`spach.hub_export`), checked by running (or loading back) what was exported.

The model is built the way `spach eval` builds it: a zoo name, `spach` with architecture overrides,
or any timm model; a spach training checkpoint (torch or safetensors) brings its own model name,
architecture and resolution, and any checkpoint its class count and input channels (read off the
weights, so the head is never a fresh one). The export has one input `images` `(batch, C, H, W)` with
a dynamic batch axis and a fixed resolution: `--img-size` for conv and attention models (default:
the model's own), and always the model's own for models whose weights are tied to it (token-mixing
MLPs, learned position embeddings). Before the file is written, it is run (onnxruntime for ONNX,
`torch.jit.load` for TorchScript) at two batch sizes other than the one traced, and its outputs must
match the PyTorch model's within `TOLERANCE` (fp32, max abs error).

A run folder (of `spach train`, or a battle's `runs/<contestant>/seed<k>`) stands for its best weights.
The output is checked before any work; the export is written in a hidden `.spach-export-tmp-*` folder
beside it (same file system: moved into place at the end), removed on Ctrl-C and SIGTERM, and one left by
a killed export (its lock is free) is removed by the next export into that folder.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from spach.errors import CheckpointError, SpachError, first_line
from spach.files import check_writable, make_dirs, os_error, read_json, scratch_folder
from spach.hub_export import TIMM_FILES, write_timm_folder
from spach.models.convert import head_and_channels, read_checkpoint
from spach.models.mixers import TokenMLP
from spach.signals import interrupting
from spach.train import checkpoint
from spach.train.config import MAX_IMG_SIZE, TrainConfig
from spach.train.evaluate import load_strict
from spach.train.factory import build_model

FORMATS = ("onnx", "torchscript", "timm")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # exporter, its op library, the runtime that checks the file
TOLERANCE = 1e-4
TRACE_BATCH, CHECK_BATCHES = 2, (1, 3)  # checked at batch sizes other than the traced one: the batch axis is dynamic
RUN_WEIGHTS = ("best.safetensors", "best.pth", "final.safetensors", "checkpoint.pth")  # a run folder's, best first
SCRATCH_PREFIX = ".spach-export-tmp-"


def export(model: str | None, output: str | Path, fmt: str, pretrained: str | None = None,
           model_kwargs: dict[str, Any] | None = None, img_size: int = 0, imports: list[str] | None = None) -> dict[str, Any]:
    """Export `model` (see the module docstring; a name, or a run folder) to `output` as `fmt`: a file for
    'onnx' and 'torchscript', a new or empty folder for 'timm'. Checks what it exported against the
    PyTorch model and returns what was done (`max_abs_error` included); writes only once that passed."""
    if fmt not in FORMATS:
        raise SpachError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    if fmt == "onnx":
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise SpachError(f"ONNX export needs {', '.join(missing)}: pip install 'spach[onnx]'")
    if not 0 <= img_size <= MAX_IMG_SIZE:
        raise SpachError(f"--img-size must lie in 1..{MAX_IMG_SIZE} (0: the model's own), got {img_size}")
    output = check_output(output, fmt)
    model, pretrained = run_source(model, pretrained)
    net, name = build(model, pretrained, model_kwargs, imports)
    size = resolution(net, name, img_size)
    if fmt == "timm":
        with scratch_beside(output) as tmp:
            r = write_timm_folder(net, name, pretrained, size, tmp / "model", TOLERANCE)
            make_dirs(output)
            for f in TIMM_FILES:  # config.json, what timm reads first, last
                _move(tmp / "model" / f, output / f)
        return {"model": name, "format": fmt, "output": str(output), "source": pretrained,
                "bytes": sum((output / f).stat().st_size for f in TIMM_FILES), "input_shape": ["batch", _in_chans(net), *size],
                "runtime": "timm.create_model('local-dir:...')", "max_abs_error": r["max_abs_error"]}
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, _in_chans(net), *size, generator=g) for b in (TRACE_BATCH, *CHECK_BATCHES)}
    try:
        with torch.no_grad():
            expected = {b: net(x) for b, x in inputs.items()}
    except Exception as e:  # a size the strides do not divide, ...
        raise SpachError(f"{name} does not run at {size[0]}x{size[1]} ({first_line(e)}); choose another --img-size") from None
    with scratch_beside(output) as tmp:
        path = tmp / f"model.{fmt}"
        try:
            _EXPORTERS[fmt](net, inputs[TRACE_BATCH], path)
        except Exception as e:  # the exporters raise many types
            raise SpachError(f"{fmt} export of {name} failed: {first_line(e)}") from None
        run = _RUNNERS[fmt](path)
        error = max((run(inputs[b]) - expected[b]).abs().max().item() for b in CHECK_BATCHES)
        if not error <= TOLERANCE:
            raise SpachError(f"the exported {name} differs from PyTorch by {error:.2e} (max abs, more than {TOLERANCE:g}); "
                             f"{output} was not written")
        size_bytes = path.stat().st_size
        with open(path, "rb+") as f:  # the exporters' own writes: on disk before the rename makes it the output
            os.fsync(f.fileno())
        _move(path, output)
    return {"model": name, "format": fmt, "output": str(output), "source": pretrained, "bytes": size_bytes,
            "input_shape": ["batch", _in_chans(net), *size], "checked_batches": list(CHECK_BATCHES),
            "runtime": "onnxruntime" if fmt == "onnx" else "torch.jit.load", "max_abs_error": error}


def check_output(output: str | Path, fmt: str) -> Path:
    """The output path, refused before any work when the export could not be written there: a folder
    for a file format; a file, or a folder holding files, for the timm format."""
    output = Path(output)
    if fmt == "timm":
        if output.exists() and not output.is_dir():
            raise SpachError(f"--output {output} is a file; the timm format writes a folder: pass a new or empty folder")
        if output.is_dir() and any(output.iterdir()):
            raise SpachError(f"--output {output} already holds files; the timm format writes a folder of its own: "
                             "pass a new or empty folder")
    elif output.is_dir():
        raise SpachError(f"--output {output} is a folder; pass the path of the file to write, e.g. {output / ('model.' + fmt)}")
    return check_writable(output, "--output", "folder" if fmt == "timm" else "file")


def run_source(model: str | None, pretrained: str | None) -> tuple[str | None, str | None]:
    """(model name, checkpoint file): a run folder, given as the model or as --pretrained, stands for its
    best weights; a battle contestant's folder holding one run per seed asks for one of them."""
    if model and Path(model).is_dir():
        if pretrained:
            raise SpachError(f"{model} is a run folder: pass either it or --pretrained {pretrained}, not both")
        model, pretrained = None, model
    if pretrained and Path(pretrained).is_dir():
        folder = Path(pretrained)
        found = next((folder / n for n in RUN_WEIGHTS if (folder / n).is_file()), None)
        if found is None:
            seeds = sorted(p.name for p in folder.iterdir() if p.is_dir() and any((p / n).is_file() for n in RUN_WEIGHTS))
            hint = f"it holds the runs {', '.join(seeds)}: pass one, e.g. {folder / seeds[0]}" if seeds else \
                "pass a run folder of spach train (or a battle's runs/<contestant>/seed<k>) or a checkpoint file"
            raise SpachError(f"{folder} holds no trained weights ({', '.join(RUN_WEIGHTS)}); {hint}")
        pretrained = str(found)
    return model, pretrained


@contextlib.contextmanager
def scratch_beside(output: Path) -> Iterator[Path]:
    """A private, locked folder beside `output` for the export in progress (`files.scratch_folder`),
    removed when the block ends, also on Ctrl-C and SIGTERM."""
    with interrupting(), scratch_folder(output, SCRATCH_PREFIX, "export scratch folder") as folder:
        yield folder


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        raise os_error(e, dst) from None


def build(model: str | None, pretrained: str | None = None, model_kwargs: dict[str, Any] | None = None,
          imports: list[str] | None = None) -> tuple[nn.Module, str]:
    """The model to export, in eval mode, with the checkpoint's weights loaded strictly; and its name. The
    plugins the checkpoint's run imported (custom mixers) are imported first, or `imports` instead."""
    args = checkpoint.read_args(pretrained) if pretrained else {}
    checkpoint.import_recorded_plugins(args, imports, pretrained)
    if model and args.get("model") and model != args["model"]:
        raise CheckpointError(f"checkpoint {pretrained} is of model {args['model']!r}, not {model!r}; "
                              "drop the model name or pass the right one")
    name = model or args.get("model")
    if not name:
        raise SpachError(f"{pretrained} does not name its model; pass it: spach export MODEL --pretrained {pretrained}")
    kwargs = dict(model_kwargs if model_kwargs is not None else args.get("model_kwargs", {}))
    num_classes, in_chans = kwargs.pop("num_classes", 1000), kwargs.pop("in_chans", 3)
    size = kwargs.pop("img_size", 0) or args.get("img_size") or _run_img_size(pretrained)
    cfg = TrainConfig(model=name, model_kwargs=kwargs, pretrained="", drop_path=0.0)
    if pretrained:
        with torch.device("meta"):  # a free probe, for where the model keeps its classifier and first conv, built
            probe = build_model(cfg, 1000, 3, size)  # at the export's size (a window may tile no other size's grids)
        head, chans = head_and_channels(read_checkpoint(pretrained), getattr(probe, "pretrained_cfg", {}))
        num_classes, in_chans = head or 0, chans or 3  # no head: a headless checkpoint
    try:
        net = build_model(cfg, num_classes, in_chans, size)
    except (TypeError, ValueError) as e:  # a value of the wrong type in stored or given settings
        raise SpachError(f"cannot build {name} with {kwargs} ({first_line(e)}); fix the model kwargs") from None
    if pretrained:
        load_strict(net, pretrained)
    return net.eval(), name


def resolution(net: nn.Module, name: str, img_size: int = 0) -> tuple[int, int]:
    """(H, W) to export at: `img_size` square, or the model's own; a model tied to its own refuses others."""
    h, w = getattr(net, "img_size", None) or getattr(net, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:]
    own = (int(h), int(w))
    if not img_size or (img_size, img_size) == own:
        return own
    if fixed_resolution(net):
        raise SpachError(f"{name} is tied to {own[0]}x{own[1]} by its weights (token-mixing MLP or position embedding); "
                         f"export it at --img-size {own[0]}, or train one at {img_size} (--model-kwargs "
                         f"'{{\"img_size\": {img_size}}}') and export that")
    return img_size, img_size


def fixed_resolution(net: nn.Module) -> bool:
    """Whether the weights tie the model to one input size (timm's `fixed_input_size`, a token-mixing
    MLP or a learned position embedding)."""
    return bool(getattr(net, "pretrained_cfg", {}).get("fixed_input_size")) \
        or any(isinstance(m, TokenMLP) for m in net.modules()) \
        or isinstance(getattr(net, "pos_embed", None), nn.Parameter)


def _run_img_size(pretrained: str | None) -> int:
    """The resolution a spach run trained at, from the config.json beside its checkpoint (0: unknown)."""
    if not pretrained:
        return 0
    config = read_json(Path(pretrained).parent / "config.json")
    resolved = config.get("resolved") if isinstance(config, dict) else None
    size = resolved.get("img_size") if isinstance(resolved, dict) else 0
    return size if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_IMG_SIZE else 0


def _in_chans(net: nn.Module) -> int:
    return getattr(net, "in_chans", None) or getattr(net, "pretrained_cfg", {}).get("input_size", (3,))[0]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress lines and warnings (e.g. the tracer's note on the MLP's token-count
    check, which is constant at a fixed resolution) are not the user's business; failures are raised."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet():
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
        program.save(str(path))


def _export_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet():  # traced, not scripted: any module traces, and the shapes it reads stay symbolic
        torch.jit.save(torch.jit.trace(net, example, check_trace=False), str(path))


def _onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    # optional dependency (spach[onnx]): imported only to check an ONNX export
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _torchscript_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


_EXPORTERS = {"onnx": _export_onnx, "torchscript": _export_torchscript}
_RUNNERS = {"onnx": _onnx_runner, "torchscript": _torchscript_runner}
