"""Remove the output channels the search took below ``min_bits`` toward 0 bits, from their layer and from the layers
that read them.

Matches:    every quantized layer whose weight quantizer prunes channels (``channel_gate()`` is not None: FracBits
            kernel-wise on a layer ``mark_prunable`` found droppable) and has channels below ``min_bits``
            (gate ``b / min_bits`` < 1).
Rounds:     per layer, not per channel, so that the frozen layer costs what the searched one did: every channel
            at ``min_bits`` or more stays, and of the channels below, the ``round(sum of their gates)`` with the
            largest gates stay (:func:`channels_to_keep`). A channel at ``b < min_bits`` costs ``b`` bits per
            weight in the search, so ``n`` channels at gate 0.3 cost what ``0.3 n`` channels at ``min_bits``
            cost; rounding each channel to its nearest end instead would remove all of them, and a search that
            drives a whole layer below ``min_bits`` (as a strong budget penalty does) would lose that layer.
            FracBits kernel-wise moves its gates to this same decision over the search's second half, so after a
            whole search they are 0 or 1 already and this keeps and removes channels as they are.
Rewrites to: the layer without the other channels (weight rows, bias entries, the quantizer's per-channel bits),
            each kept channel's gate folded into its weight row and bias (its bits go to ``min_bits``, gate 1),
            and every layer reading them (:func:`channel_consumers`) without the matching input channels (weight
            columns; after a flatten, the block of columns each channel became). ``analyze_layers`` then runs
            again, so every ``LayerInfo`` (params, MACs, shapes) describes the smaller layers and every budget,
            the report and the lowered code count what is left.
            Given the budget, more channels go (fewest searched bits first) until the budget fits with every
            learnable quantizer at its minimum bits, so that ``freeze`` can meet it.
Requires:   ``insert_quantizers`` and ``mark_prunable`` have run; the search is over.
Ensures:    at least one channel stays per layer. Every kept channel outputs what it did: its learned per-channel
            weight scale is multiplied by the gate folded into its row, so ``Q(g w) = g Q(w)`` for the folded gate
            ``g``. A removed channel at exactly 0 bits output exactly 0 (its weight and bias were scaled by its
            gate, 0) and every op between it and its readers keeps 0 at 0, so removing it leaves the graph's
            output unchanged (tested); the readers' per-channel scales are learned parameters, which removing a
            column leaves as they were. A removed channel at
            ``0 < b < min_bits`` still contributed ``(b / min_bits) Q_min``: removing it is the same kind of
            rounding as freezing the bits, and its mean over the calibration inputs goes into the bias of each
            reader that has one (for a linear reader the output's mean over those inputs is unchanged, tested;
            a conv reader sums its kernel, exact away from the zero-padded borders).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.fx import GraphModule, Node

from mpqc import ops
from mpqc.budgets import Budget
from mpqc.errors import InfeasibleBudgetError, MpqcError
from mpqc.layers import LayerInfo
from mpqc.passes.analyze_layers import analyze_layers, layer_nodes
from mpqc.passes.insert_quantizers import cost_items, quantized_activations, quantized_layers, smallest_bits
from mpqc.quantizers.base import channels_to_keep


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


def prune_channels(gm: GraphModule, example_inputs: tuple, budget: Budget | None = None,
                   calibration_inputs: tuple | None = None) -> GraphModule:
    """Drop every channel at 0 bits (see the module docstring); returns ``gm`` with its layer infos refreshed.

    With a ``budget``, also make sure that freezing can meet it: while the budget's cost with every learnable
    quantizer at its minimum bits is over the limit, the kept channel with the fewest searched bits goes too
    (:class:`InfeasibleBudgetError` if every prunable layer is down to one channel and it still does not fit).
    A removed channel that still output something (``0 < b < min_bits``) is replaced by its mean over
    ``calibration_inputs`` (default: ``example_inputs``) in the bias of each reader that has one.
    """
    layers = quantized_layers(gm)
    nodes = {str(node.target): node for node in layer_nodes(gm)}
    gates = {layer.name: layer.weight_quantizer.channel_gate() for layer in layers}
    gates = {name: gate.detach() for name, gate in gates.items() if gate is not None}
    keep = {name: channels_to_keep(gate) for name, gate in gates.items()}
    if budget is not None and keep:
        _prune_to_fit(gm, layers, keep, budget)
    pruned = [layer for layer in layers
              if layer.name in keep and not bool(keep[layer.name].all() and (gates[layer.name] == 1).all())]
    readers = {layer.name: channel_consumers(gm, nodes[layer.name]) for layer in pruned}
    for name, channel_readers in readers.items():
        if channel_readers is None:
            raise MpqcError(f"layer {name!r} prunes channels but its output channels cannot be dropped "
                            "(mark_prunable enables pruning only where they can)")
    input_means = _input_means(gm, [str(reader.node.target) for group in readers.values() for reader in group],
                               calibration_inputs or example_inputs)
    kept = {layer.name: torch.nonzero(keep[layer.name]).flatten() for layer in pruned}
    for layer in pruned:  # first every layer's own channels (a reader may prune its own outputs too) ...
        _drop_outputs(layer.module, kept[layer.name])
        _scale_outputs(layer.module, gates[layer.name][kept[layer.name]])
        layer.weight_quantizer.keep_channels_(kept[layer.name])
    for layer in pruned:  # ... then the readers' columns, their weights now ungated (gates folded, all 1)
        for reader in readers[layer.name]:
            name = str(reader.node.target)
            columns = (kept[layer.name][:, None] * reader.per_channel + torch.arange(reader.per_channel)).flatten()
            _add_removed_means_to_bias(gm.get_submodule(name), columns, input_means[name])
            _drop_inputs(gm.get_submodule(name), columns, name)
    analyze_layers(gm, example_inputs)
    gm.recompile()
    return gm


def _input_means(gm: GraphModule, names: list[str], inputs: tuple) -> dict[str, torch.Tensor]:
    """Mean of each named layer's input over ``inputs``, per input column (conv: per channel); no forward pass
    when there are no names."""
    means: dict[str, torch.Tensor] = {}
    if not names:
        return means
    hooks = [gm.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: means.__setitem__(
            name, args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).mean(1)))
        for name in names]
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return means


def _add_removed_means_to_bias(module: nn.Module, kept_columns: torch.Tensor, means: torch.Tensor) -> None:
    """Add to ``module``'s bias what its input columns outside ``kept_columns`` contribute at their ``means``."""
    if module.bias is None:
        return
    removed = torch.ones(means.numel(), dtype=torch.bool)
    removed[kept_columns] = False
    with torch.no_grad():
        weight = module.quantized_weight().detach()
        if weight.dim() > 2:  # a conv: a constant input map contributes the sum of the kernel (borders aside)
            weight = weight.flatten(2).sum(2)
        module.bias.add_(weight[:, removed] @ means[removed])


def pruned_infos(gm: GraphModule, kept_channels: Mapping[str, int]) -> list[LayerInfo]:
    """The layer infos (graph order) the layers would have with ``kept_channels[name]`` output channels kept in
    the named prunable layers, their readers shrunk to match: what ``prune_channels`` followed by
    ``analyze_layers`` reports (tested), computed without touching the graph."""
    layers = quantized_layers(gm)
    nodes = {str(node.target): node for node in layer_nodes(gm)}
    infos = {layer.name: layer.info for layer in layers}
    out_fraction: dict[str, float] = {}
    in_fraction: dict[str, float] = {}
    for name, count in kept_channels.items():
        readers = channel_consumers(gm, nodes[name])
        if readers is None or not 1 <= count <= infos[name].out_channels:
            raise MpqcError(f"layer {name!r} cannot keep {count} of its {infos[name].out_channels} channels")
        out_fraction[name] = count / infos[name].out_channels
        for reader in readers:
            in_fraction[str(reader.node.target)] = out_fraction[name]
    return [_shrunk(layer.info, out_fraction.get(layer.name, 1.0), in_fraction.get(layer.name, 1.0))
            for layer in layers]


#: How close to 0 or 1 a gate must be to count as decided (:func:`gate_decisions`).
DECIDED = 0.01


def gate_decisions(gate: torch.Tensor) -> dict[str, int]:
    """How many of a layer's channel gates the search left off (< 0.01), on (> 0.99) or undecided between: the
    undecided ones are what pruning changes (a kept channel's gate is folded into it, a removed one's output
    replaced by its mean), the decided ones it keeps or removes as they are."""
    gate = gate.detach()
    off, on = int((gate < DECIDED).sum()), int((gate > 1 - DECIDED).sum())
    return {"off": off, "on": on, "undecided": gate.numel() - off - on}


def fewest_channels(gm: GraphModule) -> list[LayerInfo]:
    """The layer infos with every layer whose quantizer prunes channels down to one channel: with every learnable
    quantizer at its minimum bits, the smallest cost the search space reaches (``Budget.check_feasible``)."""
    prunable = {layer.name: 1 for layer in quantized_layers(gm) if layer.weight_quantizer.channel_gate() is not None}
    return pruned_infos(gm, prunable)


def _prune_to_fit(gm: GraphModule, layers: list, keep: dict[str, torch.Tensor], budget: Budget) -> None:
    """Prune the kept channels with the fewest searched bits, one at a time, until the budget fits at min bits."""
    floor = smallest_bits(layers, quantized_activations(gm))
    searched = {name: gm.get_submodule(name).weight_quantizer.channel_bits().detach() for name in keep}

    def cost() -> float:
        kept = {name: int(mask.sum()) for name, mask in keep.items()}
        return float(budget.cost(cost_items(gm, pruned_infos(gm, kept)), floor))

    current = cost()
    while not budget.met(current):
        candidates = [(float(searched[name][c]), index, name, int(c)) for index, name in enumerate(keep)
                      if keep[name].sum() > 1 for c in torch.nonzero(keep[name]).flatten()]
        if not candidates:
            raise InfeasibleBudgetError(
                f"{budget.kind} budget {budget.format(budget.limit)} cannot be met: with every prunable layer down "
                f"to one channel and every quantizer at its minimum bits the cost is {budget.format(current)}")
        _, _, name, channel = min(candidates)
        keep[name][channel] = False
        current = cost()


def _shrunk(info: LayerInfo, out_fraction: float, in_fraction: float) -> LayerInfo:
    if out_fraction == 1.0 and in_fraction == 1.0:
        return info
    weight_shape = (round(info.weight_shape[0] * out_fraction), round(info.weight_shape[1] * in_fraction),
                    *info.weight_shape[2:])
    input_shape = (round(info.input_shape[0] * in_fraction), *info.input_shape[1:])
    output_shape = (round(info.output_shape[0] * out_fraction), *info.output_shape[1:])
    return replace(
        info, weight_shape=weight_shape, params=math.prod(weight_shape),
        bias_params=weight_shape[0] if info.bias_params else 0, out_channels=weight_shape[0],
        macs=round(info.macs * out_fraction * in_fraction), input_shape=input_shape, output_shape=output_shape,
        input_elements=math.prod(input_shape), output_elements=math.prod(output_shape),
    )


def _scale_outputs(module: nn.Module, factors: torch.Tensor) -> None:
    """Multiply each output channel's weight row and bias by its factor."""
    with torch.no_grad():
        module.weight.mul_(factors.reshape([-1] + [1] * (module.weight.dim() - 1)))
        if module.bias is not None:
            module.bias.mul_(factors)


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
    """Maps 0 to 0 element by element and keeps the channel dimension (``keeps_zero`` in the op registry: max
    pooling of an all-zero channel is 0 since padding never wins a max against 0; mpqc quantizers are symmetric,
    zero point 0)."""
    return ops.keeps_zero(gm, node)


def _is_elementwise(gm: GraphModule, node: Node) -> bool:
    """Zero-preserving ops that also work on flattened features (no pooling)."""
    return ops.has_property(gm, node, "elementwise")


def _is_flatten(gm: GraphModule, node: Node) -> bool:
    """``flatten(x, 1)`` (or ``nn.Flatten()``, ``x.view(x.size(0), -1)``): every dimension after the batch into one."""
    flatten = ops.op_named("flatten")
    if ops.op_of(gm, node) is not flatten:
        return False
    try:
        return flatten.start_dim(gm, node) == 1
    except ops.Unsupported:
        return False
