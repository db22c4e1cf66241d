"""Per-layer facts that analyses compute and budgets, reports and targets read.

Graph metadata keys are declared here, once: analyses write them, transforms read them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

#: ``node.meta[LAYER_META]`` holds the :class:`LayerInfo` of a conv/linear ``call_module`` node.
LAYER_META = "mpqc.layer"


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
