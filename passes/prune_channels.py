"""Remove the output channels the search took to 0 bits, from their layer and from the layers that read them.

Matches:    every quantized layer whose weight quantizer prunes channels (``channel_gate()`` is not None: FracBits
            kernel-wise on a layer ``mark_prunable`` found droppable) and has channels whose bits round to 0,
            i.e. lie nearer to 0 than to ``min_bits`` (gate < 0.5).
Rewrites to: the layer without those output channels (weight rows, bias entries, the quantizer's per-channel
            bits), and every layer reading them (:func:`channel_consumers`) without the matching input channels
            (weight columns; after a flatten, the block of columns each channel became). ``analyze_layers`` then
            runs again, so every ``LayerInfo`` (params, MACs, shapes) describes the smaller layers and every
            budget, the report and the lowered code count what is left.
Requires:   ``insert_quantizers`` and ``mark_prunable`` have run; the search is over.
Ensures:    at least one channel stays per layer. A channel at exactly 0 bits outputs exactly 0 (its weight and its
            bias are scaled by its gate, 0) and every op between it and its readers keeps 0 at 0, so removing it
            leaves the graph's output unchanged (tested), with one exception by design: a reader whose
            per-channel weight scale follows its row's largest weight (the learned-range quantizers do) and whose
            largest weight was on a removed column gets a finer grid for that row, as the dead column no longer
            counts. A channel pruned at 0 < bits < min_bits/2 still contributed ``gate * Q_min``: removing it is
            the same kind of rounding as freezing the bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from mpqc import ops
from mpqc.errors import MpqcError
from mpqc.passes.analyze_layers import analyze_layers, layer_nodes
from mpqc.passes.insert_quantizers import quantized_layers
from mpqc.quantizers import Quantizer

#: Modules that map 0 to 0 element by element and keep the channel dimension (max pooling of an all-zero channel
#: is 0 since padding never wins a max against 0; mpqc quantizers are symmetric, zero point 0).
ZERO_PRESERVING_MODULES = (Quantizer, nn.ReLU, nn.ReLU6, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)
ZERO_PRESERVING_FUNCTIONS = (ops.RELU_FUNCTIONS | ops.RELU6_FUNCTIONS | ops.MAX_POOL_FUNCTIONS
                             | ops.GLOBAL_AVG_POOL_FUNCTIONS | {torch.nn.functional.avg_pool2d,
                                                                torch.nn.functional.dropout})


@dataclass(frozen=True)
class ChannelReader:
    """A layer reading a producer's output channels: channel ``c`` is its input columns
    ``c * per_channel .. (c + 1) * per_channel - 1`` (``per_channel`` > 1 after a flatten of a feature map)."""

    node: Node
    per_channel: int


def channel_consumers(gm: GraphModule, layer: Node) -> list[ChannelReader] | None:
    """The layers that read ``layer``'s output channels, if every path from its output reaches them only through
    zero-preserving, channel-keeping ops (ReLU, ReLU6, quantizers, pooling, dropout, a flatten) and every reader
    is a plain (``groups=1``) conv or a linear layer taking the tensor as its input; None otherwise (a residual
    add, a concat, the graph output, a grouped conv: dropping a channel there would change the result)."""
    if _groups(gm.get_submodule(layer.target)) != 1:
        return None
    layers = set(layer_nodes(gm))
    readers: list[ChannelReader] = []
    pending: list[tuple[Node, int]] = [(layer, 1)]
    while pending:
        node, per_channel = pending.pop()
        for user in node.users:
            if user in layers:
                module = gm.get_submodule(user.target)
                if user.args[0] is not node or _groups(module) != 1 or (
                    per_channel > 1 and not isinstance(module, nn.Linear)
                ):
                    return None
                readers.append(ChannelReader(user, per_channel))
            elif _keeps_zero(gm, user) and user.args[0] is node and per_channel == 1:
                pending.append((user, 1))
            elif _is_flatten(gm, user) and per_channel == 1:
                shape = user.args[0].meta.get("tensor_meta")
                if not hasattr(shape, "shape") or len(shape.shape) < 2:
                    return None
                pending.append((user, math.prod(shape.shape[2:])))
            elif _keeps_zero(gm, user) and user.args[0] is node and _is_elementwise(gm, user):
                pending.append((user, per_channel))
            else:
                return None
    return readers or None


def prune_channels(gm: GraphModule, example_inputs: tuple) -> GraphModule:
    """Drop every channel at 0 bits (see the module docstring); returns ``gm`` with its layer infos refreshed."""
    for layer in quantized_layers(gm):
        gate = layer.weight_quantizer.channel_gate()
        if gate is None:
            continue
        keep = torch.nonzero(gate.detach() >= 0.5).flatten()
        if keep.numel() == 0:  # never remove a whole layer: keep its strongest channel
            keep = gate.detach().argmax().reshape(1)
        if keep.numel() == gate.numel():
            continue
        node = next(n for n in layer_nodes(gm) if n.target == layer.name)
        readers = channel_consumers(gm, node)
        if readers is None:
            raise MpqcError(f"layer {layer.name!r} prunes channels but its output channels cannot be dropped "
                            "(mark_prunable enables pruning only where they can)")
        _drop_outputs(layer.module, keep)
        layer.weight_quantizer.keep_channels_(keep)
        for reader in readers:
            columns = (keep[:, None] * reader.per_channel + torch.arange(reader.per_channel)).flatten()
            _drop_inputs(gm.get_submodule(reader.node.target), columns, str(reader.node.target))
    analyze_layers(gm, example_inputs)
    gm.recompile()
    return gm


def _drop_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight = nn.Parameter(module.weight[keep].clone())
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias[keep].clone())
    if isinstance(module, nn.Linear):
        module.out_features = len(keep)
    else:
        module.out_channels = len(keep)


def _drop_inputs(module: nn.Module, columns: torch.Tensor, name: str) -> None:
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None and quantizer.encoded_weight(module.weight) is not module.weight:
        raise MpqcError(f"layer {name!r} holds its weight in its quantizer ({type(quantizer).__name__}); "
                        "its input channels cannot be pruned")
    with torch.no_grad():
        module.weight = nn.Parameter(module.weight[:, columns].clone())
    if isinstance(module, nn.Linear):
        module.in_features = len(columns)
    else:
        module.in_channels = len(columns)


def _groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def _keeps_zero(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Hardtanh):
            return module.min_val <= 0 <= module.max_val
        return isinstance(module, ZERO_PRESERVING_MODULES)
    if node.op == "call_method":
        return node.target == "relu"
    return ops.is_call(node, ZERO_PRESERVING_FUNCTIONS)


def _is_elementwise(gm: GraphModule, node: Node) -> bool:
    """Zero-preserving ops that also work on flattened features (no pooling)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, (Quantizer, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Dropout, nn.Identity))
    return node.op == "call_method" or ops.is_call(node, ops.RELU_FUNCTIONS | ops.RELU6_FUNCTIONS)


def _is_flatten(gm: GraphModule, node: Node) -> bool:
    """``flatten(x, 1)`` (or ``nn.Flatten()``): every dimension after the batch into one."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    if ops.is_call(node, ops.FLATTEN_FUNCTIONS) or (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False
