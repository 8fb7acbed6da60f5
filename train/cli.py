"""``pnnh-train``: train a network, sweep depths, or analyse dissipating inputs.

pnnh-train train --model pnnh_resnet56 --analyze       # the README's main job (digits, CPU, minutes)
pnnh-train sweep --families plain resnet pnnh tat --depths 20 56 110
pnnh-train analyze --models plain_resnet56 resnet56 pnnh_resnet56 tat_vanilla56
torchrun --nproc_per_node 2 -m pnnh_kernels.train.cli train ...   # DDP
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import json
import os
import sys
from dataclasses import fields
from typing import Optional

import torch
from torch import nn

from pnnh_kernels import BackendUnavailableError
from pnnh_kernels.models import list_models

from .analysis import analyse, write_table
from .checkpoint import load_checkpoint
from .data import DATASETS, DataBundle, DatasetError, load_dataset
from .export import FORMATS, export_run
from .interrupt import RunInterrupted
from .plots import plot_analysis, plot_history
from .sweep import FAMILIES, parse_lr_scales, run_sweep
from .trainer import RESUME_OVERRIDES, RUN_DEFINING, TrainConfig, build_model, seed_everything, train


def _add_train_options(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--data-root", default=None, help="local path of CIFAR archives or an ImageFolder tree")
    p.add_argument("--image-size", type=int, default=None, help="ImageFolder: resize to this size")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--drop-path-rate", type=float, default=d.drop_path_rate)
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradients' global norm to this value")
    p.add_argument(
        "--no-augment", dest="augment", action="store_false", help="train without the data set's augmentation"
    )
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=d.amp)
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="model and batches in channels_last memory format (faster on oneDNN / cuDNN)",
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--compile-mode", default=d.compile_mode, help="torch.compile mode: default, reduce-overhead, max-autotune"
    )
    p.add_argument("--cuda-graphs", action="store_true", help="capture the whole training step in one CUDA graph (GPU)")
    p.add_argument("--backend", default=d.backend, help="PNNH block backend: auto, eager, reference, ...")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-size", type=int, default=None, help="train on this many images, stratified (harder)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    p.add_argument("--device", default=d.device)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar within an epoch")
    p.add_argument(
        "--tensorboard", action="store_true", help="also log to <out-dir>/tensorboard (pip install tensorboard)"
    )
    p.add_argument("--stop-after", type=int, default=None, help="stop after N epochs of this run (resume later)")
    p.add_argument("--feature-reuse", action="store_true", help="droppath + freeze iterations (residual models)")
    p.add_argument("--reuse-drop-rate", type=float, default=d.reuse_drop_rate)
    p.add_argument("--reuse-every", type=int, default=d.reuse_every)
    p.add_argument("--model-options", type=json.loads, default={}, help="JSON, e.g. '{\"share_coder\": true}'")


def _config(args: argparse.Namespace, **overrides) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return TrainConfig(**values)


def _analysis_batch(bundle: DataBundle, n: int = 512) -> torch.Tensor:
    return torch.stack([bundle.test[i][0] for i in range(min(n, len(bundle.test)))])


def _default_out_dir(args: argparse.Namespace, name: str) -> str:
    """``runs/<name>``, or the first ``runs/<name>-N`` free of earlier output when that one holds some
    (an explicit --out-dir is never renamed: a run there is refused, resumed or overwritten, as asked)."""
    base = os.path.join("runs", name)
    if getattr(args, "resume", None) or args.overwrite:
        return base
    candidate, n = base, 1
    while os.path.isdir(candidate) and os.listdir(candidate):
        n += 1
        candidate = f"{base}-{n}"
    if candidate != base:
        print(
            f"{base} holds an earlier run; this one goes to {candidate} (--overwrite replaces it instead)", flush=True
        )
    return candidate


def _counterparts(model: str) -> list[str]:
    """The plain net and the ResNet of a PNNH (or plain) ResNet's depth: what the paper compares it with."""
    base = model
    for prefix in ("pnnh_slim_", "pnnh_", "plain_"):
        base = base.removeprefix(prefix)
    if base == model or base not in list_models("resnet"):
        return []
    return [name for name in (f"plain_{base}", base) if name != model]


def _analyze_run(args: argparse.Namespace, config: TrainConfig, checkpoint: str, out_dir: str) -> str:
    """Dissipating inputs of the trained net, of the same net at initialisation, and of its plain and
    residual counterparts at initialisation (the paper's comparison); one CSV each and one plot."""
    bundle = load_dataset(args.dataset, args.data_root, args.image_size)
    x = _analysis_batch(bundle)
    trained = build_model(config, bundle)
    trained.load_state_dict(load_checkpoint(checkpoint)["model"])
    results = {}
    for name in [args.model, *_counterparts(args.model)]:
        seed_everything(config.seed)
        results[f"{name} at init"] = analyse(build_model(dataclasses.replace(config, model=name), bundle), x)
    results[f"{args.model} trained"] = analyse(trained, x)
    for label, rows in results.items():
        name, state = label.split()[0], label.split()[-1]
        suffix = state if name == args.model else f"{name}_{state}"
        write_table(rows, os.path.join(out_dir, f"dissipation_{suffix}.csv"))
    path = os.path.join(out_dir, "dissipation.png")
    plot_analysis(results, path, "how much of the input survives each layer")
    return os.path.abspath(path)


def _recorded_options(args: argparse.Namespace, out_dir: str) -> dict:
    """On resume, the run-defining options the command line leaves out, at the checkpoint's recorded values:
    a resume continues what was recorded (the ones given are compared with it by the trainer)."""
    path = os.path.join(out_dir, "last.pt") if args.resume == "auto" else args.resume
    if not path or not os.path.isfile(path):
        return {}  # 'auto' with no run yet starts one; a missing explicit path is reported by the trainer
    recorded = load_checkpoint(path, kind="resume")["config"]
    given = getattr(args, "given", set())
    return {name: recorded[name] for name in RUN_DEFINING if name in recorded and name not in given}


def cmd_train(args: argparse.Namespace) -> int:
    out_dir = args.out_dir or _default_out_dir(args, f"{args.model}-{args.dataset}")
    recorded = _recorded_options(args, out_dir) if args.resume else {}
    config = _config(
        args, **{"model": args.model, **recorded, "out_dir": out_dir, "resume": args.resume},
        resume_overrides=tuple(name.replace("-", "_") for name in args.resume_override),
    )  # fmt: skip
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    plot_history(result["history"], os.path.join(out_dir, "curves.png"), f"{args.model} on {args.dataset}")
    outputs = {
        "metrics": result["metrics"],
        "checkpoint": result["checkpoint"],
        "curves": os.path.abspath(os.path.join(out_dir, "curves.png")),
    }
    if args.analyze:
        outputs["dissipation"] = _analyze_run(args, config, result["checkpoint"], out_dir)
    final = result["final"]
    print(
        f"\n{args.model}: final test accuracy {final['test_acc']:.4f} (best {result['best_test_acc']:.4f}), "
        f"{result['parameters']:,} parameters, {final['images_per_s']:.0f} training images/s"
    )
    print("results:")
    for name, path in outputs.items():
        print(f"  {name:12s} {path}")
    print(f"export:   pnnh-train export --run {out_dir} --format onnx  (reparameterized, verified; docs/DEPLOY.md)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    out_dir = args.out_dir or _default_out_dir(args, f"sweep-{args.dataset}")
    base = _config(args, out_dir=out_dir)
    lr_scales = parse_lr_scales(args.lr_scales)
    rows = run_sweep(base, args.families, args.depths, out_dir, args.seeds or [args.seed], lr_scales)
    print(f"\n{'family':20s} {'depth':>5s} {'params':>10s} {'test acc (mean +- sd)':>22s} {'img/s':>8s}")
    for r in rows:
        acc = f"{r['test_acc']:.4f} +- {r['test_acc_std']:.4f}"
        print(f"{r['family']:20s} {r['depth']:5d} {r['parameters']:10,d} {acc:>22s} {r['images_per_s']:8.0f}")
    print(
        f"results: {os.path.abspath(os.path.join(out_dir, 'sweep.csv'))}\nplot:    {os.path.abspath(os.path.join(out_dir, 'sweep.png'))}"
    )
    return 0


def _analysis_model(
    name: str, args: argparse.Namespace, bundle: DataBundle, checkpoint: Optional[str]
) -> tuple[nn.Module, str]:
    """The model ``analyze`` measures: at initialisation with --model-options, or as a checkpoint trained it
    (rebuilt with the arguments it was trained with: a ViT's width, depth and patches)."""
    if checkpoint is None:
        config = TrainConfig(model=name, dataset=args.dataset, model_options=args.model_options)
        return build_model(config, bundle), f"{name} (init)"
    state = load_checkpoint(checkpoint)
    trained = state["config"].get("model")
    if trained != name:  # a same-shaped net (resnet / plain_resnet) would load it without a word
        raise ValueError(f"{checkpoint} holds a trained {trained}, not {name}: pass checkpoints in --models order")
    config = TrainConfig(model=name, dataset=args.dataset, model_options=state["config"].get("model_options", {}))
    model = build_model(config, bundle)
    model.load_state_dict(state["model"])
    return model, f"{name} (trained)"


def cmd_analyze(args: argparse.Namespace) -> int:
    out_dir = args.out_dir or _default_out_dir(args, f"analysis-{args.dataset}")
    outputs = [f"{name}.csv" for name in args.models] + ["dissipation.png"]
    existing = [name for name in outputs if os.path.exists(os.path.join(out_dir, name))]
    if existing and not args.overwrite:
        raise ValueError(f"{out_dir} already holds {', '.join(existing)}; pass --overwrite to replace them")
    os.makedirs(out_dir, exist_ok=True)
    bundle = load_dataset(args.dataset, args.data_root, args.image_size)
    x = _analysis_batch(bundle)
    checkpoints = dict(zip(args.models, args.checkpoints or []))
    results = {}
    for name in args.models:
        seed_everything(args.seed)
        model, label = _analysis_model(name, args, bundle, checkpoints.get(name))
        results[label] = analyse(model, x)
        write_table(results[label], os.path.join(out_dir, f"{name}.csv"))
    plot_analysis(results, os.path.join(out_dir, "dissipation.png"), "how much of the input survives each layer")
    print(f"{'model':32s} {'surviving':>10s} {'CKA':>7s} {'R^2':>7s}   (last layer)")
    for label, rows in results.items():
        last = rows[-1]
        print(f"{label:32s} {last['surviving']:10.3f} {last['cka']:7.3f} {last['reconstruction_r2']:7.3f}")
    print(f"tables and plot: {os.path.abspath(out_dir)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    result = export_run(args.run, args.format, args.form, args.quantize, args.overwrite)
    rows = [("exported", result)] + ([("int8", result["int8"])] if "int8" in result else [])
    for label, r in rows:
        print(
            f"{label:8s} {r['path']}\n         largest difference from the PyTorch model {r['largest_difference']:.3g}, "
            f"test accuracy {r['accuracy']:.4f} (PyTorch {r['pytorch_accuracy']:.4f})"
        )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pnnh-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one model")
    p.add_argument("--model", default=TrainConfig().model)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--resume", default=None, help="a checkpoint path, or 'auto' for OUT_DIR/last.pt if present")
    p.add_argument("--analyze", action="store_true", help="also measure dissipating inputs, at init and trained")
    p.add_argument(
        "--resume-override",
        nargs="+",
        default=[],
        metavar="OPTION",
        help=f"on resume, take these options' new values ({', '.join(n.replace('_', '-') for n in RESUME_OVERRIDES)})",
    )
    _add_train_options(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("sweep", help="train several families at several depths")
    p.add_argument("--families", nargs="+", default=["plain", "resnet", "pnnh", "tat"], choices=sorted(FAMILIES))
    p.add_argument("--depths", nargs="+", type=int, default=[20, 56, 110])
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="one run per seed (default: --seed); mean and spread"
    )
    p.add_argument(
        "--lr-scales", nargs="*", default=[], help="FAMILY=SCALE: replace a family's learning-rate scale on --lr"
    )
    p.add_argument("--out-dir", default=None)
    _add_train_options(p)
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("export", help="a run's best checkpoint as an ONNX or torch.export file, verified")
    p.add_argument("--run", required=True, help="the run's output folder (its best.pt is exported)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument(
        "--form", choices=("fast", "plain"), default="fast", help="the reparameterized form (docs/DEPLOY.md)"
    )
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="also an int8 ONNX file (onnxruntime)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in the run's folder")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("analyze", help="measure dissipating inputs layer by layer")
    p.add_argument("--models", nargs="+", default=["plain_resnet56", "resnet56", "pnnh_resnet56", "tat_vanilla56"])
    p.add_argument("--checkpoints", nargs="*", default=None, help="checkpoints for the first models, in order")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace earlier tables and plot in the output folder")
    p.add_argument(
        "--model-options", type=json.loads, default={}, help="JSON for the models at init, e.g. '{\"depth\": 24}'"
    )
    p.set_defaults(handler=cmd_analyze)
    return parser


def _user_error(exc: BaseException) -> str:
    """One line for an error a user can act on (bad option, data, checkpoint, disk); no traceback."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on device{f' writing {exc.filename}' if exc.filename else ''}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc)


def _given_options(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> set[str]:
    """The destinations the command line sets explicitly (a parse in which no option has a default)."""
    bare = copy.deepcopy(parser)
    for p in [bare, *bare._subparsers._group_actions[0].choices.values()]:  # type: ignore[union-attr]
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def _out_of_memory(exc: BaseException) -> Optional[str]:
    """One line for running out of device or host memory (torch raises it as a RuntimeError), else None."""
    text = str(exc).strip()
    oom = isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
    )
    if not oom:
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"out of memory ({first}); lower --batch-size, or use a smaller model or image size"


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.given = _given_options(parser, argv)
    try:
        return args.handler(args)
    except (DatasetError, ValueError, OSError, BackendUnavailableError, FloatingPointError) as exc:
        print(f"pnnh-train: error: {_user_error(exc)}", file=sys.stderr)
        return 2
    except RunInterrupted as stopped:
        print(f"pnnh-train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except (MemoryError, RuntimeError) as exc:
        message = _out_of_memory(exc)
        if message is None:
            raise
        print(f"pnnh-train: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
