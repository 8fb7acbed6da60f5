"""The training tool: end-to-end runs, exact resume, atomic checkpoints, feature reuse, analysis, DDP, sweep."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pnnh_kernels.models import create_model
from pnnh_kernels.train import TrainConfig, train
from pnnh_kernels.train.analysis import analyse, linear_cka, reconstruction_r2
from pnnh_kernels.train.checkpoint import load_checkpoint
from pnnh_kernels.train.feature_reuse import NORMAL, TYPE1, TYPE2, FeatureReuse
from pnnh_kernels.train.optim import WarmupCosine, make_optimizer, parameter_groups


def small(tmp_path, **kw):
    base = dict(model="resnet8", epochs=2, batch_size=128, lr=0.05, out_dir=str(tmp_path / "run"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(
    "extra", [dict(drop_path_rate=0.1), dict(feature_reuse=True, reuse_every=2)], ids=["droppath", "feature_reuse"]
)
def test_resume_continues_exactly(tmp_path, extra):
    straight = train(small(tmp_path / "a", epochs=3, **extra))
    train(small(tmp_path / "b", epochs=3, stop_after=1, **extra))  # interrupted after one epoch
    resumed = train(small(tmp_path / "b", epochs=3, resume="auto", **extra))
    a = load_checkpoint(straight["checkpoint"])
    b = load_checkpoint(resumed["checkpoint"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["train_loss"] for r in straight["history"]] == [r["train_loss"] for r in resumed["history"]]
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_resume_refuses_another_model_or_schedule(tmp_path):
    train(small(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"recorded --model 'resnet8' \(this run: 'plain_resnet8'\)"):
        train(small(tmp_path, model="plain_resnet8", resume="auto"))
    with pytest.raises(ValueError, match=r"recorded --epochs 1 \(this run: 3\)"):
        train(small(tmp_path, epochs=3, resume="auto"))


@pytest.mark.parametrize("augment", [True, False])
def test_augment_false_trains_on_the_images_as_loaded(tmp_path, monkeypatch, augment):
    import pnnh_kernels.train.data as data

    shifted = []
    monkeypatch.setattr(data, "random_translate", lambda x, pad, g: shifted.append(len(x)) or x)
    train(small(tmp_path, epochs=1, augment=augment))
    assert (sum(shifted) > 0) is augment
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["augment"] is augment


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_feature_reuse_freezes_exactly_what_it_must():
    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # momentum must not leak into frozen params
    reuse = FeatureReuse(model, drop_rate=0.4, every=1, seed=3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    block_names = {id(b): n for n, b in model.named_modules()}

    def step():
        kind = reuse.begin_step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        dropped = [block_names[id(reuse.blocks[i])] for i in (reuse.dropped or [])]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        reuse.filter_gradients(kind)
        reuse.end_step(kind)
        opt.step()
        return kind, dropped, _changed(before, model)

    for _ in range(3):
        kind, dropped, changed = step()
        assert kind == TYPE1 and dropped
        in_dropped = lambda n: any(n.startswith(d + ".") for d in dropped)
        assert not any(in_dropped(n) for n in changed)  # dropped blocks did not run: unchanged
        assert any(n.startswith("head") for n in changed)
        kind, dropped2, changed = step()
        assert kind == TYPE2 and dropped2 == dropped
        assert changed and all(in_dropped(n) for n in changed)  # only the dropped blocks learn
        assert all(not b.skip for b in reuse.blocks)


def test_feature_reuse_schedule_and_errors():
    model = create_model("resnet20", in_chans=1)
    reuse = FeatureReuse(model, 0.2, every=3)
    kinds = []
    for _ in range(8):
        kind = reuse.begin_step()
        kinds.append(kind)
        reuse.end_step(kind)
    assert kinds == [NORMAL, NORMAL, TYPE1, TYPE2, NORMAL, NORMAL, TYPE1, TYPE2]
    with pytest.raises(ValueError, match="needs a residual model"):
        FeatureReuse(create_model("plain_resnet20"), 0.2)


def _displacement(tmp_path, monkeypatch, **options) -> float:
    """How far one SGD run (no momentum, no decay) moves the weights from their initial values."""
    import pnnh_kernels.train.trainer as trainer

    initial = {}

    def snapshot(model, *args, **kwargs):
        initial.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return make_optimizer(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "make_optimizer", snapshot)
    result = train(small(tmp_path, epochs=1, train_size=256, momentum=0.0, weight_decay=0.0, **options))
    final = load_checkpoint(result["checkpoint"])["model"]
    return math.sqrt(sum(float((final[n] - p).pow(2).sum()) for n, p in initial.items()))


def test_clip_grad_bounds_every_step_by_the_clipped_norm(tmp_path, monkeypatch):
    # two steps of SGD at a rate <= 0.05, each gradient's norm clipped to 1e-3: the weights move at most 1e-4
    clipped = _displacement(tmp_path / "clipped", monkeypatch, clip_grad=1e-3)
    free = _displacement(tmp_path / "free", monkeypatch)
    assert 0 < clipped <= 2 * 0.05 * 1e-3 * (1 + 1e-4)
    assert free > 10 * clipped
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip-grad must be a positive number"):
            small(tmp_path, clip_grad=bad)


def test_weight_decay_rules_and_schedule():
    model = create_model("vit_tiny", img_size=8, patch_size=4, depth=1)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() > 1 for p in decay["params"])
    assert {"cls_token", "pos_embed"} <= {names[id(p)] for p in no_decay["params"]}
    sched = WarmupCosine(total_steps=100, warmup_steps=10)
    assert sched(0) == pytest.approx(0.1) and sched(9) == pytest.approx(1.0)
    assert sched(55) == pytest.approx(0.5) and sched(100) == pytest.approx(0.0)


def test_analysis_measures():
    torch.manual_seed(0)
    x = torch.randn(64, 20, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(x, torch.randn(64, 20, dtype=torch.float64)) < 0.5
    assert reconstruction_r2(x @ q, x) > 0.95
    assert reconstruction_r2(torch.randn(64, 20, dtype=torch.float64), x) < 0.2
    model = create_model("plain_resnet8", in_chans=1)
    rows = analyse(model, torch.randn(32, 1, 8, 8))
    assert len(rows) == 1 + 3 and all(0 <= r["surviving"] <= 1 for r in rows)


@pytest.mark.slow
def test_ddp_two_processes_on_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "pnnh_kernels.train.cli",
        "train",
        "--model",
        "resnet8",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--out-dir",
        str(tmp_path / "ddp"),
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    sums = sorted(line.split()[-1] for line in done.stdout.splitlines() if "parameter checksum" in line)
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold the same weights
    assert (tmp_path / "ddp" / "last.pt").exists()


def test_mixed_precision_bf16_trains(tmp_path):
    """--amp bf16 runs under autocast (on the CPU here; the same code path serves CUDA)."""
    result = train(small(tmp_path, model="pnnh_resnet8", epochs=1, amp="bf16"))
    assert math.isfinite(result["final"]["train_loss"]) and result["final"]["test_acc"] > 0.1


def test_channels_last_training_matches_contiguous_training(tmp_path):
    """--channels-last changes the memory format of the model and the batches, not what is learned."""
    base = train(small(tmp_path / "nchw", model="pnnh_resnet8", epochs=1))
    cl = train(small(tmp_path / "cl", model="pnnh_resnet8", epochs=1, channels_last=True))
    a, b = base["final"], cl["final"]
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 * a["train_loss"], (a, b)
    weights = load_checkpoint(cl["checkpoint"])["model"]
    assert any(
        w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        for w in weights.values()
    )


@pytest.mark.slow
def test_compiled_training_matches_eager_training(tmp_path):
    """--compile trains through torch.compile (inductor) and learns like the eager run of the same seed."""
    eager = train(small(tmp_path / "eager", epochs=1))
    compiled = train(small(tmp_path / "compiled", epochs=1, compile=True))
    a, b = eager["final"], compiled["final"]
    assert math.isfinite(b["train_loss"]) and abs(a["train_loss"] - b["train_loss"]) < 0.05 * a["train_loss"]


def test_tensorboard_gets_the_epoch_metrics_and_the_step_losses(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = train(small(tmp_path, epochs=2, tensorboard=True, train_size=256))
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    test_acc = events.Scalars("test/acc")
    assert [e.step for e in test_acc] == [1, 2]
    assert [e.value for e in test_acc] == pytest.approx([r["test_acc"] for r in result["history"]])
    assert len(events.Scalars("step/loss")) == 2 * 2  # 256 images in batches of 128, two epochs
    assert {"train/loss", "train/lr", "speed/images_per_s"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(reuse_every=2), "--reuse-every applies to --feature-reuse runs only"),
        (dict(reuse_drop_rate=0.5), "--reuse-drop-rate applies to --feature-reuse runs only"),
        (dict(image_size=0), "image-size must be a positive number"),
    ],
)
def test_options_that_would_be_ignored_are_refused(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        small(tmp_path, **options)


def test_a_trained_model_loads_outside_the_cli(tmp_path):
    """best.pt / last.pt rebuild their model with load_trained_model (documented in docs/TRAINING.md)."""
    from pnnh_kernels.train import evaluate, load_trained_model
    from pnnh_kernels.train.data import load_dataset

    result = train(small(tmp_path, model="pnnh_resnet8", epochs=1, model_options={"share_coder": True}))
    test_set = load_dataset("digits").test
    for name in ("best.pt", "last.pt"):
        model = load_trained_model(str(tmp_path / "run" / name))
        assert not model.training
        _, accuracy = evaluate(model, test_set, torch.device("cpu"))
        assert accuracy == result["best_test_acc"]
