"""The differentiable bit-width search: train weights and quantizer parameters under a budget penalty.

Every method searches the same way; what differs is the quantizers it inserted (their ``bits()`` and
``extra_loss()``). The budget penalty is DQ's squared-ReLU term on the relative excess of the budget's cost (or a
linear one, ``TrainConfig.penalty_power=1``), computed from the quantizers' current, differentiable bit-widths.

A budget may leave a kind of quantizer no choice: weight memory at 2 bits per weight with a 2-bit floor admits
only every weight at 2 bits. :func:`floor_only_kinds` finds such kinds before the search; ``compile`` then builds
them at their floor, so the search trains the one allocation the budget admits (the uniform QAT a search would
have to end in) instead of spending its steps descending from ``init_bits`` to it.

Short of that, a search may still spend much of its compute descending from 8 bits to a tight budget.
``QuantizerConfig(weight_init_bits="budget")`` starts every searched weight at :func:`budget_start_bits`, the most
bits at which all of them meet the budget together (the uniform allocation the budget admits), so that the search
trades bits between layers from its first step.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader

from mpqc.budgets import Budget, LayerBits
from mpqc.config import TrainConfig
from mpqc.layers import LayerInfo
from mpqc.passes.insert_quantizers import (cost_items, current_bits, quantized_activations, quantized_layers,
                                          smallest_bits)
from mpqc.quantizers.base import Quantizer
from mpqc.task import Task
from mpqc.train import DEFAULT_TASK, BudgetTerm, train_phase


def search(
    gm: GraphModule,
    budget: Budget,
    layers: Sequence[LayerInfo],
    train_loader: DataLoader,
    config: TrainConfig,
    *,
    checkpoint: Path | None = None,
    seed: int = 0,
    teacher: nn.Module | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    task: Task = DEFAULT_TASK,
) -> dict[str, float]:
    """Run the search in place on ``gm`` for ``task``; resumes from ``checkpoint`` when it holds a search checkpoint."""
    quantized, activations = quantized_layers(gm), quantized_activations(gm)
    term = BudgetTerm(budget, cost_items(gm, layers), lambda: current_bits(quantized, activations))
    return train_phase(
        gm, train_loader, config, phase="search", checkpoint=checkpoint, seed=seed, budget=term, teacher=teacher,
        progress=progress, stop_after_steps=stop_after_steps, task=task,
    )


def _searchable(quantizer: Quantizer) -> bool:
    """A quantizer whose bit-width the search moves: learnable, with a range to move in."""
    return quantizer.learnable_bits and quantizer.bit_range.max_bits > quantizer.bit_range.min_bits


def floor_only_kinds(gm: GraphModule, budget: Budget) -> frozenset[str]:
    """The kinds of quantizer (``"weight"``, ``"activation"``) that ``budget`` holds at their floor: each of them
    has a bit-range to search, and raising any one of them by a bit, every other quantizer at its floor (the
    cheapest the rest can be), already breaks the budget. Costs only grow with bits, so no allocation meeting the
    budget has any of them above its floor. Empty where a layer can prune channels (a pruned channel frees budget
    for another's bits: the search has a choice).

    >>> from mpqc.budgets import WeightMemory
    >>> from mpqc.config import QuantizerConfig
    >>> from mpqc import pipeline
    >>> from mpqc.quantizers import get_method
    >>> import torch
    >>> gm, _ = pipeline.trace(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
    ...                        (torch.randn(2, 8),))
    >>> gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), (torch.randn(2, 8),))
    >>> sorted(floor_only_kinds(gm, WeightMemory(96 * 2 / 8)))   # 96 weights at 2 bits: no room
    ['weight']
    >>> sorted(floor_only_kinds(gm, WeightMemory(96 * 3 / 8)))   # room for a layer at more bits
    []
    """
    layers, activations = quantized_layers(gm), quantized_activations(gm)
    if any(layer.weight_quantizer.channel_gate() is not None for layer in layers):
        return frozenset()
    items = cost_items(gm)
    floor = smallest_bits(layers, activations)

    def fits(key: str, raised: LayerBits | torch.Tensor) -> bool:
        with torch.no_grad():
            return budget.met(float(budget.cost(items, {**floor, key: raised})))

    searched: set[str] = set()
    raisable: set[str] = set()
    for layer in layers:
        lowest: LayerBits = floor[layer.name]
        if _searchable(layer.weight_quantizer):
            searched.add("weight")
            if fits(layer.name, lowest._replace(weight=lowest.weight + 1)):
                raisable.add("weight")
        if _searchable(layer.input_quantizer):
            searched.add("activation")
            if fits(layer.name, lowest._replace(activation=lowest.activation + 1)):
                raisable.add("activation")
    for activation in activations:
        if _searchable(activation.quantizer):
            searched.add("activation")
            if fits(activation.name, floor[activation.name] + 1):
                raisable.add("activation")
    return frozenset(searched - raisable)


def budget_start_bits(gm: GraphModule, budget: Budget) -> int | None:
    """The most bits at which every searched weight quantizer of ``gm``, all at once, meets ``budget`` (the other
    quantizers at their current bit-widths, channels all kept; a budget of 3.5 bits per weight: 3): where
    ``weight_init_bits="budget"`` starts them. None where there is no searched weight quantizer or not even their
    minimum meets the budget.
    """
    layers, activations = quantized_layers(gm), quantized_activations(gm)
    searched = [layer for layer in layers if _searchable(layer.weight_quantizer)]
    if not searched:
        return None
    items = cost_items(gm)
    with torch.no_grad():
        now = {name: (bits._replace(input_kept=1.0) if isinstance(bits, LayerBits) else bits)
               for name, bits in current_bits(layers, activations).items()}
        lowest = min(layer.weight_quantizer.bit_range.min_bits for layer in searched)
        highest = max(layer.weight_quantizer.bit_range.max_bits for layer in searched)
        for bits in range(highest, lowest - 1, -1):
            trial = dict(now)
            for layer in searched:
                limits = layer.weight_quantizer.bit_range
                at = torch.tensor(float(min(max(bits, limits.min_bits), limits.max_bits)))
                trial[layer.name] = trial[layer.name]._replace(weight=at)
            if budget.met(float(budget.cost(items, trial))):
                return bits
    return None
