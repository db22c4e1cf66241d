"""Decompose scaled dot-product attention into the ops the integer program has: two matmuls, a scale, a softmax.

Matches:     ``call_function`` nodes of ``F.scaled_dot_product_attention`` and ATen ``scaled_dot_product_attention``
             (the torch.export form) with ``dropout_p`` 0, ``is_causal`` False and ``enable_gqa`` False, and an
             ``attn_mask`` that is None, a graph tensor of dtype bool (True: attend), or a float graph tensor
             (an additive mask of 0 and large negatives). Others are left as they are (and refused, all listed,
             by ``check_supported``).
Rewrites to: ``s = torch.matmul(q, k.transpose(-2, -1)) * scale`` (``scale`` as given, else ``1 / sqrt(E)``), then
             ``torch.softmax(s, -1)``, ``masked_softmax(s, mask, -1)`` (bool mask) or
             ``masked_softmax(s, additive_mask_keep(mask), -1)`` (float mask), then ``torch.matmul(p, v)``
             (``mpqc/ops/softmax.py``, ``mpqc/ops/matmul.py``). The new nodes keep the old node's metadata
             (``nn_module_stack``, ``stack_trace``).
Requires:    a GraphModule from ``capture`` (runs right after it, ``mpqc.pipeline.trace``); shapes recorded in
             ``node.meta["tensor_meta"]`` (the capture's ShapeProp) for the float mask's dtype.
Ensures:     the graph computes what SDPA computes, up to fp32 rounding (the math backend's order; tested against
             the original graph); no SDPA node it matches is left. Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from mpqc.ops.registry import calls
from mpqc.ops.softmax import additive_mask_keep, masked_softmax

aten = torch.ops.aten

_SDPA = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def decompose_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every matching SDPA call (see the module docstring)."""
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and calls(n, _SDPA)]:
        call = _bound(node)
        if call is not None:
            _rewrite(gm, node, call)
    gm.graph.lint()
    gm.recompile()
    return gm


def _bound(node: fx.Node) -> dict[str, Any] | None:
    """The call's arguments by name, or None where this pass leaves the call alone."""
    call = dict(_DEFAULTS)
    call.update(zip(_ARGS, node.args))
    call.update(node.kwargs)
    if call["dropout_p"] != 0.0 or call["is_causal"] or call["enable_gqa"]:
        return None
    query = call["query"]
    mask = call["attn_mask"]
    if mask is not None and (not isinstance(mask, fx.Node) or _dtype(mask) is None):
        return None
    meta = query.meta.get("tensor_meta") if isinstance(query, fx.Node) else None
    if call["scale"] is None:
        if meta is None:
            return None
        call["scale"] = 1.0 / math.sqrt(int(meta.shape[-1]))
    return call


def _dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def _rewrite(gm: fx.GraphModule, node: fx.Node, call: dict[str, Any]) -> None:
    graph = gm.graph
    created: list[fx.Node] = []

    def add(target, *args) -> fx.Node:
        new = graph.call_function(target, args)
        created.append(new)
        return new

    with graph.inserting_before(node):
        key_t = add(torch.transpose, call["key"], -2, -1)
        scores = add(torch.mul, add(torch.matmul, call["query"], key_t), float(call["scale"]))
        mask = call["attn_mask"]
        if mask is None:
            probs = add(torch.softmax, scores, -1)
        else:
            keep = mask if _dtype(mask) == torch.bool else add(additive_mask_keep, mask)
            probs = add(masked_softmax, scores, keep, -1)
        out = add(torch.matmul, probs, call["value"])
    for new in created:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
    node.replace_all_uses_with(out)
    graph.erase_node(node)
