"""A trained PNNH net as standard operators: every block reparameterized into plain torch.nn layers with its
batch norms folded (:func:`reparameterize_model`), for export (torch.export, ONNX) and inference runtimes
that should never see a custom op."""

from .conv import reparameterize_conv
from .folding import CannotFold
from .linear import reparameterize_linear
from .model import FORMS, reparameterize_model

__all__ = ["FORMS", "CannotFold", "reparameterize_conv", "reparameterize_linear", "reparameterize_model"]
