"""The training loop: one function, :func:`train`, driven by a :class:`TrainConfig`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from pnnh_kernels.models import create_model, list_models, model_family

from . import cuda_graphs
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    non_finite_entries,
    remove_stale_temporaries,
    save_checkpoint,
    write_text_atomic,
)
from .cuda_graphs import GraphedStep
from .data import DataBundle, DatasetError, load_dataset, subsample_training, without_augmentation
from .distributed import DistInfo, all_reduce_sum, init_distributed, shutdown
from .feature_reuse import NORMAL, FeatureReuse
from .interrupt import RunInterrupted, StopRequest, signal_name, stop_on_signals
from .optim import make_optimizer, make_scheduler
from .run_lock import hold_run_folder
from .tensorboard_log import MISSING as TENSORBOARD_MISSING
from .tensorboard_log import TensorBoardLog, tensorboard_installed

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
#: the options that define what a run computes: a resume continues their recorded values (the CLI fills in
#: those its command line leaves out) and refuses others, except RESUME_OVERRIDES asked for by name
RUN_DEFINING = (
    "model", "dataset", "data_root", "image_size", "train_size", "model_options", "epochs", "batch_size",
    "optimizer", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs", "label_smoothing",
    "drop_path_rate", "amp", "seed", "feature_reuse", "reuse_drop_rate", "reuse_every", "augment", "clip_grad",
)  # fmt: skip
#: what a resume may change from the next step on, each applied where the run reads it
RESUME_OVERRIDES = ("weight_decay", "momentum", "label_smoothing")


@dataclass
class TrainConfig:
    model: str = "pnnh_resnet20"
    dataset: str = "digits"
    data_root: Optional[str] = None
    image_size: Optional[int] = None
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    drop_path_rate: float = 0.0
    #: clip the gradients' global norm to this value before each step (ViTs train so); None: no clipping
    clip_grad: Optional[float] = None
    #: the data set's batch augmentation (digits: random 1-pixel shifts; CIFAR: crops and flips)
    augment: bool = True
    amp: str = "none"
    #: model and image batches in channels_last memory format (oneDNN / cuDNN run faster that way;
    #: benchmarks/RESULTS.md: 1.0-1.8x for the block on the CPU)
    channels_last: bool = False
    compile: bool = False
    #: torch.compile's mode: default, reduce-overhead (CUDA graphs on a GPU) or max-autotune
    compile_mode: str = "default"
    #: capture the whole training step in one CUDA graph (train/cuda_graphs.py)
    cuda_graphs: bool = False
    backend: str = "auto"
    seed: int = 0
    out_dir: str = "runs/default"
    resume: Optional[str] = None
    feature_reuse: bool = False
    reuse_drop_rate: float = 0.2
    reuse_every: int = 1
    device: str = "auto"
    workers: int = 0
    progress: bool = True
    #: stop this invocation after this many epochs (a planned interruption; resume later with resume="auto")
    stop_after: Optional[int] = None
    model_options: dict = field(default_factory=dict)
    #: train on this many images (the same fraction of every class; a harder setting of the same data)
    train_size: Optional[int] = None
    #: replace a run already in out_dir (without it, a folder holding one is refused unless resuming)
    overwrite: bool = False
    #: also write the metrics as TensorBoard scalars to out_dir/tensorboard (needs the tensorboard package)
    tensorboard: bool = False
    #: on resume, the RESUME_OVERRIDES options that take this config's values instead of the recorded ones
    resume_overrides: tuple = ()

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "warmup_epochs", "workers", "momentum", "label_smoothing", "drop_path_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name.replace('_', '-')} must be a non-negative number, got {value}")
        for name in ("label_smoothing", "drop_path_rate", "reuse_drop_rate"):
            if not (0 <= getattr(self, name) < 1):
                raise ValueError(f"{name.replace('_', '-')} must lie in [0, 1), got {getattr(self, name)}")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise ValueError(f"clip-grad must be a positive number, got {self.clip_grad}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop-after must be at least 1 epoch, got {self.stop_after}")
        if self.reuse_every < 1:
            raise ValueError(f"reuse-every must be at least 1, got {self.reuse_every}")
        defaults = {f.name: f.default for f in fields(self)}
        if not self.feature_reuse:
            for name in ("reuse_every", "reuse_drop_rate"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"--{name.replace('_', '-')} applies to --feature-reuse runs only")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image-size must be a positive number of pixels, got {self.image_size}")
        if self.tensorboard and not tensorboard_installed():
            raise ValueError(TENSORBOARD_MISSING)
        unknown = [name for name in self.resume_overrides if name not in RESUME_OVERRIDES]
        if unknown:
            allowed = ", ".join(_flag(n) for n in RESUME_OVERRIDES)
            raise ValueError(f"--resume-override takes {allowed}; {_flag(unknown[0])} cannot change on resume")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------- setup helpers


def _seed_for(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _device(config: TrainConfig, info: DistInfo) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise ValueError(f"--device {config.device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: this torch has no CUDA device (use --device cpu or auto)")
    return device


def build_model(config: TrainConfig, bundle: DataBundle) -> nn.Module:
    return _create(config.model, model_arguments(config, bundle))


def model_arguments(config: TrainConfig, bundle: DataBundle) -> dict:
    """The keyword arguments ``create_model(config.model, ...)`` builds the run's model with (saved in its
    checkpoints, so that :func:`load_trained_model` rebuilds it without the data set)."""
    kwargs = dict(num_classes=bundle.num_classes, in_chans=bundle.in_chans, **config.model_options)
    family = _registered_family(config.model)
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    if family in ("resnet", "plain", "pnnh"):
        kwargs.setdefault("backend", config.backend)
    if family == "vit":
        if config.backend != "auto":
            raise ValueError(f"--backend {config.backend}: the ViTs' blocks are plain PyTorch and take no backend")
        kwargs.setdefault("img_size", bundle.image_size)
        kwargs.setdefault("patch_size", max(1, bundle.image_size // 8))
    return kwargs


def _registered_family(name: str) -> Optional[str]:
    """The package family of a registered model name; None for a model from timm's or another registry."""
    return model_family(name) if name in list_models() else None


def _create(name: str, kwargs: dict) -> nn.Module:
    try:
        return create_model(name, **kwargs)
    except TypeError as exc:  # an option the model's builder does not take (--model-options)
        raise ValueError(f"model {name} cannot be built with these options: {exc}") from None


def load_trained_model(path: str, map_location: Any = "cpu") -> nn.Module:
    """The model a pnnh-train checkpoint (``best.pt`` or ``last.pt``) holds, rebuilt and loaded strictly, in
    eval mode: how to use a trained net outside the CLI."""
    state = load_checkpoint(path, map_location=map_location)
    if "model_arguments" not in state:
        raise CheckpointError(f"{path} predates saved model arguments: rebuild its model with build_model")
    name, arguments = state["config"]["model"], dict(state["model_arguments"])
    if _registered_family(name) == "vit":
        arguments.pop("backend", None)  # recorded by older runs; the ViTs' blocks take none
    model = _create(name, arguments)
    model.load_state_dict(state["model"])
    return model.eval()


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _batches(
    bundle: DataBundle,
    order: torch.Tensor,
    batch_size: int,
    workers: int,
    device: torch.device,
    channels_last: bool = False,
):
    """Yield (x, y) batches in ``order``; tensors data sets are sliced directly (no worker overhead)."""
    data = bundle.train
    fmt = _memory_format(channels_last)
    if isinstance(data, TensorDataset):
        images, labels = data.tensors
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield (
                images[idx].to(device, non_blocking=True, memory_format=fmt),
                labels[idx].to(device, non_blocking=True),
            )
        return
    loader = DataLoader(Subset(data, order.tolist()), batch_size=batch_size, num_workers=workers, shuffle=False)
    try:
        for x, y in loader:
            yield x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
    except DatasetError as exc:  # from a worker process, torch's message carries the worker's traceback
        raise DatasetError(_worker_message(exc)) from None


def _worker_message(exc: DatasetError) -> str:
    """The original message of an error a DataLoader worker raised (its last traceback line, unprefixed)."""
    last = str(exc).strip().splitlines()[-1]
    return (
        last.split(": ", 1)[1]
        if last.startswith(("DatasetError: ", "pnnh_kernels.train.data.DatasetError: "))
        else last
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, device: torch.device, batch_size: int = 256, autocast=None, channels_last: bool = False
) -> tuple[float, float]:
    """(mean loss, accuracy) over ``dataset`` in eval mode."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in loader:
        x, y = x.to(device, memory_format=_memory_format(channels_last)), y.to(device)
        with autocast or contextlib.nullcontext():
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    return loss_sum / count, correct / count


def parameter_checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum().item() for p in model.parameters()))


# --------------------------------------------------------------------------- the loop


class _Progress:
    """tqdm on a terminal; silence otherwise (the per-epoch summary line is printed either way)."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(config: TrainConfig) -> dict:
    """Train ``config.model`` on ``config.dataset``; returns the final metrics and where outputs went."""
    info = init_distributed()
    try:
        return _train(config, info)
    finally:
        shutdown(info)


@dataclass
class _Run:
    """What one training run holds between its steps."""

    config: TrainConfig
    info: DistInfo
    device: torch.device
    bundle: DataBundle
    model: nn.Module  # the bare model: state dicts, evaluation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    reuse: Optional[FeatureReuse]
    steps_per_epoch: int
    graphed: Optional[GraphedStep] = None
    log: Optional[TensorBoardLog] = None
    start_epoch: int = 0
    best_acc: float = 0.0
    history: list = field(default_factory=list)
    #: a run stopped mid-epoch resumes at this step of start_epoch, with the epoch's totals and random states
    resume_step: int = 0
    resume_partial: Optional[dict] = None
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def last_path(self) -> str:
        return os.path.join(self.config.out_dir, "last.pt")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.config.out_dir, "metrics.jsonl")


def _rank_images(total: int, info: DistInfo) -> int:
    """How many images of an epoch rank 0 takes (every world_size-th of the permutation)."""
    return len(range(0, total, info.world_size))


def _drops_a_lone_image(images: int, batch_size: int) -> bool:
    """Whether an epoch's last batch would hold one image: batch norm cannot train on it (one value per
    channel once the maps are 1x1), so the epoch leaves that image out (another epoch's order takes it)."""
    return images > 1 and images % batch_size == 1


def _epoch_batches(images: int, batch_size: int) -> int:
    return math.ceil((images - _drops_a_lone_image(images, batch_size)) / batch_size)


def _set_up(config: TrainConfig, info: DistInfo) -> _Run:
    """The data, the model on its device, the optimizer, schedule, loss scaler and feature reuse."""
    seed_everything(config.seed)
    device = _device(config, info)
    bundle = load_dataset(config.dataset, config.data_root, config.image_size, config.seed)
    if config.train_size is not None:
        bundle = subsample_training(bundle, config.train_size)
    if not config.augment:
        bundle = without_augmentation(bundle)
    model = build_model(config, bundle).to(device, memory_format=_memory_format(config.channels_last))
    steps_per_epoch = _epoch_batches(_rank_images(len(bundle.train), info), config.batch_size)
    optimizer = make_optimizer(
        model, config.optimizer, config.lr, config.weight_decay, config.momentum, config.nesterov
    )
    scheduler = make_scheduler(
        optimizer, config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    reuse = (
        FeatureReuse(model, config.reuse_drop_rate, config.reuse_every, config.seed) if config.feature_reuse else None
    )
    return _Run(config, info, device, bundle, model, optimizer, scheduler, scaler, reuse, steps_per_epoch)


def _resume(run: _Run) -> None:
    """Continue from a checkpoint (``--resume PATH``, or last.pt under ``--resume auto`` when it exists)."""
    config = run.config
    resume_path = run.last_path if config.resume == "auto" else config.resume
    if not resume_path or (config.resume == "auto" and not os.path.isfile(run.last_path)):
        return
    state = load_checkpoint(resume_path, map_location=run.device, kind="resume")
    missing = [k for k in ("optimizer", "scheduler", "scaler", "epoch", "best_acc", "history") if k not in state]
    if missing:
        raise CheckpointError(f"{resume_path} is corrupted: it lacks {', '.join(missing)}")
    _check_resumable(state["config"], config, resume_path)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    _apply_overrides(run)
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.start_epoch, run.best_acc, run.history = state["epoch"], state["best_acc"], list(state["history"])
    run.resume_step, run.resume_partial = state.get("step", 0), state.get("partial")


def _check_resumable(recorded: dict, config: TrainConfig, path: str) -> None:
    """A resume continues what ``path`` recorded: every run-defining option that differs (and is not an
    override asked for) is refused in one line naming its recorded value."""
    differing = [
        f"{_flag(name)} {recorded[name]!r} (this run: {getattr(config, name)!r})"
        for name in RUN_DEFINING
        if name in recorded and recorded[name] != getattr(config, name) and name not in config.resume_overrides
    ]
    if differing:
        overridable = ", ".join(_flag(n) for n in RESUME_OVERRIDES)
        raise ValueError(
            f"cannot resume {path}: it recorded {'; '.join(differing)}; a resume continues the recorded run "
            f"(leave those options out, start a new run, or change {overridable} with --resume-override)"
        )


def _apply_overrides(run: _Run) -> None:
    """The overrides asked for, on the optimizer the checkpoint restored (its state carries the recorded
    hyperparameters; label smoothing is read from the config at every step)."""
    config = run.config
    for i, group in enumerate(run.optimizer.param_groups):
        if "weight_decay" in config.resume_overrides and group.get("decay", i == 0):  # older runs: decay first
            group["weight_decay"] = config.weight_decay
        if "momentum" in config.resume_overrides and "momentum" in group:
            group["momentum"] = config.momentum
            group["nesterov"] = group["nesterov"] and config.momentum > 0


def _step_model(run: _Run) -> nn.Module:
    """The model the training steps call: wrapped for DDP and compiled when asked."""
    model = run.model
    if run.info.enabled:
        ids = [run.info.local_rank] if run.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=run.reuse is not None)
    if not run.config.compile:
        return model
    mode = run.config.compile_mode
    return torch.compile(model, mode=None if mode == "default" else mode)


#: what a run leaves in its folder
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json")


class RunFolderTaken(ValueError):
    """The output folder holds an earlier run that this one would replace; ``folder`` and ``existing`` (its
    run files) let a caller that cannot resume (``sweep``) give its own advice."""

    def __init__(self, folder: str, existing: list[str]) -> None:
        self.folder, self.existing = folder, existing
        super().__init__(
            f"{folder} already holds a run ({', '.join(existing)}); continue it with --resume auto, "
            "replace it with --overwrite, or choose another --out-dir"
        )


def _check_out_dir(config: TrainConfig) -> None:
    """A folder that holds a run is continued (--resume) or replaced on request (--overwrite), never silently."""
    if config.resume or config.overwrite:
        return
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(config.out_dir, name))]
    if existing:
        raise RunFolderTaken(config.out_dir, existing)


def _check_writable(folder: str) -> None:
    """Found before any compute, not when the first epoch's checkpoint is written: the folder can be made and
    written to (a file made and removed at once; nothing of an earlier run changes)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from exc


def _start_outputs(run: _Run) -> None:
    """The opening line; temporary files of interrupted checkpoint writes are removed. Nothing of a
    previous run changes before this one has an epoch to record (:func:`_save_epoch`)."""
    config = run.config
    for path in remove_stale_temporaries(config.out_dir):
        print(f"removed {path}, left by an interrupted checkpoint write", flush=True)
    if config.tensorboard:
        run.log = TensorBoardLog(config.out_dir)
    images = _rank_images(len(run.bundle.train), run.info)
    if _drops_a_lone_image(images, config.batch_size):
        print(
            f"each epoch leaves out one image of {images}: a last batch of one image cannot train batch norm "
            f"(--batch-size {config.batch_size}); each epoch's order leaves out another",
            flush=True,
        )
    n_params = sum(p.numel() for p in run.model.parameters())
    print(
        f"training {config.model} ({n_params:,} parameters) on {config.dataset} [{run.device}, {run.info.world_size} process(es)]",
        flush=True,
    )


def _random_states(run: _Run, generator: torch.Generator) -> dict:
    """Every random stream a step draws from, as it stands (a mid-epoch checkpoint keeps them)."""
    states = {"torch": torch.get_rng_state(), "augment": generator.get_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    states["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]  # loads weights-only
    if run.reuse is not None:
        states["reuse"] = run.reuse.state_dict()
    return states


def _restore_random_states(run: _Run, generator: torch.Generator, states: dict) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["augment"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if run.reuse is not None:
        run.reuse.load_state_dict(states["reuse"])


def _train_epoch(run: _Run, epoch: int, step_model: nn.Module, autocast) -> tuple[float, float, float, float]:
    """One epoch of steps, or what is left of it after a mid-epoch resume; returns (loss sum, correct, count,
    seconds) of this process. A stop request (SIGTERM, SIGINT) ends it after the step in flight, with
    :class:`RunInterrupted` once its checkpoint is written."""
    config, info, bundle, reuse = run.config, run.info, run.bundle, run.reuse
    # everything random in an epoch derives from (seed, epoch): a resume at an epoch boundary is exact
    epoch_seed = _seed_for(config.seed, epoch)
    seed_everything(epoch_seed)
    generator = torch.Generator().manual_seed(epoch_seed)
    if reuse is not None:
        reuse.reseed(epoch_seed)
    if hasattr(bundle.train, "epoch"):
        bundle.train.epoch = epoch
    order = torch.randperm(len(bundle.train), generator=generator)[info.rank :: info.world_size]
    if _drops_a_lone_image(len(order), config.batch_size):
        order = order[:-1]

    step_model.train()
    loss_sum = correct = count = elapsed = 0.0
    first_step = 0
    if run.resume_partial is not None and epoch == run.start_epoch:  # continue a stopped epoch
        first_step = run.resume_step
        loss_sum, correct, count, elapsed = run.resume_partial["totals"]
        _restore_random_states(run, generator, run.resume_partial["random"])
        order = order[first_step * config.batch_size :]
    progress = _Progress(config.progress and info.is_main, run.steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}")
    start = time.perf_counter() - elapsed
    batches = _batches(bundle, order, config.batch_size, config.workers, run.device, config.channels_last)
    for step, (x, y) in enumerate(batches, start=first_step + 1):
        if bundle.augment is not None:
            x = bundle.augment(x, generator)
        out, loss = _train_step(run, step_model, autocast, x, y, epoch)
        loss_sum += loss * y.numel()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
        lr = run.scheduler.get_last_lr()[0]
        progress.update(loss=loss, acc=correct / count, lr=lr)
        if run.log is not None:
            run.log.step(run.scheduler.last_epoch, loss, lr)
        if run.stop.signum is not None:
            progress.close()
            totals = (loss_sum, correct, count, time.perf_counter() - start)
            _stop_mid_epoch(run, epoch, step, totals, _random_states(run, generator))
    progress.close()
    return loss_sum, correct, count, time.perf_counter() - start


def _stop_mid_epoch(run: _Run, epoch: int, step: int, totals: tuple, states: dict) -> None:
    """Write last.pt for a resume at the next step of this epoch, then raise :class:`RunInterrupted`."""
    config = run.config
    if run.info.is_main:
        state = _resume_state(run, epoch)
        state.update(step=step, partial={"totals": list(totals), "random": states})
        save_checkpoint(state, run.last_path, kind="resume")
        write_text_atomic(json.dumps(asdict(config), indent=2), os.path.join(config.out_dir, "config.json"))
    raise RunInterrupted(
        f"stopped by {signal_name(run.stop.signum or 0)} in epoch {epoch + 1} after step {step}; {run.last_path} "
        f"holds the run: continue with pnnh-train train --out-dir {config.out_dir} --resume auto",
        run.stop.signum or 0,
    )


def _check_finite(loss: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate")


def _train_step(run: _Run, step_model: nn.Module, autocast, x: torch.Tensor, y: torch.Tensor, epoch: int):
    """Forward, backward and the optimizer step on one batch; returns (output, loss value)."""
    if run.graphed is not None:
        out, loss = run.graphed.step(x, y)
        _check_finite(loss, epoch)  # after the update: the graph holds the whole step
    else:
        out, loss = _eager_step(run, step_model, autocast, x, y, epoch)
    run.scheduler.step()
    return out, loss.item()


def _eager_step(run: _Run, step_model: nn.Module, autocast, x: torch.Tensor, y: torch.Tensor, epoch: int):
    kind = run.reuse.begin_step() if run.reuse is not None else NORMAL
    with autocast:
        out = step_model(x)
        loss = _loss(run)(out, y)
    _check_finite(loss, epoch)  # before the update: a NaN step never reaches the weights
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.reuse is not None:
        run.reuse.filter_gradients(kind)
        run.reuse.end_step(kind)
    if run.config.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)  # the norm of the true gradients, not of the fp16-scaled ones
        nn.utils.clip_grad_norm_(step_model.parameters(), run.config.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return out, loss


def _loss(run: _Run) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    smoothing = run.config.label_smoothing
    return lambda out, y: F.cross_entropy(out.float(), y, label_smoothing=smoothing)


def _graph_the_step(run: _Run, step_model: nn.Module, autocast) -> None:
    """--cuda-graphs: the step captured once and replayed, or a clear line saying why not."""
    config = run.config
    reason = cuda_graphs.refusal(
        run.device, run.info.enabled, config.feature_reuse, config.amp, config.compile, config.clip_grad is not None
    )
    if reason is not None:
        print(f"{reason}; training without CUDA graphs", flush=True)
        return
    cuda_graphs.graph_ready_optimizer(run.optimizer, run.device)
    run.graphed = GraphedStep(step_model, run.optimizer, autocast, _loss(run))


def _epoch_record(run: _Run, epoch: int, totals: tuple[float, float, float, float], autocast) -> dict:
    """The epoch's metrics, over every process, with the test set's loss and accuracy."""
    elapsed = totals[3]
    loss_sum, correct, count, elapsed_sum = all_reduce_sum(list(totals), run.info)
    test_loss, test_acc = evaluate(
        run.model, run.bundle.test, run.device, autocast=autocast, channels_last=run.config.channels_last
    )
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "lr": run.scheduler.get_last_lr()[0],
        "images_per_s": count / (elapsed_sum / run.info.world_size),  # all images over the mean epoch time
        "epoch_time_s": elapsed,
    }


def _check_not_diverged(run: _Run, record: dict) -> None:
    """Stop a run whose epoch ended non-finite (a NaN test loss, non-finite weights, batch-norm statistics or
    optimizer state, which the training loss alone can miss) before anything of the epoch is written: the
    files on disk keep the last finite epoch."""
    bad = non_finite_entries(run.model.state_dict()) or non_finite_entries(run.optimizer.state_dict(), "optimizer")
    losses = [name for name in ("train_loss", "test_loss") if not math.isfinite(record[name])]
    if not bad and not losses:
        return
    what = f"{bad[0]} holds non-finite values" if bad else f"the {losses[0].replace('_', ' ')} is {record[losses[0]]}"
    kept = [r["epoch"] for r in run.history[:-1]]
    left = f"last.pt keeps epoch {kept[-1]}" if kept else "no checkpoint of this run was written"
    raise FloatingPointError(f"the run diverged at epoch {record['epoch']}: {what}; {left}; lower the learning rate")


def _resume_state(run: _Run, epoch: int) -> dict:
    """What last.pt holds after ``epoch`` completed epochs: everything a resume needs."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "best_acc": run.best_acc,
        "history": run.history,
        "config": asdict(run.config),
        "model_arguments": model_arguments(run.config, run.bundle),
    }


def _save_epoch(run: _Run, record: dict, first: bool) -> None:
    """config.json (at this invocation's first epoch), metrics.jsonl (exactly the epochs last.pt has seen),
    last.pt (everything a resume needs), best.pt when the test accuracy is the best yet; each file replaced
    atomically."""
    config, epoch = run.config, record["epoch"]
    if first:
        write_text_atomic(json.dumps(asdict(config), indent=2), os.path.join(config.out_dir, "config.json"))
    write_text_atomic("".join(json.dumps(r) + "\n" for r in run.history), run.metrics_path)
    state = _resume_state(run, epoch)
    save_checkpoint(state, run.last_path, kind="resume")
    if record["test_acc"] >= run.best_acc:
        best = {"model": run.model.state_dict(), "config": asdict(config), "epoch": epoch}
        best["model_arguments"] = state["model_arguments"]
        save_checkpoint(best, os.path.join(config.out_dir, "best.pt"), kind="weights")
    if run.log is not None:
        run.log.epoch(record)
    print(
        f"epoch {epoch:3d}/{config.epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}  "
        f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.4f}  {record['images_per_s']:.0f} img/s",
        flush=True,
    )


@contextlib.contextmanager
def _closing_log(run: _Run) -> Iterator[None]:
    try:
        yield
    finally:
        if run.log is not None:
            run.log.close()


def _summary(run: _Run) -> dict:
    return {
        "model": run.config.model,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "final": run.history[-1] if run.history else {},
        "best_test_acc": run.best_acc,
        "out_dir": os.path.abspath(run.config.out_dir),
        "checkpoint": os.path.abspath(run.last_path),
        "metrics": os.path.abspath(run.metrics_path),
        "history": run.history,
    }


def _train(config: TrainConfig, info: DistInfo) -> dict:
    if not info.is_main:
        return _train_in_folder(config, info)
    _check_writable(config.out_dir)
    with hold_run_folder(config.out_dir):  # before anything is read or written there: one run at a time
        _check_out_dir(config)
        return _train_in_folder(config, info)


def _train_in_folder(config: TrainConfig, info: DistInfo) -> dict:
    run = _set_up(config, info)
    _resume(run)
    step_model = _step_model(run)
    autocast = _autocast(config, run.device)
    if config.cuda_graphs:
        _graph_the_step(run, step_model, autocast)
    if info.is_main:
        _start_outputs(run)
    end_epoch = config.epochs if config.stop_after is None else min(config.epochs, run.start_epoch + config.stop_after)
    # signals stop single-process runs at a step boundary (DDP ranks would stop at different steps)
    with stop_on_signals(enabled=not info.enabled) as run.stop, _closing_log(run):
        for epoch in range(run.start_epoch, end_epoch):
            totals = _train_epoch(run, epoch, step_model, autocast)
            record = _epoch_record(run, epoch, totals, autocast)
            run.history.append(record)
            _check_not_diverged(run, record)  # on every process: all of them stop together
            run.best_acc = max(run.best_acc, record["test_acc"])
            if info.is_main:
                _save_epoch(run, record, first=epoch == run.start_epoch)
    if info.enabled:
        print(f"rank {info.rank}: parameter checksum {parameter_checksum(run.model):.10e}", flush=True)
    return _summary(run)
