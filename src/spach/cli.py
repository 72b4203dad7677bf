"""The `spach` command line: argument parsing only; every subcommand calls into the modules.

Each subcommand is one `_add_<name>(p)` function that declares its arguments and sets `func` to the
function that runs it, and one entry of COMMANDS (its name, help line and that function). Both
import what they use, and only the named command's arguments are declared, so a command pays for
its own modules alone (`spach --help` and `spach models` load no training, battle or benchmark code).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable

from spach.errors import SpachError
from spach.signals import interrupting
from spach.text import one_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's messages quote what was typed: one safe line too
        super().error(one_line(message))


IMPORTS_HELP = ("plugins (modules or .py files registering custom mixers) to import first, instead of those the "
                "checkpoint's run recorded (default: those; with nothing after it: none)")


def _add_models(p: argparse.ArgumentParser) -> None:
    p.description = ("List the model zoo, or with 'match' ('spach models match --macs 5M --arch SPEC --img-size 32 "
                     "--in-chans 1 --num-classes 10'), print the hidden_dim at which each SPEC (a JSON object of SPACH "
                     "arguments without hidden_dim, or a SPACH zoo name) costs the target.")
    p.add_argument("pattern", nargs="?", default="*", help="glob over model names (default: all), or 'match'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    match = p.add_argument_group("spach models match")
    match.add_argument("--arch", action="append", default=[], metavar="SPEC", help="a layout to match (repeatable)")
    match.add_argument("--macs", metavar="N", help="target MACs per image (5e6, 5.2M, 800k)")
    match.add_argument("--params", metavar="N", help="target parameters")
    match.add_argument("--like", metavar="SPEC", help="target: the cost of this model (a zoo name or a JSON spec)")
    match.add_argument("--by", choices=["macs", "params"], default="macs", help="the cost --like matches (default: macs)")
    match.add_argument("--img-size", type=int, default=224, help="input resolution (default: 224)")
    match.add_argument("--in-chans", type=int, default=3, help="input channels (default: 3)")
    match.add_argument("--num-classes", type=int, default=1000, help="classes (default: 1000)")
    match.add_argument("--tolerance", type=float, default=0.1, help="largest relative error accepted (default: 0.1)")

    def run(args: argparse.Namespace) -> None:
        if args.pattern == "match":
            from spach.models.match import match_command
            match_command(args.arch, args.macs, args.params, args.like, args.by, args.img_size, args.in_chans,
                          args.num_classes, args.tolerance, as_json=args.json)
        elif args.arch or args.macs or args.params or args.like:
            raise SpachError("--arch, --macs, --params and --like belong to 'spach models match'; add 'match'")
        else:
            from spach.models.table import print_models
            print_models(args.pattern, as_json=args.json)

    p.set_defaults(func=run)


def _add_bench(p: argparse.ArgumentParser) -> None:
    def int_list(text: str) -> list[int]:
        try:
            return [int(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None

    p.add_argument("models", nargs="+", help="zoo model names (see `spach models`)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="bf16/fp16 run under autocast")
    p.add_argument("--precision", default="autocast", choices=["autocast", "weights", "auto"],
                   help="bf16/fp16 inference: autocast (default), weights converted once, or auto: the faster of the "
                        "two, measured on the first batch (spach.optimize's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) (first pass takes minutes)")
    p.add_argument("--channels-last", action="store_true", help="channels-last input and conv weights")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's, 224)")
    p.add_argument("--mode", default="infer", choices=["infer", "train", "both"], help="train = fwd + bwd + AdamW step")
    p.add_argument("--protocol", default="default", choices=["default", "swin"],
                   help="default: 3 warm-up + 5 timed passes, median; swin: 50 + 30, the paper's protocol")
    p.add_argument("--quick", action="store_true", help="fewer passes and a short sweep")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep batch size, image size (growth plots) and the spatial mixer (each mixer's price in a "
                        "SPACH model's layout and width)")
    p.add_argument("--sweep-batch-sizes", type=int_list, default=None, metavar="N,N,..", help="default 1,8,32")
    p.add_argument("--sweep-img-sizes", type=int_list, default=None, metavar="S,S,..", help="default 128,224,320")
    p.add_argument("--sweep-mixers", type=lambda t: [m for m in t.split(",") if m], default=None, metavar="M,M,..",
                   help="the mixers the sweep prices (default: every registered one, spach.list_mixers())")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="write the records as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the records as CSV")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")

    def run(args: argparse.Namespace) -> None:
        from spach.bench.command import command as bench_command
        from spach.bench.measure import BenchSettings
        settings = BenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSettings)
                                    if f.name != "latency"})
        bench_command(args.models, settings, json_path=args.json, csv_path=args.csv, plot_dir=args.plots,
                with_sweep=args.sweep, sweep_batch_sizes=args.sweep_batch_sizes, sweep_img_sizes=args.sweep_img_sizes,
                threads=args.threads, sweep_mixers=args.sweep_mixers)

    p.set_defaults(func=run)


def _add_train(p: argparse.ArgumentParser) -> None:
    from spach.train.config import ConfigError, TrainConfig
    from spach.train.presets import PRESETS, resolve

    p.description = ("Train with the paper's DeiT recipe (the defaults). Precedence: defaults < --preset < --config < "
                     "flags. The resolved config is saved as config.json in the run folder.")
    p.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON file of settings (names as the flags, - or _)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group = groups.setdefault(f.metadata["group"], p.add_argument_group(f.metadata["group"]))
        flag, default = "--" + f.name.replace("_", "-"), f.default_factory() if callable(f.default_factory) else f.default
        kw: dict = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {default!r})")
        if f.name == "preset":
            kw.update(choices=sorted(PRESETS), help=f"named small-data preset: {', '.join(sorted(PRESETS))}")
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw.update(nargs="*", type=f.metadata.get("item", float))
        elif not isinstance(default, dict):
            kw["type"] = {"int": int, "float": float, "str": str}[str(f.type)]  # the annotation: 20 may mean 20.0
        group.add_argument(flag, **kw)

    def run(args: argparse.Namespace) -> None:
        from spach.train.engine import train
        overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
        if isinstance(overrides.get("model_kwargs"), str):
            overrides["model_kwargs"] = _json_arg(overrides["model_kwargs"]) or {}
        try:
            cfg = resolve(overrides.pop("preset", None), args.config, **overrides)
        except ConfigError as e:
            raise SpachError(f"--{e.field.replace('_', '-')} {e.problem}") from None
        train(cfg)

    p.set_defaults(func=run)


def _add_eval(p: argparse.ArgumentParser) -> None:
    from spach.models.weights import MIRROR_ENV
    from spach.train.runtime import default_workers

    p.description = ("Evaluate a checkpoint with the model's pretrained config (resize, crop, mean/std); a spach "
                     "training checkpoint brings its own model, architecture and normalisation.")
    p.add_argument("--model", help="model name (default: the one a spach training checkpoint names)")
    p.add_argument("--pretrained", required=True, nargs="?", const=True, metavar="PATH",
                   help="checkpoint to evaluate (official or spach); without PATH: the official weights of --model "
                        f"(downloaded once into the cache; {MIRROR_ENV} points at a mirror URL or folder)")
    p.add_argument("--data-path", help="data folder (image folders: holding val/; fashion-mnist has a default)")
    p.add_argument("--dataset", default="imagefolder", help="imagefolder, fashion-mnist (fmnist), cifar10, cifar100 or tiny (default: imagefolder)")
    p.add_argument("--model-kwargs", help="architecture overrides as JSON (default: the checkpoint's own)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"data loader processes for image folders (default: {default_workers()}: at most 4, no more than the CPUs)")
    p.add_argument("--img-size", type=int, default=0, help="resolution (default: the checkpoint's or the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision (default: auto, GPU only)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights the checkpoint holds")
    p.add_argument("--skip-bad-images", action="store_true", help="count and skip unreadable images instead of failing")
    p.add_argument("--throughput", action="store_true", help="also measure images/s the paper's way (one batch, 50 warm-up, 30 timed)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first (pays off on long evaluations)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-': stdout only as JSON)")
    p.add_argument("--imports", nargs="*", metavar="MODULE_OR_FILE", help=IMPORTS_HELP)

    def run(args: argparse.Namespace) -> None:
        from spach.files import atomic_write_text, check_writable
        from spach.models.weights import official_weights
        from spach.train.evaluate import evaluate_checkpoint
        if args.json and args.json != "-":
            check_writable(args.json, "--json")  # before the evaluation, which may take minutes
        if args.pretrained is True:
            if not args.model:
                raise SpachError("--pretrained without a path evaluates the official weights of --model NAME; name the "
                                 "model, or pass the path of a checkpoint")
            args.pretrained = str(official_weights(args.model))
        r = evaluate_checkpoint(args.model, args.pretrained, args.data_path, args.dataset, args.batch_size, args.workers,
                                args.device, args.img_size, args.amp, _json_arg(args.model_kwargs), args.use_ema, args.skip_bad_images, args.throughput, args.compile,
                                args.imports)
        if args.json == "-":
            print(json.dumps(r, indent=2))
            return
        speed = f"  {r['throughput']:.0f} img/s" if "throughput" in r else ""
        print(f"{r['model']} on {r['dataset']} ({r['n']} images): top1 {r['top1']:.2f}  top5 {r['top5']:.2f}  loss {r['loss']:.4f}{speed}")
        if args.json:
            atomic_write_text(args.json, json.dumps(r, indent=2) + "\n")

    p.set_defaults(func=run)


def _add_export(p: argparse.ArgumentParser) -> None:
    from spach.export import FORMATS, export

    p.description = ("Export a model for deployment: one input (batch, C, H, W) with a dynamic batch axis at a fixed "
                     "resolution. The exported file is run (onnxruntime / torch.jit.load) against the PyTorch model and "
                     "written only when they agree (max abs error <= 1e-4). --format timm writes a folder timm loads "
                     "(timm.create_model('local-dir:FOLDER', pretrained=True) after import spach; upload it to the "
                     "Hugging Face Hub for 'hf-hub:USER/REPO'), checked the same way.")
    p.add_argument("model", nargs="?", help="model name, or a run folder (spach train's --output, a battle's "
                   "runs/<contestant>/seed<k>) whose best weights to export (default: the model a checkpoint names)")
    p.add_argument("--pretrained", metavar="CKPT",
                   help="weights to export (.pth or .safetensors; official or spach; or a run folder)")
    p.add_argument("--model-kwargs", help="architecture overrides as JSON (default: the checkpoint's own)")
    p.add_argument("--img-size", type=int, default=0, help="input resolution (default: the model's; MLP models: only their own)")
    p.add_argument("--format", required=True, help=f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]} (a folder in timm's Hub layout)")
    p.add_argument("--output", required=True, metavar="PATH", help="the file to write (the timm format: a new or empty folder)")
    p.add_argument("--imports", nargs="*", metavar="MODULE_OR_FILE", help=IMPORTS_HELP)

    def run(args: argparse.Namespace) -> None:
        if not args.model and not args.pretrained:
            raise SpachError("name the model to export (spach export MODEL; see 'spach models'), or pass a run folder "
                             "or --pretrained CKPT")
        r = export(args.model, args.output, args.format, args.pretrained, _json_arg(args.model_kwargs), args.img_size,
                   args.imports)
        source = f" ({r['source']})" if r["source"] else ""
        if r["format"] == "timm":
            print(f"exported {r['model']}{source} to {r['output']}/ (timm: config.json, model.safetensors, README.md; "
                  f"{r['bytes'] / 1e6:.1f} MB, input {'x'.join(map(str, r['input_shape'][1:]))}); loaded back with "
                  f"timm.create_model('local-dir:{r['output']}', pretrained=True): "
                  f"max abs error {r['max_abs_error']:.1e} vs PyTorch")
            return
        print(f"exported {r['model']}{source} to {r['output']} ({r['format']}, {r['bytes'] / 1e6:.1f} MB, input batch x "
              f"{'x'.join(map(str, r['input_shape'][1:]))}, dynamic batch); {r['runtime']} at batch sizes "
              f"{' and '.join(map(str, r['checked_batches']))}: max abs error {r['max_abs_error']:.1e} vs PyTorch")

    p.set_defaults(func=run)


def _json_arg(text: str | None) -> dict | None:
    """--model-kwargs: a JSON object, or None when not given."""
    try:
        value = json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise SpachError(f"--model-kwargs is not valid JSON ({e})") from None
    if value is not None and not isinstance(value, dict):
        raise SpachError(f"--model-kwargs must be a JSON object of model arguments, not {text!r}; "
                         "e.g. --model-kwargs '{\"hidden_dim\": 96}'")
    return value


def _add_battle(p: argparse.ArgumentParser) -> None:
    from spach.battle.resources import FLAGS as RESOURCE_FLAGS
    from spach.battle.resources import flag_name
    from spach.battle.schema import SLURM_KEYS
    from spach.battle.study import list_presets

    p.add_argument("study", nargs="?", help="study TOML file (default: the embedded default preset, or the study "
                   "already in --output)")
    p.add_argument("--preset", help=f"a shipped study instead of a file: {', '.join(list_presets())}")
    p.add_argument("--output", help="study folder (default: battles/<study name>); rerun to resume")
    p.add_argument("--jobs", type=int, help="runs trained at a time (default: the study's, 1); with a batch "
                   "launcher: jobs in the queue at a time (default: all)")
    p.add_argument("--data", help="dataset folder (sets data.data_path; the paper preset needs ImageNet here)")
    p.add_argument("--budget", help="run it sequentially within this budget, overriding the study's: \"15m\", \"2h\" "
                   "(wall time of the whole battle), \"300 gpu-h\" or \"120 runs\"; seeds go where verdicts are still open")
    p.add_argument("--dry-run", action="store_true", help="print the runs, their time on this machine and, for a "
                   "sequential study, its plan and predicted decisions; train nothing")
    p.add_argument("--pilot", metavar="DIR", help="with --dry-run: predict from this pilot battle's study folder (its "
                   "contestants' means and noise, printed as a [prior] table to fix in the study file)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--list-presets", action="store_true", help="list the shipped studies and exit")
    batch = p.add_argument_group("batch jobs", "--launcher slurm: every run one Slurm job (submitit); this command "
                                 "submits them and watches the queue (stop it and re-run it at any time). Resources "
                                 "default to the study's [slurm] table; these flags win")
    batch.add_argument("--launcher", help="local (the default: a process pool here), slurm, or submitit-local (the "
                       "jobs as processes here); a study folder keeps the launcher it was started with")
    helps = {"nodes": "nodes per run (default 1)", "gpus_per_node": "GPUs per node, one task (process) each (default 0)",
             "cpus_per_task": "CPUs per task (also the run's torch threads)", "partition": "Slurm partition",
             "timeout_min": "time limit of a job in minutes; at the limit it is requeued and resumes (default 1440)",
             "account": "Slurm account", "constraint": "Slurm node constraint (e.g. volta32gb)"}
    for key in RESOURCE_FLAGS:
        batch.add_argument(flag_name(key), dest=key, type=SLURM_KEYS[key][0], help=helps[key])
    batch.add_argument("--slurm", action="append", metavar="KEY=VALUE",
                       help="another submitit slurm_KEY parameter (e.g. qos=high, mem_gb=64); repeatable")

    def run(args: argparse.Namespace) -> None:
        from spach.battle.command import battle_command
        resources = {key: getattr(args, key) for key in RESOURCE_FLAGS}
        battle_command(args.study, preset=args.preset, output=args.output, jobs=args.jobs, data=args.data,
                       dry_run=args.dry_run, report=not args.no_report, list_presets=args.list_presets,
                       launcher=args.launcher, resources=resources, slurm=args.slurm, budget=args.budget, pilot=args.pilot)

    p.set_defaults(func=run)


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="the battle's study folder")

    def run(args: argparse.Namespace) -> None:
        from spach.battle.report import write_report
        path = write_report(args.folder)
        print(f"report: {path} (and {path.with_suffix('.md')})")

    p.set_defaults(func=run)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {  # name: (help, declaration)
    "models": ("list the model zoo: params, MACs, official ImageNet top-1, published weights; 'spach models match': the "
               "width that gives a layout a target cost", _add_models),
    "bench": ("measure params, MACs, throughput, latency, memory and %% of the matmul peak", _add_bench),
    "train": ("train a model with the paper's (DeiT) recipe; torchrun --nproc_per_node N -m spach train ... for DDP",
              _add_train),
    "eval": ("top-1/top-5/loss of a checkpoint on a validation set", _add_eval),
    "export": ("export a model to ONNX, TorchScript or a timm model folder, checked against PyTorch", _add_export),
    "battle": ("run (or resume) a study comparing spatial-mixing families, then write its report", _add_battle),
    "report": ("(re)build report.md and report.html of a battle folder", _add_report),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; only `command`'s arguments are declared (all of them when it is
    None), as declaring them imports the modules they come from."""
    parser = _Parser(prog="spach", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, declare) in COMMANDS.items():
        p = sub.add_parser(name, help=help)
        if command in (None, name):
            declare(p)
    return parser


def _caller(e: BaseException) -> str:
    """file:line where exception `e` was raised."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "unknown code"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    named = next((a for a in argv if not a.startswith("-")), "")  # the top-level parser has no option but -h
    args = build_parser(named).parse_args(argv)
    try:
        with interrupting():  # SIGINT and SIGTERM stop every command, also one started with SIGINT ignored
            args.func(args)
    except SpachError as e:
        print(f"spach {args.command}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"spach {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as e:  # sys.exit("text") in code a command ran (a study's plugin): its text, as one safe line
        if e.code is None or isinstance(e.code, int):
            raise
        print(f"spach {args.command}: error: {one_line(f'{e.code} (sys.exit() called by {_caller(e)})')}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # `spach models | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
