"""Fuse an L2 normalization written as a division by a norm into one ``l2_normalize`` call.

``F.normalize`` is a Python function that fx and torch.export trace through, and models also write the division
out: neither a vector norm nor a division by a tensor is an op of the integer program, but the whole is one
(``mpqc/ops/norm.py``: ``l2_normalize``, an integer kernel).

Matches:     ``F.normalize(x, 2, dim, eps)`` (fx records the call: it dispatches ``__torch_function__``), and
             ``x / d`` (``operator.truediv``, ``torch.div`` / ``Tensor.div`` without a rounding mode, ATen
             ``div.Tensor``) where ``d`` is, after an optional ``expand_as(x)`` and an optional
             ``clamp_min(eps)`` / ``clamp(min=eps)``, the 2-norm of the same ``x`` over one dim with ``keepdim``
             (``Tensor.norm``, ``torch.norm``, ``torch.linalg.vector_norm``, ATen ``linalg_vector_norm``): what
             models write out, and what torch.export records for ``F.normalize`` (``linalg_vector_norm``,
             ``clamp_min``, ``expand_as``, ``div.Tensor``).
Rewrites to: ``l2_normalize(x, dim, eps)`` (eps 0 without a clamp) in the division's place, with its metadata;
             the norm chain is left to ``passes/dead_code.py`` (kept where something else reads it).
Requires:    a GraphModule from ``capture``; runs in ``canonicalize`` before ``fold_constants``.
Ensures:     the same values up to fp32 rounding (``x / max(||x||, eps)``), except an all-zero row divided by an
             unclamped norm: zeros where the division gave NaN. Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from mpqc.ops.norm import l2_normalize
from mpqc.ops.registry import arg, calls

aten = torch.ops.aten

#: A true division by a tensor, as fx (function or method) and torch.export record it.
DIVISIONS = (operator.truediv, torch.div, torch.true_divide, aten.div.Tensor, "div", "true_divide", "__truediv__")
_EXPANDS = (aten.expand_as.default, "expand_as")
_CLAMP_MIN = (aten.clamp_min.default, torch.clamp_min, "clamp_min")
_CLAMPS = (aten.clamp.default, torch.clamp, "clamp")
#: norm functions and methods -> the positions of (p, dim, keepdim) in their signature
_NORMS: dict[Any, tuple[int, int, int]] = {"norm": (1, 2, 3), torch.norm: (1, 2, 3),
                                           torch.linalg.vector_norm: (1, 2, 3),
                                           aten.linalg_vector_norm.default: (1, 2, 3)}
_P_NAMES = {"norm": "p", torch.norm: "p", torch.linalg.vector_norm: "ord", aten.linalg_vector_norm.default: "ord"}


def fuse_normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every matching division (see the module docstring)."""
    changed = False
    for node in list(gm.graph.nodes):
        match = _match(node)
        if match is None:
            continue
        x, dim, eps = match
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(l2_normalize, (x, dim, eps))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _match(node: fx.Node) -> tuple[fx.Node, int, float] | None:
    """``(x, dim, eps)`` of ``F.normalize`` (p 2) or a division ``x / max(||x||_2, eps)`` over one dim, else None."""
    if calls(node, (F.normalize,)):
        x, p, dim = node.args[0], arg(node, 1, "p", 2.0), arg(node, 2, "dim", 1)
        eps, out = arg(node, 3, "eps", 1e-12), arg(node, 4, "out", None)
        ok = isinstance(x, fx.Node) and p in (2, 2.0) and isinstance(dim, int) and isinstance(eps, (int, float))
        return (x, dim, float(eps)) if ok and out is None else None
    if not calls(node, DIVISIONS) or len(node.args) != 2 or node.kwargs.get("rounding_mode") is not None:
        return None
    x, denominator = node.args
    if not isinstance(x, fx.Node):
        return None
    if calls(denominator, _EXPANDS) and denominator.args[1:] == (x,):
        denominator = denominator.args[0]
    eps = 0.0
    if calls(denominator, _CLAMP_MIN) or (calls(denominator, _CLAMPS)
                                               and arg(denominator, 2, "max", None) is None):
        low = arg(denominator, 1, "min", None)
        if not isinstance(low, (int, float)) or low < 0:
            return None
        eps, denominator = float(low), denominator.args[0]
    if not calls(denominator, _NORMS) or denominator.args[0] is not x:
        return None
    p_at, dim_at, keep_at = _NORMS[denominator.target]
    p = arg(denominator, p_at, _P_NAMES[denominator.target], 2)
    dim = arg(denominator, dim_at, "dim", None)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if p not in (2, 2.0, "fro") or not isinstance(dim, int) or not arg(denominator, keep_at, "keepdim", False) \
            or arg(denominator, keep_at + 1, "dtype", None) is not None:
        return None
    return x, dim, eps
