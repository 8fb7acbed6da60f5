"""``pnnh-train`` (train/cli.py): the main job end to end, the sweep, and every user mistake as one line
on stderr with exit code 2 (no traceback); a folder that holds a run is never overwritten unasked."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from helpers import write_image_folder

from pnnh_kernels.train.cli import main as cli_main


def _fails_cleanly(argv, capsys, match):
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pnnh-train: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(
        ["train", "--model", "pnnh_resnet8", "--epochs", "2", "--out-dir", str(out), "--analyze", "--no-progress"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for name in (
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "curves.png",
        "dissipation.png",
        "config.json",
        "dissipation_trained.csv",
        "dissipation_init.csv",
        "dissipation_plain_resnet8_init.csv",  # the paper's comparison: plain and ResNet of the same depth
        "dissipation_resnet8_init.csv",
    ):
        assert (out / name).exists(), name
        if name.endswith((".png", ".pt")) and name != "best.pt":  # the tables are named in the folder only
            assert str(out / name) in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["test_acc"] > 0.3  # two epochs on digits learn something (chance is 0.1)
    assert "final test accuracy" in printed


def test_cli_reports_errors_cleanly(capsys):
    assert cli_main(["train", "--dataset", "cifar10", "--no-progress"]) == 2
    assert "needs --data-root" in capsys.readouterr().err


def test_a_sweep_into_an_earlier_sweeps_runs_says_what_a_sweep_accepts(tmp_path, capsys):
    run = tmp_path / "sweep" / "plain8-seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    args = ["sweep", "--families", "plain", "--depths", "8", "--epochs", "1", "--out-dir", str(tmp_path / "sweep")]
    assert cli_main([*args, "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "--resume" not in err, err


def test_sweep_writes_its_table_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = cli_main(
        [
            "sweep",
            "--families",
            "plain",
            "resnet_reuse",
            "--lr-scales",
            "plain=0.5",
            "--depths",
            "8",
            "--seeds",
            "0",
            "1",
            "--epochs",
            "1",
            "--out-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    runs = (out / "sweep.csv").read_text().splitlines()
    assert runs[0].startswith("family,depth,seed,model,parameters") and len(runs) == 1 + 2 * 2
    summary = (out / "sweep_summary.csv").read_text().splitlines()
    header = summary[0].split(",")
    assert len(summary) == 1 + 2 and "test_acc_std" in header and "seeds" in header
    lrs = {row.split(",")[0]: float(row.split(",")[-1]) for row in runs[1:]}
    assert lrs == pytest.approx({"plain": 0.025, "resnet_reuse": 0.01})  # the scale given, and the family's own
    config = json.loads((out / "resnet_reuse8-seed1" / "config.json").read_text())
    assert config["feature_reuse"] and config["model"] == "resnet8"
    assert all(row.split(",")[header.index("seeds")] == "2" for row in summary[1:])
    assert "+-" in capsys.readouterr().out and (out / "sweep.png").exists()


TINY = ["--model", "resnet8", "--epochs", "1", "--batch-size", "256", "--no-progress"]


@pytest.mark.parametrize(
    "options, match",
    [
        (["--weight-decay", "-1"], "weight-decay must be a non-negative number"),
        (["--warmup-epochs", "-5"], "warmup-epochs must be a non-negative number"),
        (["--workers", "-1"], "workers must be a non-negative number"),
        (["--stop-after", "0"], "stop-after must be at least 1 epoch"),
        (["--label-smoothing", "1.5"], "label-smoothing must lie in [0, 1)"),
        (["--model", "no_such_net"], "unknown model 'no_such_net'"),
        (["--model-options", '{"no_such_option": 1}'], "cannot be built with these options"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
        (["--model", "pnnh_resnet8", "--backend", "cuda" if not torch.cuda.is_available() else "nope"], "backend"),
    ],
    ids=[
        "weight_decay",
        "warmup",
        "workers",
        "stop_after",
        "label_smoothing",
        "model",
        "model_options",
        "device",
        "backend",
    ],
)
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, options, match):
    _fails_cleanly(["train", *TINY, "--out-dir", str(tmp_path / "run"), *options], capsys, match)


def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pnnh_kernels.train.trainer.tensorboard_installed", lambda: False)
    _fails_cleanly(
        ["train", *TINY, "--out-dir", str(tmp_path / "run"), "--tensorboard"], capsys, "pip install tensorboard"
    )


def test_an_unwritable_out_dir_is_refused_before_any_training(tmp_path, capsys, monkeypatch):
    from pnnh_kernels.train import trainer

    def no_training(*args, **kwargs):
        raise AssertionError("the model was built before the folder was checked")

    monkeypatch.setattr(trainer, "_set_up", no_training)
    (tmp_path / "a_file").write_text("")  # a folder below a file cannot be made, even by root
    _fails_cleanly(["train", *TINY, "--out-dir", str(tmp_path / "a_file" / "run")], capsys, "cannot write to")


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", *TINY, "--out-dir", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json")}
    capsys.readouterr()
    _fails_cleanly(["train", *TINY, "--out-dir", str(out)], capsys, "already holds a run")
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing touched
    assert cli_main(["train", *TINY, "--out-dir", str(out), "--overwrite"]) == 0
    assert cli_main(["train", *TINY, "--out-dir", str(out), "--resume", "auto"]) == 0  # finished: nothing to do


def test_a_rerun_that_fails_in_its_first_epoch_changes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli_main(["train", *TINY, "--out-dir", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def diverge(*args, **kwargs):
        raise FloatingPointError("loss became nan at epoch 1; lower the learning rate")

    monkeypatch.setattr("pnnh_kernels.train.trainer._train_step", diverge)
    _fails_cleanly(["train", *TINY, "--out-dir", str(out), "--overwrite"], capsys, "loss became nan")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "content, match",
    [(b"", "is empty"), (b"not a checkpoint", "corrupted or not a pnnh-train checkpoint")],
    ids=["empty", "text"],
)
def test_a_bad_resume_file_is_one_line(tmp_path, capsys, content, match):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    line = _fails_cleanly(["train", *TINY, "--out-dir", str(tmp_path / "run"), "--resume", str(bad)], capsys, match)
    assert str(bad) in line


def test_resuming_from_best_pt_says_to_use_last_pt(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", *TINY, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    _fails_cleanly(["train", *TINY, "--out-dir", str(out), "--resume", str(out / "best.pt")], capsys, "last.pt")


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "last.pt"))

    monkeypatch.setattr("pnnh_kernels.train.trainer.save_checkpoint", no_space)
    _fails_cleanly(["train", *TINY, "--out-dir", str(tmp_path / "run")], capsys, "no space left on device writing")


def test_metrics_hold_exactly_the_recorded_epochs(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", *TINY, "--epochs", "2", "--stop-after", "1", "--out-dir", str(out)]) == 0
    assert cli_main(["train", *TINY, "--epochs", "2", "--out-dir", str(out), "--resume", "auto"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_the_default_folder_is_never_overwritten_a_fresh_one_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", *TINY]) == 0
    first = (tmp_path / "runs" / "resnet8-digits" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli_main(["train", *TINY]) == 0
    assert "runs/resnet8-digits-2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "resnet8-digits-2" / "last.pt").exists()
    assert (tmp_path / "runs" / "resnet8-digits" / "metrics.jsonl").read_bytes() == first


def test_analysis_tables_are_not_overwritten_unasked(tmp_path, capsys):
    argv = ["analyze", "--models", "plain_resnet8", "--out-dir", str(tmp_path / "a")]
    assert cli_main(argv) == 0
    capsys.readouterr()
    _fails_cleanly(argv, capsys, "pass --overwrite")
    assert cli_main([*argv, "--overwrite"]) == 0


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    """The folder's lock is held for a run's whole life (here by this process, as a live run holds it)."""
    from pnnh_kernels.train.run_lock import LOCK_NAME, hold_run_folder

    out = tmp_path / "run"
    out.mkdir()
    with hold_run_folder(str(out)):
        line = _fails_cleanly(["train", *TINY, "--out-dir", str(out)], capsys, "is in use by another run")
        assert f"pid {os.getpid()}" in line
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written beside the holder's lock
    assert not (out / LOCK_NAME).exists()  # released and removed when the holder ends
    assert cli_main(["train", *TINY, "--out-dir", str(out)]) == 0
    assert not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_run_is_not_in_force(tmp_path, capsys):
    """kill -9 leaves the lock file behind; the kernel released its lock, so the next run takes the folder."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # outside the source tree: the installed package
        [sys.executable, "-c", HOLD_AND_WAIT, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        _fails_cleanly(["train", *TINY, "--out-dir", str(out)], capsys, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".run.lock").exists()  # stale: its holder is gone
    assert cli_main(["train", *TINY, "--out-dir", str(out)]) == 0


HOLD_AND_WAIT = """
import sys, time
from pnnh_kernels.train.run_lock import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_whose_test_loss_turns_nan_stops_keeping_the_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    """The training loss stays finite; a batch norm's running variance goes NaN in epoch 2, so the test loss is
    NaN: the run stops with one line and exit 2, and no file on disk holds a non-finite tensor."""
    from pnnh_kernels.train import trainer
    from pnnh_kernels.train.checkpoint import load_checkpoint, non_finite_entries

    real_evaluate, calls = trainer.evaluate, []

    def evaluate_after_poisoning(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            norm.running_var[0] = float("nan")
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate_after_poisoning)
    out = tmp_path / "run"
    line = _fails_cleanly(
        ["train", *TINY, "--epochs", "3", "--out-dir", str(out)], capsys, "the run diverged at epoch 2"
    )
    assert "running_var holds non-finite values" in line and "last.pt keeps epoch 1" in line
    last, best = load_checkpoint(str(out / "last.pt"), kind="resume"), load_checkpoint(str(out / "best.pt"))
    assert last["epoch"] == 1 and non_finite_entries(last) == [] and non_finite_entries(best) == []
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(tmp_path):
    from pnnh_kernels.train.checkpoint import save_checkpoint

    state = {"model": {"w": torch.tensor([1.0, float("inf")])}, "config": {}}
    with pytest.raises(FloatingPointError, match=r"model\.w holds non-finite values"):
        save_checkpoint(state, str(tmp_path / "last.pt"), kind="resume")
    assert list(tmp_path.iterdir()) == []


def _interrupted_run(tmp_path, *options):
    out = tmp_path / "run"
    base = ["train", *TINY, "--epochs", "2", "--out-dir", str(out)]
    assert cli_main([*base, "--stop-after", "1", "--weight-decay", "0.001", *options]) == 0
    return out


def test_a_resume_continues_the_recorded_options_the_command_line_leaves_out(tmp_path, capsys):
    out = _interrupted_run(tmp_path, "--seed", "3", "--train-size", "500")
    argv = ["train", "--out-dir", str(out), "--resume", "auto", "--no-progress"]  # no --model, no schedule
    assert cli_main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["epochs"], config["weight_decay"], config["seed"], config["train_size"]) == (
        "resnet8",
        2,
        0.001,
        3,
        500,
    )
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["kind"] == "resume"


@pytest.mark.parametrize(
    "changed, recorded",
    [
        (["--weight-decay", "0.002"], "--weight-decay 0.001 (this run: 0.002)"),
        (["--momentum", "0.5"], "--momentum 0.9 (this run: 0.5)"),
        (["--warmup-epochs", "0"], "--warmup-epochs 1.0 (this run: 0.0)"),
        (["--seed", "1"], "--seed 0 (this run: 1)"),
        (["--train-size", "300"], "--train-size None (this run: 300)"),
        (["--optimizer", "adamw"], "--optimizer 'sgd' (this run: 'adamw')"),
        (["--clip-grad", "1.0"], "--clip-grad None (this run: 1.0)"),
        (["--model-options", '{"share_coder": true}'], "--model-options {}"),
    ],
)
def test_a_resume_with_a_changed_option_is_refused_naming_the_recorded_value(tmp_path, capsys, changed, recorded):
    out = _interrupted_run(tmp_path)
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    argv = ["train", *TINY, "--epochs", "2", "--weight-decay", "0.001", "--out-dir", str(out), "--resume", "auto"]
    line = _fails_cleanly([*argv, *changed], capsys, "a resume continues the recorded run")
    assert recorded in line
    assert (out / "last.pt").read_bytes() == before


def test_an_override_asked_for_on_resume_is_applied_and_recorded(tmp_path, capsys):
    out = _interrupted_run(tmp_path)
    argv = ["train", "--out-dir", str(out), "--resume", "auto", "--no-progress", "--weight-decay", "0.004"]
    assert cli_main([*argv, "--momentum", "0.8", "--resume-override", "weight-decay", "momentum"]) == 0
    assert json.loads((out / "config.json").read_text())["weight_decay"] == 0.004
    from pnnh_kernels.train.checkpoint import load_checkpoint

    groups = load_checkpoint(str(out / "last.pt"), kind="resume")["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["momentum"]) for g in groups] == [(0.004, 0.8), (0.0, 0.8)]
    capsys.readouterr()
    _fails_cleanly([*argv, "--resume-override", "seed"], capsys, "--seed cannot change on resume")


def test_analyze_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    """resnet8 and plain_resnet8 have the same parameter names: the wrong checkpoint loaded without a word."""
    assert cli_main(["train", *TINY, "--out-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    argv = ["analyze", "--models", "plain_resnet8", "--checkpoints", str(tmp_path / "run" / "best.pt")]
    _fails_cleanly([*argv, "--out-dir", str(tmp_path / "a")], capsys, "holds a trained resnet8, not plain_resnet8")


def test_analyze_measures_vits_at_init_with_options_and_as_trained(tmp_path, capsys):
    """The sweep's ViTs (width 32, 2x2 patches) at init, and one trained that way rebuilt from its checkpoint."""
    vit = '{"dim": 32, "heads": 2, "patch_size": 2, "depth": 3}'
    argv = ["train", *TINY, "--model", "pnnh_vit_tiny", "--model-options", vit, "--out-dir", str(tmp_path / "run")]
    assert cli_main(argv) == 0
    models = ["pnnh_vit_tiny", "plain_vit_tiny"]
    argv = ["analyze", "--models", *models, "--model-options", vit, "--out-dir", str(tmp_path / "a")]
    checkpoint = str(tmp_path / "run" / "best.pt")
    assert cli_main([*argv, "--checkpoints", checkpoint]) == 0
    out = capsys.readouterr().out
    assert "pnnh_vit_tiny (trained)" in out and "plain_vit_tiny (init)" in out
    rows = (tmp_path / "a" / "plain_vit_tiny.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 3  # header, the patch embedding, three blocks


def test_a_broken_image_read_by_a_worker_process_is_one_line(tmp_path, capsys):
    """With --workers > 0 the error comes from a DataLoader worker, whose traceback torch puts in the message."""
    write_image_folder(str(tmp_path))
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"broken")
    argv = ["train", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--image-size", "8", "--workers", "1"]
    line = _fails_cleanly([*argv, *TINY, "--out-dir", str(tmp_path / "run")], capsys, "cannot decode image")
    assert "Traceback" not in line and "0.png" in line


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total)"),
        MemoryError(),
    ],
    ids=["cpu", "cuda", "python"],
)
def test_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch, error):
    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr("pnnh_kernels.train.trainer._train_step", no_memory)
    line = _fails_cleanly(["train", *TINY, "--out-dir", str(tmp_path / "run")], capsys, "out of memory")
    assert "lower --batch-size" in line


def test_a_last_batch_of_one_image_is_left_out_and_said(tmp_path, capsys):
    """4x4 images reach batch norm at 1x1 in the last stage: a one-image batch there was an error mid-run."""
    write_image_folder(str(tmp_path))  # six training images, batches of five
    argv = ["train", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--image-size", "4", "--epochs", "2"]
    assert cli_main([*argv, "--model", "resnet8", "--batch-size", "5", "--out-dir", str(tmp_path / "run")]) == 0
    assert "each epoch leaves out one image of 6" in capsys.readouterr().out


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals reach the main thread")
@pytest.mark.parametrize("options", [[], ["--feature-reuse", "--reuse-every", "2"]], ids=["plain", "feature_reuse"])
def test_sigterm_mid_epoch_writes_a_checkpoint_that_resumes_exactly(tmp_path, capsys, monkeypatch, options):
    """How clusters preempt: the step in flight finishes, last.pt holds the epoch so far (its random states
    too), the run exits 143 saying how to continue, and the resumed run ends bitwise equal to an
    uninterrupted one."""
    from pnnh_kernels.train import trainer
    from pnnh_kernels.train.checkpoint import load_checkpoint

    argv = ["train", *TINY, "--model", "resnet8", "--epochs", "2", "--batch-size", "200", *options]
    assert cli_main([*argv, "--out-dir", str(tmp_path / "straight")]) == 0

    real_step, steps = trainer._train_step, []

    def step_then_preempt(*args, **kwargs):
        result = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 10:  # the third step of epoch 2 (8 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer, "_train_step", step_then_preempt)
    out = tmp_path / "preempted"
    capsys.readouterr()
    assert cli_main([*argv, "--out-dir", str(out)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped by SIGTERM in epoch 2 after step 2" in err[0] and "--resume auto" in err[0]
    assert load_checkpoint(str(out / "last.pt"), kind="resume")["step"] == 2
    monkeypatch.setattr(trainer, "_train_step", real_step)
    assert cli_main(["train", "--out-dir", str(out), "--resume", "auto", "--no-progress"]) == 0
    a = load_checkpoint(str(tmp_path / "straight" / "last.pt"))
    b = load_checkpoint(str(out / "last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


def test_a_second_ctrl_c_stops_at_once():
    from pnnh_kernels.train.interrupt import StopRequest

    request = StopRequest()
    request(signal.SIGINT, None)
    assert request.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        request(signal.SIGINT, None)


def test_export_writes_verified_files_and_the_main_job_says_how(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the deploy extra")
    pytest.importorskip("onnxscript")
    out = tmp_path / "run"
    assert (
        cli_main(
            ["train", *TINY, "--model", "pnnh_resnet8", "--epochs", "3", "--batch-size", "64", "--out-dir", str(out)]
        )
        == 0
    )
    assert f"pnnh-train export --run {out} --format onnx" in capsys.readouterr().out
    assert cli_main(["export", "--run", str(out), "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    assert (out / "model-fast.onnx").exists() and (out / "model-fast-int8.onnx").exists()
    exported, int8 = (line for line in printed.splitlines() if "largest difference" in line)
    assert float(exported.split("model ")[1].split(",")[0]) < 1e-4  # the float file is the model
    accuracy = [float(line.split("test accuracy ")[1].split()[0]) for line in (exported, int8)]
    assert accuracy[0] > 0.3 and abs(accuracy[1] - accuracy[0]) < 0.1  # int8 keeps what the model learned
    assert cli_main(["export", "--run", str(out), "--format", "pt2", "--form", "plain"]) == 0
    assert (out / "model-plain.pt2").exists()
    capsys.readouterr()
    _fails_cleanly(["export", "--run", str(out)], capsys, "model-fast.onnx exists; pass --overwrite")
    _fails_cleanly(["export", "--run", str(out), "--format", "pt2", "--quantize", "int8"], capsys, "--format onnx")


def test_export_to_onnx_without_the_deploy_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli_main(["train", *TINY, "--model", "pnnh_resnet8", "--out-dir", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    _fails_cleanly(["export", "--run", str(out)], capsys, "pip install 'pnnh_kernels[deploy]'")


def test_a_transformer_sweep_trains_each_vit_family_at_each_depth(tmp_path, capsys):
    """The ViT rows take the depth as a model option and train with AdamW, a warm-up and no shifts (issue #29)."""
    out = tmp_path / "sweep"
    families = ["vit", "plain_vit", "pnnh_vit", "pnnh_slim_vit"]
    argv = ["sweep", "--families", *families, "--depths", "1", "2", "--epochs", "1", "--train-size", "200"]
    assert cli_main([*argv, "--batch-size", "100", "--no-progress", "--out-dir", str(out)]) == 0
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert {(r["family"], r["depth"]) for r in runs} == {(f, d) for f in families for d in (1, 2)}
    config = json.loads((out / "pnnh_slim_vit2-seed0" / "config.json").read_text())
    assert config["model"] == "pnnh_slim_vit_tiny" and config["model_options"]["depth"] == 2
    assert (config["optimizer"], config["warmup_epochs"], config["lr"]) == ("adamw", 2.0, pytest.approx(2e-3))
    assert config["augment"] is False  # the digits' 1-pixel shifts cross the 2x2 patches (train/sweep.py)
    vit_lr = json.loads((out / "vit2-seed0" / "config.json").read_text())["lr"]
    assert vit_lr == pytest.approx(1e-3)  # each family at its own tuned rate
    params = {(r["family"], r["depth"]): r["parameters"] for r in runs}
    assert params[("vit", 2)] > params[("vit", 1)] and params[("pnnh_slim_vit", 2)] < params[("vit", 2)]


def test_vits_refuse_a_backend_and_load_checkpoints_that_recorded_one(tmp_path, capsys):
    """The ViTs' blocks are plain PyTorch: --backend other than auto is refused in one line, and a checkpoint
    whose model arguments recorded a backend (older runs) still loads."""
    from pnnh_kernels.train.checkpoint import load_checkpoint, save_checkpoint
    from pnnh_kernels.train.trainer import load_trained_model

    vit = ["--model", "vit_tiny", "--model-options", '{"dim": 16, "heads": 2, "patch_size": 4, "depth": 1}']
    argv = ["train", *vit, "--epochs", "1", "--batch-size", "256", "--no-progress", "--train-size", "64"]
    refused = [*argv, "--backend", "eager", "--out-dir", str(tmp_path / "refused")]
    _fails_cleanly(refused, capsys, "--backend eager: the ViTs' blocks are plain PyTorch and take no backend")
    assert cli_main([*argv, "--out-dir", str(tmp_path / "run")]) == 0
    best = str(tmp_path / "run" / "best.pt")
    state = load_checkpoint(best)
    state["model_arguments"] = {**state["model_arguments"], "backend": "auto"}
    save_checkpoint(state, best, kind="weights")
    model = load_trained_model(best)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
