"""The differentiable bit-width search: train weights and quantizer parameters under a budget penalty.

Every method searches the same way; what differs is the quantizers it inserted (their ``bits()`` and
``extra_loss()``). The budget penalty is DQ's squared-ReLU term on the relative excess of the budget's cost,
computed from the quantizers' current, differentiable bit-widths.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader

from mpqc.budgets import Budget
from mpqc.config import TrainConfig
from mpqc.layers import LayerInfo
from mpqc.passes.insert_quantizers import cost_items, current_bits, quantized_activations, quantized_layers
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
