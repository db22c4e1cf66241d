"""Freeze the searched bit-widths to integers that meet the budget.

Matches:    every learnable-bit quantizer of a graph that went through ``insert_quantizers``.
Rewrites to: a ``FixedQuantizer`` at an integer bit-width (the method's ``to_fixed``: same dynamic range, the
            step size of that bit-width). Already-fixed quantizers are left as they are. A weight quantizer that
            holds the weight's values itself (``Quantizer.encoded_weight``, CSQ) first writes them into the layer.
Requires:   the budget was found feasible (``Budget.check_feasible``).
Ensures:    the budget's cost at the integer bit-widths is within the limit, or :class:`InfeasibleBudgetError`;
            every layer's ``input_quantizer`` references its input's fixed quantizer (bias rounding, see qmodules).

Bit-widths are first rounded to the nearest integer inside each quantizer's bit range. If that integer
assignment exceeds the budget, bits are lowered one at a time where it costs least: each candidate step
(one quantizer, one bit down; on a cost plateau where one bit saves nothing, down to the next bit-width that
saves) is scored by the extra quantization noise it adds per unit of cost it saves, until the assignment fits.
Noise follows the uniform-noise model (a b-bit tensor of n elements ~ n * 4**-b) measured relative to the noise at
the bit-width the search settled on (b_s), n * 4**(b_s - b): a quantizer the search left well above its integer
bit-width is the last to be lowered, one that was rounded up the first. Since those steps are whole bits of whole
layers, the result can undershoot the budget; bits are then given back (never above the rounded search result)
where they remove the most noise per unit of cost, while the budget holds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.fx import GraphModule

from mpqc.budgets import Budget, LayerBits
from mpqc.errors import InfeasibleBudgetError
from mpqc.passes.insert_quantizers import (QuantizedActivation, QuantizedLayer, cost_items, quantized_activations,
                                          quantized_layers, replace_submodule)
from mpqc.quantizers import Quantizer


def integer_bits(gm: GraphModule, budget: Budget) -> dict[str, int]:
    """Integer bit-width per quantizer (qualified module name) that meets ``budget``; the graph is unchanged."""
    layers, activations = quantized_layers(gm), quantized_activations(gm)
    quantizers = _quantizers(layers, activations)
    with torch.no_grad():
        searched = {name: float(q.bits()) for name, q in quantizers.items()}
    bits = {name: _rounded(q) for name, q in quantizers.items()}
    rounded = dict(bits)
    elements = _elements(layers, activations)
    infos = cost_items(gm)

    def cost(assignment: dict[str, int]) -> float:
        return float(budget.cost(infos, _layer_bits(layers, activations, assignment)))

    current = cost(bits)
    while not budget.met(current):
        best, best_score, best_cost, best_lower = None, math.inf, current, 0
        for name, q in quantizers.items():
            if not q.learnable_bits or bits[name] <= q.bit_range.min_bits:
                continue
            lower = bits[name] - 1
            saving = current - cost(dict(bits, **{name: lower}))
            # A cost plateau (BitFusion runs 5- to 8-bit operands alike): step to the next bit-width that saves.
            floor = q.bit_range.min_bits
            if saving <= 0 and lower > floor and cost(dict(bits, **{name: floor})) < current:
                while saving <= 0 and lower > floor:
                    lower -= 1
                    saving = current - cost(dict(bits, **{name: lower}))
            if saving <= 0:
                continue
            # Noise relative to what the search settled on: lowering a layer rounded up from 2.8 to 3 bits costs
            # less than lowering one the search left at 4.3 bits.
            extra_noise = elements[name] * (4.0 ** (searched[name] - lower) - 4.0 ** (searched[name] - bits[name]))
            score = extra_noise / saving
            if score < best_score:
                best, best_score, best_cost, best_lower = name, score, current - saving, lower
        if best is None:
            raise InfeasibleBudgetError(
                f"{budget.kind} budget {budget.format(budget.limit)} cannot be met with integer bit-widths: "
                f"the smallest reachable is {budget.format(current)}"
            )
        bits[best] = best_lower
        current = best_cost
    return _fill_slack(bits, rounded, searched, elements, cost, budget)


def _fill_slack(bits, rounded, searched, elements, cost, budget: Budget) -> dict[str, int]:
    """Lowering moves in whole bits of whole layers and can overshoot: give bits back, up to the rounded search
    result, where they remove the most noise per unit of cost, while the budget still holds."""
    current = cost(bits)
    while True:
        best, best_score, best_cost = None, 0.0, current
        for name in bits:
            if bits[name] >= rounded[name]:
                continue
            trial_cost = cost(dict(bits, **{name: bits[name] + 1}))
            if not budget.met(trial_cost):
                continue
            removed_noise = elements[name] * (4.0 ** (searched[name] - bits[name]) - 4.0 ** (searched[name] - bits[name] - 1))
            score = removed_noise / max(trial_cost - current, 1e-12)
            if score > best_score:
                best, best_score, best_cost = name, score, trial_cost
        if best is None:
            return bits
        bits[best] += 1
        current = best_cost


def freeze(gm: GraphModule, budget: Budget) -> GraphModule:
    """Replace every learnable quantizer by a fixed-bit one at the bit-widths of :func:`integer_bits`."""
    bits = integer_bits(gm, budget)
    layers = quantized_layers(gm)
    activation_quantizers = {layer.input_quantizer_name: layer.input_quantizer for layer in layers}
    activation_quantizers.update({activation.name: activation.quantizer for activation in quantized_activations(gm)})
    for name, quantizer in activation_quantizers.items():  # once per tensor, even where layers share it
        if quantizer.learnable_bits:
            replace_submodule(gm, name, quantizer.to_fixed(bits[name]))
    for layer in layers:
        if layer.weight_quantizer.learnable_bits:
            encoded = layer.weight_quantizer.encoded_weight(layer.module.weight)
            if encoded is not layer.module.weight:  # the method held the weight's values itself (CSQ's bit-planes)
                with torch.no_grad():
                    layer.module.weight.copy_(encoded)
            layer.module.weight_quantizer = layer.weight_quantizer.to_fixed(bits[_weight_key(layer)], layer.module.weight)
        layer.module.input_quantizer = gm.get_submodule(layer.input_quantizer_name)
    gm.recompile()
    return gm


def _weight_key(layer: QuantizedLayer) -> str:
    return f"{layer.name}.weight_quantizer"


def _quantizers(layers: Sequence[QuantizedLayer], activations: Sequence[QuantizedActivation]) -> dict[str, Quantizer]:
    result: dict[str, Quantizer] = {}
    for layer in layers:
        result[_weight_key(layer)] = layer.weight_quantizer
        result[layer.input_quantizer_name] = layer.input_quantizer
    result.update({activation.name: activation.quantizer for activation in activations})
    return result


def _rounded(q: Quantizer) -> int:
    if not q.learnable_bits:
        return q.fixed_bits
    value = int(torch.round(q.bits().detach()).item())
    return min(max(value, q.bit_range.min_bits), q.bit_range.max_bits)


def _elements(layers: Sequence[QuantizedLayer], activations: Sequence[QuantizedActivation]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[_weight_key(layer)] = layer.info.params
        counts[layer.input_quantizer_name] = counts.get(layer.input_quantizer_name, 0) + layer.info.input_elements
    counts.update({activation.name: activation.info.elements for activation in activations})
    return counts


def _layer_bits(layers: Sequence[QuantizedLayer], activations: Sequence[QuantizedActivation],
                bits: dict[str, int]) -> dict[str, LayerBits | torch.Tensor]:
    """The budgets' view (keys as ``insert_quantizers.current_bits``) of an integer assignment."""
    result: dict[str, LayerBits | torch.Tensor] = {}
    for layer in layers:
        result[layer.name] = LayerBits(torch.tensor(float(bits[_weight_key(layer)])),
                                       torch.tensor(float(bits[layer.input_quantizer_name])))
    result.update({activation.name: torch.tensor(float(bits[activation.name])) for activation in activations})
    return result
