"""Per-layer facts that analyses compute and budgets, reports and targets read.

Graph metadata keys are declared here, once: analyses write them, transforms read them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

#: ``node.meta[LAYER_META]`` holds the :class:`LayerInfo` of a conv/linear ``call_module`` node.
LAYER_META = "mpqc.layer"
#: ``node.meta[ACTIVATION_META]`` holds the :class:`ActivationInfo` of an activation quantizer's ``call_module`` node
#: that feeds no layer (the layers' input quantizers are counted through their :class:`LayerInfo`).
ACTIVATION_META = "mpqc.activation"
#: ``node.meta[PRODUCT_META]`` holds the :class:`ProductInfo` of a product of two quantized activations.
PRODUCT_META = "mpqc.product"


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about one quantizable layer (conv1d/conv2d/linear), per *one* input sample.

    ``name`` is the qualified module name in the traced graph (e.g. ``"layer1.0.conv1"``).
    ``params`` counts weight elements only (what weight quantization stores); ``bias_params`` is kept apart.
    ``macs`` are multiply-accumulates for one sample; ``input_elements``/``output_elements`` are activation
    elements for one sample.
    """

    name: str
    op: str  # "conv1d" | "conv2d" | "linear" | "embedding" (a table: weight only, no MACs, no quantized input)
    weight_shape: tuple[int, ...]
    params: int
    bias_params: int
    out_channels: int
    macs: int
    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    output_shape: tuple[int, ...]
    input_elements: int
    output_elements: int

    @property
    def params_per_channel(self) -> int:
        return self.params // self.out_channels

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ActivationInfo:
    """A quantized activation that is no layer's input (a lookup table's input, a product's factor, a gate), per
    *one* input sample: budgets count its storage (``elements`` x its bits) like a layer's input.

    ``name`` is the qualified name of its quantizer (``"act_quantizers.features_3_block_2_out"``)."""

    name: str
    elements: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProductInfo:
    """A product of two quantized activations (``x * gate``, Q.K^T), per *one* input sample: BitOPs count
    ``macs`` x the bits of ``a`` x the bits of ``b`` (``a``, ``b``: the qualified names of the two factors'
    quantizers, or the name of a layer where the factor is that layer's input: the budgets' keys)."""

    name: str  # the product's graph node
    macs: int
    a: str
    b: str

    def to_dict(self) -> dict:
        return asdict(self)


#: What a budget's cost reads: layers, and the quantized activations and products that are not layers'.
CostItem = LayerInfo | ActivationInfo | ProductInfo
