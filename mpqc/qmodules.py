"""Conv/linear layers and embedding tables whose weight passes through a quantizer: the only modules
``insert_quantizers`` swaps in.

Each is a subclass of the float layer (so shape analysis and ``isinstance`` checks keep working) with one extra
submodule, ``weight_quantizer``. The forward pass is the float layer's with the fake-quantized weight (and, while
a weight quantizer prunes channels, the bias scaled by its ``channel_gate``).

After freezing, ``input_quantizer`` also references the (fixed) quantizer of the layer's input, the same module
object as ``act_quantizers.<name>`` in the graph: the bias is then rounded to the accumulator's step
``s_input * s_weight[c]``, exactly as the integer contract stores it (an int32 at that scale).

A layer whose input ``passes/shift_activations.py`` shifted by ``c`` (``u = f(x) + c``; the attribute
``input_shift = c``) computes ``W_q (u - c) + b`` = ``W_q u + b - c * W_q.sum``: the pass stored
``b' = b - c * W.sum`` (exact in fp32), and the quantized layer adds ``c * (W - W_q).sum`` back
(:meth:`shifted_bias`), so the bias is ``b - c * W_q.sum`` with the weight it is multiplied with, as the integer
program folds it at freeze time. The float ``W`` in that correction is detached: the weight's gradient is
``g (u - c)^T``, the unshifted layer's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mpqc.quantizers.base import FixedQuantizer, Quantizer, round_ste


class _QuantWeightMixin:
    weight_quantizer: Quantizer
    recompute_weight: bool = False

    @classmethod
    def from_float(cls, layer: nn.Module, weight_quantizer: Quantizer) -> nn.Module:
        """A quantized copy of ``layer`` sharing its weight and bias tensors."""
        quantized = cls.__new__(cls)
        nn.Module.__init__(quantized)
        quantized.__dict__.update({k: v for k, v in layer.__dict__.items()
                                   if not k.startswith("_") or k == "_reversed_padding_repeated_twice"})  # F.pad's
        quantized._parameters = dict(layer._parameters)
        quantized._buffers = dict(layer._buffers)
        quantized.weight_quantizer = weight_quantizer
        return quantized

    def quantized_weight(self) -> Tensor:
        if self.recompute_weight and self.training and torch.is_grad_enabled():
            return checkpoint(self.weight_quantizer, self.weight, use_reentrant=False)
        return self.weight_quantizer(self.weight)

    def shifted_bias(self, quantized_weight: Tensor | None = None) -> Tensor | None:
        """The float bias added to ``quantized_weight @ input`` (default :meth:`quantized_weight`): the layer's own,
        plus ``c * (W - W_q).sum`` over each output channel's inputs where its input is shifted by ``c``
        (``input_shift``, see the module docstring)."""
        shift = float(getattr(self, "input_shift", 0.0))
        if not shift or self.bias is None:
            return self.bias
        if quantized_weight is None:
            quantized_weight = self.quantized_weight()
        difference = (self.weight.detach() - quantized_weight).flatten(1).sum(1)
        return self.bias + shift * difference

    def quantized_bias(self, quantized_weight: Tensor | None = None) -> Tensor | None:
        """The bias as the forward pass adds it (``quantized_weight``: the weight it multiplies, default
        :meth:`quantized_weight`)."""
        bias = self.shifted_bias(quantized_weight)
        gate = self.weight_quantizer.channel_gate()
        if gate is not None and bias is not None:  # a channel on its way to 0 bits (pruned) fades out whole
            return bias * gate
        input_quantizer = self._modules.get("input_quantizer")
        if bias is None or not isinstance(input_quantizer, FixedQuantizer) or not isinstance(
            self.weight_quantizer, FixedQuantizer
        ):
            return bias
        step = input_quantizer.scale * self.weight_quantizer.scale
        return round_ste(bias / step) * step


class QuantConv1d(_QuantWeightMixin, nn.Conv1d):
    def forward(self, x: Tensor) -> Tensor:
        weight = self.quantized_weight()
        return self._conv_forward(x, weight, self.quantized_bias(weight))


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        weight = self.quantized_weight()
        return self._conv_forward(x, weight, self.quantized_bias(weight))


class QuantLinear(_QuantWeightMixin, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        weight = self.quantized_weight()
        return F.linear(x, weight, self.quantized_bias(weight))


class QuantEmbedding(_QuantWeightMixin, nn.Embedding):
    """An embedding table read through its weight quantizer (per-output-channel scales: one per row)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


QUANTIZED_LAYER_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
}


def quantized_version(layer: nn.Module, weight_quantizer: Quantizer) -> nn.Module:
    """Swap a float conv/linear for its quantized subclass (exact type match; already-quantized layers rejected)."""
    return QUANTIZED_LAYER_TYPES[type(layer)].from_float(layer, weight_quantizer)
