"""Let weight quantizers take output channels to 0 bits (pruned) on the layers whose channels can be dropped.

Matches:    every quantized layer whose output channels :func:`~mpqc.passes.prune_channels.channel_consumers`
            finds droppable (read only by plain convs / linear layers, through ReLU, pooling, quantizers or a
            flatten; not by a residual add, a concat, a grouped conv or the graph output).
Rewrites to: nothing in the graph; calls ``enable_pruning()`` on those layers' weight quantizers. Only methods
            that prune channels act on it (FracBits kernel-wise: "0 bit = pruned channel"); for the others it is
            a no-op, so running it is always safe. Where a quantizer accepts, every layer reading the channels
            gets ``node.meta[INPUT_CHANNELS_META]`` = the producing layer's name, so that budgets count the
            readers' input columns that pruning removes too (``QuantizedLayer.input_kept``).
Requires:   ``insert_quantizers`` has run.
Ensures:    a quantizer that reports pruning enabled sits on a layer ``prune_channels`` can shrink exactly;
            the graph's outputs are unchanged (pruning starts from the current bits, all >= ``min_bits``).
"""
from __future__ import annotations

from torch.fx import GraphModule

from mpqc.passes.analyze_layers import layer_nodes
from mpqc.passes.insert_quantizers import INPUT_CHANNELS_META
from mpqc.passes.prune_channels import channel_consumers


def mark_prunable(gm: GraphModule) -> GraphModule:
    for node in layer_nodes(gm):
        quantizer = getattr(gm.get_submodule(node.target), "weight_quantizer", None)
        readers = channel_consumers(gm, node) if quantizer is not None and quantizer.learnable_bits else None
        if readers is not None and quantizer.enable_pruning():
            for reader in readers:
                reader.node.meta[INPUT_CHANNELS_META] = str(node.target)
    return gm
