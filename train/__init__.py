"""Training, depth sweeps and dissipating-input analysis (installed as ``pnnh_kernels.train``)."""

from .trainer import TrainConfig, evaluate, load_trained_model, train

__all__ = ["TrainConfig", "evaluate", "load_trained_model", "train"]
