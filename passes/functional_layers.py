"""Turn conv/linear layers, embedding lookups and LayerNorms called functionally with parameter tensors into modules.

Matches:      ``call_function`` nodes of ``F.conv1d`` / ``F.conv2d`` / ``F.linear`` (``torch.conv1d``, ``torch.conv2d``,
              ``torch._C._nn.linear`` under torch.fx) and of the ATen ops of the torch.export path
              (``aten.conv1d`` / ``aten.conv2d`` with numeric or string padding, ``aten.linear``, and
              ``aten.convolution`` when it is not transposed and its weight is 3-D or 4-D), ``F.embedding`` /
              ``aten.embedding`` and ``F.layer_norm`` / ``aten.layer_norm`` with an affine weight, whose weight and bias
              (if any) are ``get_attr`` nodes: parameters, buffers or constant tensors of the graph module; a bias
              may also be computed from stored tensors only (``mpqc.ops.is_constant``: Swin V2's qkv bias with the
              key's part zeroed), held as its computed value (``requires_grad=False``).
Rewrites to:  a ``call_module`` node on a new ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` / ``nn.Embedding`` /
              ``nn.LayerNorm`` holding those tensors
              (the same ``Parameter`` objects, moved: the attribute leaves its old owner when no other node reads it
              and the owner is not itself called; a buffer or constant becomes a ``Parameter`` with
              ``requires_grad=False``). The module is named after
              the fx node, under the module that owned the weight (``block.conv2d``), in the graph's train/eval
              mode; the node keeps the old node's metadata (shapes from ``capture``). Padding ``"valid"`` becomes 0.
Requires:     a GraphModule from ``capture``; runs before ``fold_batchnorm`` (``mpqc.pipeline.trace``), so a BatchNorm
              after a functional conv folds, and the layers get quantizers like any module.
Ensures:      outputs ``torch.equal`` to before (the modules call the same functions with the same tensors;
              tested). Refuses, with :class:`~mpqc.errors.MpqcError` naming the node, a weight or bias computed
              at run time (not a ``get_attr``, nor a constant computation for a bias), a weight that several calls share, a transposed or output-padded
              ``aten.convolution``. Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mpqc.errors import MpqcError
from mpqc.ops.constants import constant_value, is_constant
from mpqc.passes.dead_code import erase_dead_code

aten = torch.ops.aten

_CONV1D = (torch.conv1d, aten.conv1d.default, aten.conv1d.padding)
_CONV2D = (torch.conv2d, aten.conv2d.default, aten.conv2d.padding)
_LINEAR = (F.linear, aten.linear.default)
_CONVOLUTION = (aten.convolution.default,)
_EMBEDDING = (F.embedding, aten.embedding.default)
_LAYER_NORM = (F.layer_norm, aten.layer_norm.default)
FUNCTIONAL_LAYERS = _CONV1D + _CONV2D + _LINEAR + _CONVOLUTION + _EMBEDDING + _LAYER_NORM

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups")
#: argument names and defaults of the other calls (ATen's embedding takes the table first, and -1 for no padding)
_SIGNATURES: dict[Any, tuple[tuple[str, ...], dict[str, Any]]] = {
    F.embedding: (("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
                  {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
                   "sparse": False, "bias": None}),
    aten.embedding.default: (("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"),
                             {"padding_idx": -1, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
                              "sparse": False, "bias": None}),
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
    aten.layer_norm.default: (("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
                              {"weight": None, "bias": None, "eps": 1e-5}),
}


def functional_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every functional conv1d/conv2d/linear call on parameter tensors by a module call (see the module
    docstring)."""
    calls = {node: _bound(node) for node in gm.graph.nodes if node.op == "call_function" and _is_layer_call(node)}
    for node, call in calls.items():
        for role in ("weight", "bias"):
            _check_constant(gm, node, role, call[role])
    weights = [call["weight"].target for call in calls.values()]
    for node, call in calls.items():
        if weights.count(call["weight"].target) > 1:
            raise MpqcError(f"{node.format_node()}: its weight {call['weight'].target!r} is shared with another "
                            "layer call (each quantized layer needs its own weight)")
    for node, call in calls.items():
        module = _module(gm, node, call)
        path = _free_path(gm, _owner(call["weight"].target), node.name)
        gm.add_submodule(path, module)
        with gm.graph.inserting_before(node):  # (its input read now: a layer call replaced before may feed it)
            replacement = gm.graph.call_module(path, (_bound(node)["input"],))
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        for role in ("weight", "bias"):
            _drop_unused(gm, call[role])
    gm.graph.lint()
    gm.recompile()
    if any(call["bias"] is not None and call["bias"].op != "get_attr" for call in calls.values()):
        erase_dead_code(gm)  # the computation of a bias now held by its module
    return gm


def _is_layer_call(node: fx.Node) -> bool:
    try:
        if node.target not in FUNCTIONAL_LAYERS:
            return False
    except TypeError:  # an unhashable target
        return False
    return node.target not in _LAYER_NORM or _bound(node)["weight"] is not None  # no affine: nothing to hold


def _bound(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    if node.target in _SIGNATURES:
        names, defaults = _SIGNATURES[node.target]
    elif node.target in _LINEAR:
        names, defaults = ("input", "weight", "bias"), {"bias": None}
    elif node.target in _CONVOLUTION:
        names, defaults = _CONVOLUTION_ARGS, {}
    else:
        names, defaults = _CONV_ARGS, _CONV_DEFAULTS
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    missing = [name for name in names if name not in bound]
    if missing:
        raise MpqcError(f"{node.format_node()}: no {missing[0]} argument")
    return bound


def _check_constant(gm: fx.GraphModule, node: fx.Node, role: str, value: Any) -> None:
    if value is None and role == "bias":
        return
    if role == "bias" and isinstance(value, fx.Node) and value.op != "get_attr" and is_constant(gm, value):
        return  # computed from stored tensors only (Swin V2 zeroes the key's part of its qkv bias): held as computed
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        origin = value.format_node() if isinstance(value, fx.Node) else repr(value)
        raise MpqcError(f"{node.format_node()}: its {role} is computed at run time ({origin}), not a parameter or "
                        f"buffer of the model; mpqc quantizes a layer's {role} once, so it must be a stored tensor")
    if not isinstance(_attribute(gm, value.target), Tensor):
        raise MpqcError(f"{node.format_node()}: its {role} {value.target!r} is not a tensor")


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _owner(target: str) -> str:
    return target.rpartition(".")[0]


def _parameter(gm: fx.GraphModule, target: str) -> nn.Parameter:
    value = _attribute(gm, target)
    return value if isinstance(value, nn.Parameter) else nn.Parameter(value.detach(), requires_grad=False)


def _module(gm: fx.GraphModule, node: fx.Node, call: dict[str, Any]) -> nn.Module:
    weight = _parameter(gm, call["weight"].target)
    bias = None if call["bias"] is None else _parameter(gm, call["bias"].target) if call["bias"].op == "get_attr" \
        else nn.Parameter(constant_value(gm, call["bias"]), requires_grad=False)
    if node.target in _EMBEDDING or node.target in _LAYER_NORM:
        module = _table_or_norm(node, call, weight, bias)
    elif node.target in _LINEAR:
        if weight.dim() != 2:
            raise MpqcError(f"{node.format_node()}: a linear weight of shape {tuple(weight.shape)}")
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        if node.target in _CONVOLUTION:
            if call["transposed"] or any(call["output_padding"]):
                raise MpqcError(f"{node.format_node()}: a transposed convolution (no quantized layer for it)")
        kind = {3: nn.Conv1d, 4: nn.Conv2d}.get(weight.dim())
        expected = nn.Conv1d if node.target in _CONV1D else nn.Conv2d if node.target in _CONV2D else kind
        if kind is None or kind is not expected:
            raise MpqcError(f"{node.format_node()}: a convolution weight of shape {tuple(weight.shape)}")
        padding = 0 if call["padding"] == "valid" else call["padding"]
        groups = int(call["groups"])
        module = kind(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=call["stride"],
                      padding=padding, dilation=call["dilation"], groups=groups, bias=bias is not None,
                      device="meta")
    module.weight = weight
    if bias is not None:
        module.bias = bias
    return module.train(gm.training)


def _table_or_norm(node: fx.Node, call: dict[str, Any], weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
    """``nn.Embedding`` (ATen's padding index -1 is none) or ``nn.LayerNorm`` on the call's tensors (set by the
    caller)."""
    if node.target in _EMBEDDING:
        if weight.dim() != 2:
            raise MpqcError(f"{node.format_node()}: an embedding table of shape {tuple(weight.shape)}")
        padding = call["padding_idx"]
        padding = None if padding is None or (node.target is aten.embedding.default and padding < 0) else padding
        return nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding, max_norm=call["max_norm"],
                            norm_type=call["norm_type"], scale_grad_by_freq=call["scale_grad_by_freq"],
                            sparse=call["sparse"], device="meta")
    return nn.LayerNorm(list(call["normalized_shape"]), eps=float(call["eps"]), bias=bias is not None, device="meta")


def _free_path(gm: fx.GraphModule, owner: str, name: str) -> str:
    """``owner.name``, or ``owner.name_1``, ... where that attribute is taken."""
    parent = gm.get_submodule(owner)
    candidate, index = name, 0
    while hasattr(parent, candidate):
        index += 1
        candidate = f"{name}_{index}"
    return f"{owner}.{candidate}" if owner else candidate


def _drop_unused(gm: fx.GraphModule, value: Any) -> None:
    """Erase a ``get_attr`` node left without users, and its attribute if no other node reads it (the tensor now
    lives in the new module)."""
    if not isinstance(value, fx.Node) or value.users or value.op != "get_attr":
        return
    target = value.target
    gm.graph.erase_node(value)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner, _, name = target.rpartition(".")
    if owner and any(n.op == "call_module" and n.target == owner for n in gm.graph.nodes):
        return  # the module that owns it is still called (a tied weight): it keeps its attribute
    parent = gm.get_submodule(owner)
    if name in parent._parameters:
        del parent._parameters[name]
    elif name in parent._buffers:
        del parent._buffers[name]
    elif hasattr(parent, name):
        delattr(parent, name)
