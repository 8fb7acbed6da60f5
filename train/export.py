"""``pnnh-train export``: a run's best checkpoint as a deployable file, reparameterized (every PNNH block as
plain layers, batch norms folded), exported (ONNX or a torch.export program), optionally quantized to int8
(onnxruntime's static quantization, calibrated on training images), and verified: the file is run on the test
set and compared with the PyTorch model it came from."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pnnh_kernels import reparameterize_model

from .checkpoint import load_checkpoint
from .data import load_dataset
from .trainer import TrainConfig, load_trained_model

FORMATS = ("onnx", "pt2")
_DEPLOY_MISSING = "exporting to ONNX needs the deploy extra: pip install 'pnnh_kernels[deploy]'"
_CALIBRATION_IMAGES = 256


def _batches(dataset: Any, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The ONNX exporter logs its every step; a CLI command prints its own summary instead."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _onnx_runner(path: str, spinning: bool = True) -> Callable[[Tensor], Tensor]:
    """``x -> the file's output`` in onnxruntime on the CPU. ``spinning=False``: its threads sleep between runs
    (two sessions timed in turn would otherwise take each other's cores while they spin)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _export_onnx(model: torch.nn.Module, example: Tensor, path: str) -> Callable[[Tensor], Tensor]:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ValueError(_DEPLOY_MISSING) from None
    with _quiet_exporter():
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(path)
    return _onnx_runner(path)


def _export_pt2(model: torch.nn.Module, example: Tensor, path: str) -> Callable[[Tensor], Tensor]:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    return lambda x: loaded(x).detach()


def _quantize_file(float_path: str, int8_path: str, calibration: list[Tensor]) -> None:
    """onnxruntime's static int8 quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on
    ``calibration`` batches. uint8 activations: with int8 ones onnxruntime's x86 CPU provider keeps every
    convolution whose output meets an addition in float32 between dequantize / quantize pairs (the fast form
    and ResNet-56 ran 2.7x and 3.2x slower, onnxruntime 1.32); with uint8 every convolution is a QLinearConv."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = _onnx_input_name(float_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter([{name: x.numpy()} for x in calibration])

        def get_next(self) -> Any:
            return next(self.remaining, None)

    with _quiet_exporter():
        quantize_static(
            float_path, int8_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
        )  # fmt: skip


def _quantize(float_path: str, int8_path: str, train_set: Any) -> Callable[[Tensor], Tensor]:
    """The int8 file calibrated on the first training images, and a runner of it."""
    images = [x for x, _ in _batches(torch.utils.data.Subset(train_set, range(_CALIBRATION_IMAGES)), 64)]
    _quantize_file(float_path, int8_path, images)
    return _onnx_runner(int8_path)


def _onnx_input_name(path: str) -> str:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].name


def _verify(reference: torch.nn.Module, run: Callable[[Tensor], Tensor], test_set: Any) -> dict:
    """The exported file against the PyTorch model on the whole test set: the largest difference of the
    outputs, and both accuracies."""
    largest, correct, correct_reference, count = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in _batches(test_set):
            want, got = reference(x), run(x)
            largest = max(largest, float((got - want).abs().max()))
            correct += int((got.argmax(1) == y).sum())
            correct_reference += int((want.argmax(1) == y).sum())
            count += int(y.numel())
    return {"largest_difference": largest, "accuracy": correct / count, "pytorch_accuracy": correct_reference / count}


def export_run(
    run_dir: str, fmt: str = "onnx", form: str = "fast", quantize: str = "none", overwrite: bool = False
) -> dict:
    """Export ``run_dir``'s best.pt; returns the file's path and what verifying it measured."""
    if quantize != "none" and fmt != "onnx":
        raise ValueError("--quantize int8 works on ONNX files (onnxruntime's quantizer): add --format onnx")
    checkpoint = os.path.join(run_dir, "best.pt")
    config = TrainConfig.from_dict(load_checkpoint(checkpoint)["config"])
    reference = load_trained_model(checkpoint)
    deployed = reparameterize_model(reference, form=form)
    bundle = load_dataset(config.dataset, config.data_root, config.image_size, config.seed)
    example = next(_batches(bundle.test, 2))[0]
    path = os.path.join(run_dir, f"model-{form}.{fmt}")
    outputs = [path] + ([path.replace(".onnx", "-int8.onnx")] if quantize == "int8" else [])
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} exists; pass --overwrite to replace it")
    run = (_export_onnx if fmt == "onnx" else _export_pt2)(deployed, example, path)
    result = {"path": os.path.abspath(path), **_verify(reference, run, bundle.test)}
    if quantize == "int8":
        quantized = _quantize(path, outputs[1], bundle.train)
        result["int8"] = {"path": os.path.abspath(outputs[1]), **_verify(reference, quantized, bundle.test)}
    return result
