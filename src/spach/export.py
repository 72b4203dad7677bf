"""`spach export`: a model as ONNX or TorchScript for deployment, checked by running the exported file.

The model is built the way `spach eval` builds it: a zoo name, `spach` with architecture overrides,
or any timm model; a spach training checkpoint (torch or safetensors) brings its own model name,
architecture and resolution, and any checkpoint its class count and input channels (read off the
weights, so the head is never a fresh one). The export has one input `images` `(batch, C, H, W)` with
a dynamic batch axis and a fixed resolution: `--img-size` for conv and attention models (default:
the model's own), and always the model's own for models whose weights are tied to it (token-mixing
MLPs, learned position embeddings). Before the file is written, it is run (onnxruntime for ONNX,
`torch.jit.load` for TorchScript) at two batch sizes other than the one traced, and its outputs must
match the PyTorch model's within `TOLERANCE` (fp32, max abs error).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from spach.errors import CheckpointError, SpachError, first_line
from spach.files import atomic_write_bytes, read_json
from spach.models.convert import read_checkpoint
from spach.models.mixers import TokenMLP
from spach.train import checkpoint
from spach.train.config import TrainConfig
from spach.train.evaluate import load_strict
from spach.train.factory import build_model

FORMATS = ("onnx", "torchscript")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # exporter, its op library, the runtime that checks the file
TOLERANCE = 1e-4
TRACE_BATCH, CHECK_BATCHES = 2, (1, 3)  # checked at batch sizes other than the traced one: the batch axis is dynamic


def export(model: str | None, output: str | Path, fmt: str, pretrained: str | None = None,
           model_kwargs: dict[str, Any] | None = None, img_size: int = 0) -> dict[str, Any]:
    """Export `model` (see the module docstring) to `output` as `fmt` ('onnx' or 'torchscript'), check
    the file against the PyTorch model and return what was done (`max_abs_error` included). The file
    is written only once it passed the check."""
    if fmt not in FORMATS:
        raise SpachError(f"unknown export format {fmt!r}; choose onnx or torchscript")
    if fmt == "onnx":
        missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            raise SpachError(f"ONNX export needs {', '.join(missing)}: pip install 'spach[onnx]'")
    if img_size < 0:
        raise SpachError(f"--img-size must be > 0, got {img_size}")
    net, name = build(model, pretrained, model_kwargs)
    size = resolution(net, name, img_size)
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, _in_chans(net), *size, generator=g) for b in (TRACE_BATCH, *CHECK_BATCHES)}
    try:
        with torch.no_grad():
            expected = {b: net(x) for b, x in inputs.items()}
    except Exception as e:  # a size the strides do not divide, ...
        raise SpachError(f"{name} does not run at {size[0]}x{size[1]} ({first_line(e)}); choose another --img-size") from None
    with tempfile.TemporaryDirectory(prefix="spach-export-") as tmp:
        path = Path(tmp) / f"model.{fmt}"
        try:
            _EXPORTERS[fmt](net, inputs[TRACE_BATCH], path)
        except Exception as e:  # the exporters raise many types
            raise SpachError(f"{fmt} export of {name} failed: {first_line(e)}") from None
        run = _RUNNERS[fmt](path)
        error = max((run(inputs[b]) - expected[b]).abs().max().item() for b in CHECK_BATCHES)
        if not error <= TOLERANCE:
            raise SpachError(f"the exported {name} differs from PyTorch by {error:.2e} (max abs, more than {TOLERANCE:g}); "
                             f"{output} was not written")
        data = path.read_bytes()
    atomic_write_bytes(output, data)
    return {"model": name, "format": fmt, "output": str(output), "bytes": len(data),
            "input_shape": ["batch", _in_chans(net), *size], "checked_batches": list(CHECK_BATCHES),
            "runtime": "onnxruntime" if fmt == "onnx" else "torch.jit.load", "max_abs_error": error}


def build(model: str | None, pretrained: str | None = None, model_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, str]:
    """The model to export, in eval mode, with the checkpoint's weights loaded strictly; and its name."""
    args = checkpoint.read_args(pretrained) if pretrained else {}
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
        with torch.device("meta"):  # a free probe, for where the model keeps its classifier and first conv
            probe = build_model(cfg, 1000, 3)
        num_classes, in_chans = _classes_and_channels(read_checkpoint(pretrained), getattr(probe, "pretrained_cfg", {}))
    net = build_model(cfg, num_classes, in_chans, size)
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


def _classes_and_channels(state: dict[str, torch.Tensor], pretrained_cfg: dict[str, Any]) -> tuple[int, int]:
    """(classes, input channels) read off the weights: the classifier's rows (0: a headless checkpoint)
    and the first conv's input channels (3 when it cannot be found)."""
    head = state.get(f"{pretrained_cfg.get('classifier', 'head')}.weight")
    conv = state.get(f"{pretrained_cfg.get('first_conv', 'stem.proj')}.weight")
    return (head.shape[0] if head is not None else 0), (conv.shape[1] if conv is not None and conv.ndim == 4 else 3)


def _run_img_size(pretrained: str | None) -> int:
    """The resolution a spach run trained at, from the config.json beside its checkpoint (0: unknown)."""
    if not pretrained:
        return 0
    config = read_json(Path(pretrained).parent / "config.json")
    resolved = config.get("resolved") if isinstance(config, dict) else None
    return int(resolved.get("img_size") or 0) if isinstance(resolved, dict) else 0


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
