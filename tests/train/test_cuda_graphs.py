"""--cuda-graphs (train/cuda_graphs.py): where capture is impossible the run says why and trains without it;
on a GPU the captured step trains exactly like the ordinary one, learning-rate schedule included."""

import copy

import pytest
import torch

from pnnh_kernels.models import create_model
from pnnh_kernels.train import TrainConfig, train
from pnnh_kernels.train.cuda_graphs import WARMUP_STEPS, GraphedStep, graph_ready_optimizer, refusal
from pnnh_kernels.train.optim import make_optimizer, make_scheduler

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device=torch.device("cpu")), "needs a CUDA device"),
        (dict(distributed=True), "DDP"),
        (dict(feature_reuse=True), "feature-reuse"),
        (dict(amp="fp16"), "use --amp bf16"),
        (dict(compile=True), "reduce-overhead"),
        (dict(clip_grad=True), "--clip-grad"),
    ],
)
def test_what_cannot_be_captured_is_named(kwargs, match):
    args = dict(device=CUDA, distributed=False, feature_reuse=False, amp="none", compile=False)
    args.update(kwargs)
    reason = refusal(**args)
    assert reason is not None and match in reason
    assert refusal(CUDA, False, False, "bf16", False) is None


def test_a_cpu_run_says_it_trains_without_cuda_graphs(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    out_dir = str(tmp_path / "run")
    train(TrainConfig(model="resnet8", epochs=1, batch_size=256, out_dir=out_dir, progress=False, cuda_graphs=True))
    assert "--cuda-graphs needs a CUDA device, not cpu; training without CUDA graphs" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_captured_step_trains_like_the_ordinary_one(optimizer):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    base = create_model("pnnh_resnet8", num_classes=10, in_chans=3).cuda()
    models = [base, copy.deepcopy(base)]
    opts = [make_optimizer(m, optimizer, 0.05, 5e-4) for m in models]
    scheds = [make_scheduler(o, 12, 2) for o in opts]
    graph_ready_optimizer(opts[1], CUDA)
    loss_fn = lambda out, y: torch.nn.functional.cross_entropy(out.float(), y)
    graphed = GraphedStep(models[1], opts[1], torch.autocast("cuda", enabled=False), loss_fn)
    for step in range(WARMUP_STEPS + 6):
        x, y = torch.randn(16, 3, 16, 16, device=CUDA), torch.randint(0, 10, (16,), device=CUDA)
        out = models[0](x)
        loss = loss_fn(out, y)
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        opts[0].step()
        _, graph_loss = graphed.step(x, y)
        torch.testing.assert_close(graph_loss, loss.detach(), rtol=1e-4, atol=1e-5, msg=f"step {step}")
        for s in scheds:
            s.step()
    assert graphed.graph is not None  # the later steps replayed the capture
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
