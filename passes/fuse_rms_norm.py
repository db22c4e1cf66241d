"""Fuse an RMSNorm written out by hand (LLaMA, T5, Mistral, Qwen ...) into one ``F.rms_norm`` call.

Most language models do not call ``nn.RMSNorm``: they write ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) +
eps)`` and multiply by a weight. Neither ``rsqrt`` nor a product of two activations' statistics is an op of the
integer program, but the whole is one (``mpqc/ops/norm.py``: ``rms_norm``, the integer norm kernel without
centering).

Matches:     a normalization ``h * rsqrt(v)`` (either order; ``torch.rsqrt``, ``Tensor.rsqrt``, ATen ``rsqrt``) or
             ``h / sqrt(v)`` (``operator.truediv``, ``torch.div`` / ``Tensor.div`` without a rounding mode, ATen
             ``div.Tensor``; ``sqrt`` likewise), where ``v = m + eps`` (a number either side) and ``m`` is the mean
             over the last dim with ``keepdim`` (``Tensor.mean``, ``torch.mean``, ATen ``mean.dim``) of ``h ** 2``
             (``pow(h, 2)``, ``h * h``, ``square(h)``) of the same ``h``; ``h`` seen through no-op casts (``.to``,
             ``.float()``, ``.type_as``, ATen ``_to_copy`` whose output dtype, recorded at capture, is its input's:
             ``hidden_states.to(torch.float32)`` on an fp32 model). Then, optionally, the product of the result
             (through no-op casts) with a stored 1-D weight of the last dim's size (``get_attr``), either order,
             where that product is the result's only reader.
Rewrites to: ``F.rms_norm(h, [D], weight or None, eps)`` in place of the weight product (or of the
             normalization when there is none), with its metadata; the old chain is left to
             ``passes/dead_code.py`` (kept where something else reads it).
Requires:    a GraphModule from ``capture`` with ``node.meta["tensor_meta"]`` (the capture's ShapeProp) for the
             last dim; runs in ``canonicalize`` before ``functional_layers``.
Ensures:     the same values up to fp32 rounding (``h * rsqrt(mean(h^2) + eps) * w``). A mean over another dim,
             a square of another tensor, an ``eps`` that is a tensor, or a weight that is not a stored 1-D tensor of
             size ``D`` are left alone. Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from mpqc.ops.registry import arg, calls
from mpqc.passes.fuse_normalize import DIVISIONS

aten = torch.ops.aten

_MULTIPLY = (operator.mul, torch.mul, "mul", "__mul__", aten.mul.Tensor)
_ADD = (operator.add, torch.add, "add", "__add__", "__radd__", aten.add.Tensor, aten.add.Scalar)
_RSQRT = (torch.rsqrt, "rsqrt", aten.rsqrt.default)
_SQRT = (torch.sqrt, "sqrt", aten.sqrt.default)
_MEAN = (torch.mean, "mean", aten.mean.dim)
_POW = (torch.pow, operator.pow, "pow", "__pow__", aten.pow.Tensor_Scalar)
_SQUARE = (torch.square, "square", aten.square.default)
_CASTS = (torch.Tensor.to, "to", "float", "type_as", "type", aten._to_copy.default, aten.to.dtype)


def fuse_rms_norm(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every hand-written RMSNorm (see the module docstring)."""
    changed = False
    for node in list(gm.graph.nodes):
        match = _normalization(node)
        if match is None:
            continue
        h, eps, size = match
        weight, output = _weight_product(gm, node, size)
        with gm.graph.inserting_before(output):
            fused = gm.graph.call_function(F.rms_norm, (h, [size], weight, eps))
        fused.meta = dict(output.meta)
        output.replace_all_uses_with(fused)
        gm.graph.erase_node(output)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _normalization(node: fx.Node) -> tuple[fx.Node, float, int] | None:
    """``(h, eps, D)`` where ``node`` is ``h * rsqrt(mean(h^2, -1) + eps)`` or ``h / sqrt(...)``, else None."""
    if calls(node, _MULTIPLY) and len(node.args) == 2:
        for h, root in (node.args, node.args[::-1]):
            match = _root_mean_square(root, _RSQRT, h)
            if match is not None:
                return match
        return None
    if calls(node, DIVISIONS) and len(node.args) == 2 and node.kwargs.get("rounding_mode") is None:
        return _root_mean_square(node.args[1], _SQRT, node.args[0])
    return None


def _root_mean_square(root, functions: tuple, h) -> tuple[fx.Node, float, int] | None:
    """``(h, eps, D)`` where ``root`` is ``functions(mean(h^2, last dim, keepdim) + eps)`` of the same ``h``."""
    if not isinstance(h, fx.Node) or not calls(root, functions) or len(root.args) != 1:
        return None
    total = root.args[0]
    if not calls(total, _ADD) or len(total.args) != 2 or arg(total, 2, "alpha", 1) != 1:
        return None
    eps, mean = total.args if isinstance(total.args[0], (int, float)) else total.args[::-1]
    if not isinstance(eps, (int, float)) or not calls(mean, _MEAN):
        return None
    shape = _shape(h)
    dim = arg(mean, 1, "dim", None)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if shape is None or not isinstance(dim, int) or dim not in (-1, len(shape) - 1) \
            or not arg(mean, 2, "keepdim", False) or arg(mean, 3, "dtype", None) is not None:
        return None
    if not _is_square_of(mean.args[0], _source(h)):
        return None
    return _source(h), float(eps), shape[-1]


def _is_square_of(node, h: fx.Node) -> bool:
    if calls(node, _POW) and len(node.args) == 2:
        return node.args[1] in (2, 2.0) and _source(node.args[0]) is h
    if calls(node, _SQUARE) and len(node.args) == 1:
        return _source(node.args[0]) is h
    return calls(node, _MULTIPLY) and len(node.args) == 2 and _source(node.args[0]) is h \
        and _source(node.args[1]) is h


def _source(node):
    """``node`` seen through casts that keep its dtype (recorded at capture)."""
    while calls(node, _CASTS) and node.args and isinstance(node.args[0], fx.Node) \
            and _dtype(node) is not None and _dtype(node) == _dtype(node.args[0]):
        node = node.args[0]
    return node


def _weight_product(gm: fx.GraphModule, normalized: fx.Node, size: int) -> tuple[fx.Node | None, fx.Node]:
    """``(weight, product)`` where the normalization's only reader (through no-op casts) multiplies it by a stored
    1-D tensor of ``size`` elements, else ``(None, normalized)``."""
    value = normalized
    while len(_readers(value)) == 1:
        (user,) = _readers(value)
        if _source(user) is value:
            value = user
            continue
        if calls(user, _MULTIPLY) and len(user.args) == 2 and value in user.args:
            (weight,) = [a for a in user.args if a is not value] or [None]
            if _stored_vector(gm, weight, size):
                return weight, user
        break
    return None, normalized


def _readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` but torch.export's dtype assertions (``aten._assert_tensor_metadata``)."""
    return [user for user in node.users if user.target is not aten._assert_tensor_metadata.default]


def _stored_vector(gm: fx.GraphModule, node, size: int) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    owner, _, name = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner), name, None)
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == size \
        and value.dtype == torch.float32


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None


def _dtype(node: fx.Node):
    return getattr(node.meta.get("tensor_meta"), "dtype", None)
