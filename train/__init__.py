"""Training, depth sweeps and dissipating-input analysis (installed as ``pnnh_kernels.train``)."""

from .trainer import TrainConfig, evaluate, train

__all__ = ["TrainConfig", "evaluate", "train"]
