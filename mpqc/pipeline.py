"""The compiler's stages, in order: written once here, used by ``mpqc.compile``, ``mpqc.sweep``, ``bench/zoo.py``
and the tests' helpers.

>>> gm, layers = trace(model, (x,))                                     # doctest: +SKIP
>>> gm = quantize(gm, get_method("dq"), QuantizerConfig(), (x,))       # doctest: +SKIP

``STAGES`` names every stage of ``mpqc.compile`` in order; the functions below run the fixed runs of them that
every caller shares (``trace``: the fp32 graph and its layers; ``quantize``: learnable quantizers, pruning marks and
the unsupported-op check before any training; ``to_integer_program``: the frozen graph as an integer program).
The search, pruning, freezing, weight rounding and fine-tuning between them take the caller's budget, data and
checkpoints, so ``mpqc/compile.py`` calls them itself, in this order.
"""
from __future__ import annotations

from torch import Tensor
from torch.fx import GraphModule
from torch import nn

from mpqc.layers import LayerInfo

STAGES: tuple[str, ...] = (
    "capture",             # passes/capture.py: torch.fx, torch.export fallback
    "canonicalize",        # passes/canonicalize.py: attention decomposed, padding masks, constants folded
    "functional_layers",   # passes/functional_layers.py: F.conv2d(x, self.weight, ...) -> nn.Conv2d modules
    "fold_batchnorm",      # passes/fold_batchnorm.py
    "analyze_layers",      # passes/analyze_layers.py: params, MACs, activation sizes per layer
    "shift_activations",   # passes/shift_activations.py: GELU & co. + c >= 0 (unsigned codes), -c into the biases
    "insert_quantizers",   # passes/insert_quantizers.py: learnable-bit quantizers
    "mark_prunable",       # passes/mark_prunable.py: 0 bits = a pruned channel
    "check_supported",     # passes/to_integer_program.py: unsupported ops refused, all listed
    "search",              # mpqc/search.py: differentiable, budget-penalised
    "prune_channels",      # passes/prune_channels.py: drop 0-bit channels
    "freeze",              # passes/freeze.py: integer bits meeting the budget
    "round_weights",       # passes/round_weights.py: scales and rounding fitted to those bits (MSE, GPTQ)
    "allocate_table_rows", # passes/allocate_table_rows.py: embedding rows' bits by reads (table_rows="frequency")
    "finetune",            # mpqc/train.py: bits fixed
    "to_integer_program",  # passes/to_integer_program.py: the integer model
)

TRACE_STAGES = STAGES[:STAGES.index("analyze_layers") + 1]
QUANTIZE_STAGES = STAGES[len(TRACE_STAGES):STAGES.index("check_supported") + 1]


def trace(model: nn.Module, example_inputs: tuple[Tensor, ...] | dict[str, Tensor]
          ) -> tuple[GraphModule, list[LayerInfo]]:
    """``capture`` -> ``canonicalize`` -> ``functional_layers`` -> ``fold_batchnorm`` -> ``analyze_layers``: the
    fp32 graph and its layers (``example_inputs`` positional, or keyword inputs by name)."""
    from mpqc.passes.analyze_layers import analyze_layers
    from mpqc.passes.canonicalize import canonicalize
    from mpqc.passes.capture import capture
    from mpqc.passes.fold_batchnorm import fold_batchnorm
    from mpqc.passes.functional_layers import functional_layers

    gm = fold_batchnorm(functional_layers(canonicalize(capture(model, example_inputs))))
    return gm, analyze_layers(gm, positional_inputs(gm, example_inputs))


def positional_inputs(gm: GraphModule, example_inputs: tuple | dict[str, Tensor]) -> tuple:
    """Keyword example inputs as the captured graph takes them: positionally, in its inputs' order."""
    if not isinstance(example_inputs, dict):
        return example_inputs
    return tuple(example_inputs[str(node.target)] for node in gm.graph.nodes if node.op == "placeholder")


def quantize(gm: GraphModule, method, config, calibration_inputs: tuple[Tensor, ...]) -> GraphModule:
    """``shift_activations`` (where ``config.shift_activations``) -> ``insert_quantizers`` -> ``mark_prunable`` ->
    ``check_supported``: the graph with learnable-bit quantizers, refused (every unsupported node listed at once)
    before any training if the integer program cannot express it."""
    from mpqc.passes.insert_quantizers import insert_quantizers
    from mpqc.passes.mark_prunable import mark_prunable
    from mpqc.passes.shift_activations import shift_activations
    from mpqc.passes.to_integer_program import check_supported

    if config.shift_activations:
        gm = shift_activations(gm)
    gm = mark_prunable(insert_quantizers(gm, method, config, calibration_inputs))
    check_supported(gm)
    return gm


def to_integer_program(gm: GraphModule):
    """The frozen graph as an :class:`~mpqc.reference.IntegerProgram`."""
    from mpqc.passes.to_integer_program import to_integer_program as build

    return build(gm)
