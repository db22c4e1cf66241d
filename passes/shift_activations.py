"""Shift a bounded-below activation's output to be nonnegative, and fold the shift into its consumers' biases.

The integer contract is symmetric (zero point 0). A GELU output (-0.17 .. +25 in MiniLM's FFN) quantized signed
spends half its codes on a negative range it never reaches; ``u = f(x) + c`` with ``c = -lower_bound(f)`` is
nonnegative, so ``insert_quantizers`` gives it an unsigned quantizer: 2^b - 1 steps over [0, max + c] instead of
2^(b-1) - 1 over [-max, max], about half the step at the same bits (a zero point, without one). Its consumer takes
the shift back: ``W (u - c) + b = W u + (b - c * W.sum)``.

Matches:    a lookup activation (``mpqc/ops/lookup.py``) whose function records a ``lower_bound`` < 0 (GELU, both
            forms, SiLU, hardswish, Mish, ELU with alpha > 0) and whose every user is a ``nn.Linear``, or a
            ``nn.Conv1d``/``nn.Conv2d`` with a 1x1 kernel and no padding (a zero-padded border of a shifted input
            would read ``-c``), reading it as its input, each layer's module called by that node only.
Rewrites to: the activation -> ``shifted_activations.<name>`` = :class:`~mpqc.ops.lookup.ShiftedActivation`
            (``f(x) + c``, the same lookup op with a ``shift`` parameter: its table holds ``f + c``); each
            consumer's bias ``b -> b - c * W.sum`` (over each output channel's inputs; a bias created where there
            was none) and ``layer.input_shift = c``, from which the quantized layer adds ``c * (W - W_q).sum``
            back (``mpqc.qmodules``): the bias the fake-quant forward adds is ``b - c * W_q.sum``, as the integer
            program folds it at freeze time from its integer weight.
Requires:   ``fold_batchnorm`` has run (a consumer's weight is final); before ``insert_quantizers``.
Ensures:    the fp32 graph computes what it computed (to fp32 rounding, tested); every shifted activation is
            nonnegative by construction (``ops.is_nonnegative``), so its quantizer is unsigned. Everything else
            (an activation also feeding a residual add, a padded conv, an attention matmul) is left alone.
            Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from mpqc import ops
from mpqc.ops.lookup import FUNCTIONS, SHIFT, ShiftedActivation, function_of, shifted_lower_bound

#: Root submodule (an ``nn.ModuleDict``) holding the shifted activations.
SHIFTED_ACTIVATIONS = "shifted_activations"


def shift_activations(gm: GraphModule) -> GraphModule:
    """Shift every matching activation (see the module docstring); returns ``gm``."""
    modified = False
    for node in list(gm.graph.nodes):
        shift = _shift(gm, node)
        consumers = _consumers(gm, node) if shift is not None else None
        if not consumers:
            continue
        function, params = function_of(gm, node)
        if not hasattr(gm, SHIFTED_ACTIVATIONS):
            gm.add_submodule(SHIFTED_ACTIVATIONS, nn.ModuleDict())
        gm.get_submodule(SHIFTED_ACTIVATIONS)[node.name] = ShiftedActivation(function, params, shift)
        with gm.graph.inserting_after(node):
            shifted = gm.graph.call_module(f"{SHIFTED_ACTIVATIONS}.{node.name}", (node.args[0],))
        shifted.meta = dict(node.meta)  # shapes (``analyze_layers``' tensor_meta) are the activation's
        node.replace_all_uses_with(shifted)
        gm.graph.erase_node(node)
        if node.op == "call_module" and not any(n.op == "call_module" and n.target == node.target
                                                for n in gm.graph.nodes):
            gm.delete_submodule(node.target)
        for layer in consumers:
            _fold_shift(layer, shift)
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return gm


def _shift(gm: GraphModule, node: Node) -> float | None:
    """``-lower_bound`` of the activation ``node`` computes, where it is an unshifted lookup function bounded below
    by a negative number; else None."""
    if ops.op_of(gm, node) is not ops.op_named("lookup") or not node.args or not isinstance(node.args[0], Node):
        return None
    try:
        function, params = function_of(gm, node)
    except (ops.Unsupported, KeyError):
        return None
    if SHIFT in params or FUNCTIONS[function].nonnegative:
        return None
    bound = shifted_lower_bound(function, params)
    return None if bound is None or bound >= 0 else -bound


def _consumers(gm: GraphModule, node: Node) -> list[nn.Module] | None:
    """The layer modules reading ``node`` where every user is one that may take a shifted input, else None."""
    layers = []
    for user in node.users:
        if user.op != "call_module" or user.args[:1] != (node,) or node in user.args[1:] or user.kwargs:
            return None
        module = gm.get_submodule(user.target)
        if not _takes_shift(module) or sum(n.op == "call_module" and n.target == user.target
                                           for n in gm.graph.nodes) != 1:
            return None
        layers.append(module)
    return layers


def _takes_shift(module: nn.Module) -> bool:
    """A float linear, or a 1x1 conv without padding (every output reads each input position the same way)."""
    if type(module) is nn.Linear:
        return True
    if type(module) not in (nn.Conv1d, nn.Conv2d):
        return False
    unpadded = module.padding == "valid" or (not isinstance(module.padding, str) and not any(module.padding))
    return unpadded and all(k == 1 for k in module.kernel_size)


@torch.no_grad()
def _fold_shift(layer: nn.Module, shift: float) -> None:
    """``b -> b - c * W.sum`` over each output channel's inputs, and ``layer.input_shift = c``."""
    correction = shift * layer.weight.detach().flatten(1).sum(1)
    if layer.bias is None:
        layer.bias = nn.Parameter(-correction)
    else:
        layer.bias = nn.Parameter(layer.bias.detach() - correction, requires_grad=layer.bias.requires_grad)
    layer.input_shift = float(shift)
