"""The ``mpqc-report/1`` dict of a compiled model (its format, printing and plots are ``mpqc/report.py``'s): the
budget as met, the totals, the accuracy, each layer's frozen and searched bits, and the cost models' cycles."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import torch

from mpqc.budgets import ActivationMemory, AverageBits, BitOps, Budget, LayerBits, Latency, WeightMemory
from mpqc.layers import CostItem, LayerInfo
from mpqc.reference import IntegerProgram
from mpqc.report import REPORT_FORMAT


def build_report(
    *, model_name: str, method: str, budget: Budget, layers: Sequence[LayerInfo], program: IntegerProgram,
    searched_bits: dict[str, tuple[float, float]], fixed_layers: set[str], search_cost: float, smallest_cost: float,
    accuracy: dict[str, float | None], wall_time: dict[str, float],
    unpruned_layers: Sequence[LayerInfo] | None = None, metric: dict[str, Any] | None = None,
    activations: Sequence[CostItem] = (), searched_gates: dict[str, dict[str, int]] | None = None,
    floor_only: Iterable[str] = (), weight_start_bits: int | None = None,
) -> dict[str, Any]:
    """The ``mpqc-report/1`` dict (see ``mpqc/report.py``) of a frozen program; ``layers`` describe the layers as
    frozen, ``unpruned_layers`` (default: the same) as they were before channel pruning; ``activations`` the
    quantized activations and products that are not layers (``insert_quantizers.cost_items``), which the budgets
    count too; ``searched_gates`` the channel gates of the layers that could prune, as the search left them
    (``prune_channels.gate_decisions``); ``floor_only`` the kinds of quantizer the budget held at their floor
    (:func:`mpqc.search.floor_only_kinds`); ``weight_start_bits`` where ``weight_init_bits="budget"`` started the
    searched weights (:func:`mpqc.search.budget_start_bits`)."""
    searched_gates = searched_gates or {}
    unpruned_layers = unpruned_layers or layers
    pruned_channels = {old.name: old.out_channels - new.out_channels for old, new in zip(unpruned_layers, layers)}
    frozen = program.layer_bits()
    row_bits = {node.attrs["module"]: node.attrs["row_bits"] for node in program.nodes if "row_bits" in node.attrs}
    integer: dict[str, LayerBits | torch.Tensor] = {
        node.attrs["module"]: torch.tensor(float(node.attrs["bits"])) for node in program.nodes if node.op == "quantize"}
    integer.update({name: LayerBits(torch.tensor(float(w)), torch.tensor(float(a))) for name, (w, a) in frozen.items()})
    items = [*layers, *activations]
    achieved = float(budget.cost(items, integer))
    predicted_ms = budget.per_layer(layers, integer).tolist() if isinstance(budget, Latency) else None
    params = sum(layer.params for layer in layers)
    elements = sum(layer.input_elements for layer in layers)
    return {
        "format": REPORT_FORMAT,
        "model": model_name,
        "method": method,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "budget": {"kind": budget.kind, "text": budget.text, "limit": budget.limit, "unit": budget.unit,
                   "achieved": achieved, "search_final": search_cost, "smallest_feasible": smallest_cost,
                   "met": budget.met(achieved), **({"floor_only": sorted(floor_only)} if floor_only else {}),
                   **({"weight_start_bits": weight_start_bits} if weight_start_bits is not None else {}),
                   **({"between_layers_ms": budget.between_layers_ms} if isinstance(budget, Latency) else {})},
        "totals": {
            "params": params,
            "macs": sum(layer.macs for layer in layers),
            "pruned_channels": sum(pruned_channels.values()),
            **({"undecided_channels": sum(gates["undecided"] for gates in searched_gates.values())}
               if searched_gates else {}),
            "weight_bytes": float(WeightMemory(1).cost(layers, integer)),
            "fp32_weight_bytes": 4.0 * sum(layer.params for layer in unpruned_layers),
            "activation_bytes_max": float(ActivationMemory(1).cost(items, integer)),
            "activation_bytes_sum": float(ActivationMemory(1, mode="sum").cost(items, integer)),
            "bitops": float(BitOps(1).cost(items, integer)),
            "average_weight_bits": float(AverageBits(1).cost(layers, integer)),
            "average_activation_bits": sum(layer.input_elements * frozen[layer.name][1] for layer in layers) / elements,
        },
        "accuracy": accuracy,
        **({"metric": metric} if metric is not None else {}),
        "layers": [
            {**{key: getattr(layer, key) for key in ("name", "op", "params", "macs", "input_elements",
                                                      "output_elements", "out_channels", "bias_params")},
             **{key: list(getattr(layer, key)) for key in ("weight_shape", "input_shape", "output_shape")},
             "weight_bits": frozen[layer.name][0], "activation_bits": frozen[layer.name][1],
             "weight_bits_search": searched_bits[layer.name][0],
             "activation_bits_search": searched_bits[layer.name][1],
             "fixed": layer.name in fixed_layers, "pruned_channels": pruned_channels.get(layer.name, 0),
             **({"channel_gates_search": searched_gates[layer.name]} if layer.name in searched_gates else {}),
             **({"row_bits": row_bits[layer.name]} if layer.name in row_bits else {}),
             **({} if predicted_ms is None else {"predicted_ms": predicted_ms[i]})}
            for i, layer in enumerate(layers)
        ],
        "wall_time_s": wall_time,
        **_cost_section(budget, layers, frozen),
    }


def _cost_section(budget: Budget, layers: Sequence[LayerInfo], frozen: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """``{"cost": {model: ...}}``: modelled accelerator cycles per layer (``mpqc.targets.fpga.cost_report``) for
    every registered cost model, so the report and its plot show them whatever the budget was. Embedding tables
    (gathers, no GEMM) are not in the cost models."""
    from mpqc.targets.fpga import COST_MODELS, cost_report

    gemms = [layer for layer in layers if layer.op != "embedding"]
    return {"cost": {name: cost_report(gemms, frozen, name) for name in COST_MODELS}}
