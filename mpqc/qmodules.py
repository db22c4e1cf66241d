"""Conv/linear layers and embedding tables whose weight passes through a quantizer: the only modules
``insert_quantizers`` swaps in.

Each is a subclass of the float layer (so shape analysis and ``isinstance`` checks keep working) with one extra
submodule, ``weight_quantizer``. The forward pass is the float layer's with the fake-quantized weight (and, while
a weight quantizer prunes channels, the bias scaled by its ``channel_gate``).

After freezing, ``input_quantizer`` also references the (fixed) quantizer of the layer's input, the same module
object as ``act_quantizers.<name>`` in the graph: the bias is then rounded to the accumulator's step
``s_input * s_weight[c]``, exactly as the integer contract stores it (an int32 at that scale).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mpqc.quantizers.base import FixedQuantizer, Quantizer, round_ste


class _QuantWeightMixin:
    weight_quantizer: Quantizer

    @classmethod
    def from_float(cls, layer: nn.Module, weight_quantizer: Quantizer) -> nn.Module:
        """A quantized copy of ``layer`` sharing its weight and bias tensors."""
        quantized = cls.__new__(cls)
        nn.Module.__init__(quantized)
        quantized.__dict__.update({k: v for k, v in layer.__dict__.items() if not k.startswith("_")})
        quantized._parameters = dict(layer._parameters)
        quantized._buffers = dict(layer._buffers)
        quantized.weight_quantizer = weight_quantizer
        return quantized

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    def quantized_bias(self) -> Tensor | None:
        gate = self.weight_quantizer.channel_gate()
        if gate is not None and self.bias is not None:  # a channel on its way to 0 bits (pruned) fades out whole
            return self.bias * gate
        input_quantizer = self._modules.get("input_quantizer")
        if self.bias is None or not isinstance(input_quantizer, FixedQuantizer) or not isinstance(
            self.weight_quantizer, FixedQuantizer
        ):
            return self.bias
        step = input_quantizer.scale * self.weight_quantizer.scale
        return round_ste(self.bias / step) * step


class QuantConv1d(_QuantWeightMixin, nn.Conv1d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QuantLinear(_QuantWeightMixin, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.quantized_bias())


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
