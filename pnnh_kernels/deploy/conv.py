"""PNNHConv2d in eval mode as plain torch.nn layers, every batch norm folded (:func:`reparameterize_conv`).

With ``A_c``, ``A_1``, ``A_2`` the three eval-mode norms as per-channel affine maps, ``act = s * base``,
gain ``g = s * q`` (``base(v) - base(-v) = q v``) and ``D`` the decoder as a convolution:

    y = act_f(A_2(W_2 act(A_1(W_1 x)) + g D A_c(W_e x)))

- ``fast``: the fewest operations. Layer 1 is one convolution (coder and learner outputs together where
  their kernels agree), the base activation on the learner channels, layer 2 one convolution, and the
  coder path added before the output: for a 1x1 coder one 1x1 convolution of x (``D A_c W_e`` folded into
  one matrix), for a k x k coder its two convolutions (folding them into one would be wrong at the
  border, where the intermediate map's padding is zero but its bias is not).
- ``plain``: ``Conv2d -> base activation -> Conv2d`` and nothing else: layer 1 also writes the signed
  coder copies ``[A_c W_e x, -A_c W_e x]`` as extra channels and layer 2 reads them through ``[D, -D]``
  (``base(v) - base(-v) = q v``), the paper's point made literal: no addition anywhere. Cost: layer 1
  has 2 Cc more output channels and layer 2 2 Cc more input channels (and the coder's k x k taps at the
  learner's kernel size), against the fast form's coder convolution(s) and one addition.

Scales move into the layer after an activation; a final activation's scale into the layer before it
when the activation is positively homogeneous (the leaky family with a positive scale).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..block import decoder_conv_weight, pad_kernel
from ..conv import PNNHConv2d
from .folding import FoldedBlock, base_activation, conv_layer


class FastBlock(nn.Module):
    """The ``fast`` form: ``final(layer2(base(learner)) + coder path)``; see :mod:`.conv`. Also the
    folded PNNHLinear (its coder path always one ``coder_map`` of x: a linear coder is 1x1)."""

    def __init__(
        self, layer1: nn.Module, activation: nn.Module, layer2: nn.Module, final: nn.Module, *,
        coder_map: Optional[nn.Module] = None, encoder: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None, coder_channels: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.layer1, self.activation, self.layer2, self.final = layer1, activation, layer2, final
        self.coder_map, self.encoder, self.decoder = coder_map, encoder, decoder
        self.coder_channels = coder_channels  # > 0: layer 1's first channels are the coder's (joint)

    def forward(self, x: Tensor) -> Tensor:
        if self._accumulates_in_place(x):
            return self._forward_in_place(x)
        z = self.layer1(x)
        if self.coder_map is not None:  # a 1x1 coder, folded into one map of x
            return self.final(self.layer2(self.activation(z)) + self.coder_map(x))
        assert self.decoder is not None
        if self.encoder is not None:  # coder and learner kernels differ: two layer-1 convolutions
            z_c, z_l = self.encoder(x), z
        else:
            z_c, z_l = z[:, : self.coder_channels], z[:, self.coder_channels :]
        return self.final(self.layer2(self.activation(z_l)) + self.decoder(z_c))

    def _accumulates_in_place(self, x: Tensor) -> bool:
        """Eager no-grad inference on a channels_last map with a 1x1 coder: the coder path can be accumulated
        into layer 2's output by one in-place matrix product. Traced, exported or compiled calls, and anything
        autograd records, take the plain path (``torch.compile`` fuses the addition itself)."""
        return (
            isinstance(self.coder_map, nn.Conv2d)
            and type(x) is Tensor  # not a fake or traced tensor
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
        )

    def _forward_in_place(self, x: Tensor) -> Tensor:
        """``forward`` without the addition's pass over memory and its temporaries: the activations in place on
        the layers' fresh outputs, the coder map accumulated into layer 2's fresh output (a channels_last map
        is a row-major (pixels, channels) matrix, and the 1x1 coder map a matrix product on it)."""
        assert isinstance(self.coder_map, nn.Conv2d)
        out = self.layer2(_activate_in_place(self.activation, self.layer1(x)))
        if not out.is_contiguous(memory_format=torch.channels_last):  # a layout the convolution chose otherwise
            return self.final(out + self.coder_map(x))
        rows = out.permute(0, 2, 3, 1).view(-1, out.shape[1])  # a view of the channels_last storage
        rows.addmm_(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), self.coder_map.weight[:, :, 0, 0].t())
        return _activate_in_place(self.final, out)


def _activate_in_place(activation: nn.Module, fresh: Tensor) -> Tensor:
    """``activation(fresh)``, written over ``fresh`` (a tensor nothing else holds) where it is a leaky ReLU."""
    if isinstance(activation, nn.ReLU):
        return torch.relu_(fresh)
    if isinstance(activation, nn.LeakyReLU):
        return F.leaky_relu_(fresh, activation.negative_slope)
    return activation(fresh)


def _kernels(f: FoldedBlock) -> tuple[int, int]:
    """(coder, learner) kernel sizes."""
    return f.enc_w.shape[-1], f.l1_w.shape[-1]


def _fast(f: FoldedBlock) -> FastBlock:
    gain, like = f.act.coder_gain, f.like
    kc, k = _kernels(f)
    if kc == 1:
        coder = (f.dec[:, :, 0, 0] * gain) @ f.enc_w[:, :, 0, 0]
        coder_bias = (f.dec[:, :, 0, 0] * gain) @ f.enc_b
        return FastBlock(
            conv_layer(f.l1_w, f.l1_b, like), base_activation(f.act), conv_layer(f.l2_w, f.l2_b + coder_bias, like),
            f.final, coder_map=conv_layer(coder[:, :, None, None], None, like),
        )  # fmt: skip
    decoder = conv_layer(f.dec * gain, None, like)
    layer2 = conv_layer(f.l2_w, f.l2_b, like)
    if kc == k:
        layer1 = conv_layer(torch.cat([f.enc_w, f.l1_w]), torch.cat([f.enc_b, f.l1_b]), like)
        return FastBlock(
            layer1, base_activation(f.act), layer2, f.final, decoder=decoder, coder_channels=f.enc_w.shape[0]
        )
    return FastBlock(
        conv_layer(f.l1_w, f.l1_b, like), base_activation(f.act), layer2, f.final,
        encoder=conv_layer(f.enc_w, f.enc_b, like), decoder=decoder,
    )  # fmt: skip


def _plain(f: FoldedBlock) -> nn.Sequential:
    kc, k = _kernels(f)
    k1 = max(k, kc)
    enc = pad_kernel(f.enc_w, k1)
    layer1 = conv_layer(torch.cat([pad_kernel(f.l1_w, k1), enc, -enc]), torch.cat([f.l1_b, f.enc_b, -f.enc_b]), f.like)
    k2 = max(f.l2_w.shape[-1], kc)
    dec = pad_kernel(f.dec * f.act.scale, k2)  # base(v) - base(-v) = q v: with the scale, the gain
    layer2 = conv_layer(torch.cat([pad_kernel(f.l2_w, k2), dec, -dec], dim=1), f.l2_b, f.like)
    layers = [layer1, base_activation(f.act), layer2]
    return nn.Sequential(*layers, *([] if isinstance(f.final, nn.Identity) else [f.final]))


def reparameterize_conv(block: PNNHConv2d, form: str = "fast") -> nn.Module:
    """``block`` (in eval mode) as plain torch.nn layers computing the same function; see :mod:`.conv`."""
    folded = FoldedBlock(block, decoder_conv_weight(block.block_weights()))
    return _fast(folded) if form == "fast" else _plain(folded)
