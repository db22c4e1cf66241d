"""Decompose ``nn.MultiheadAttention`` into three projections, scaled dot-product attention and the output projection.

The packed ``in_proj_weight`` / ``in_proj_bias`` of the module become three ``nn.Linear`` layers (query, key,
value) that get weight quantizers like any linear; ``out_proj`` stays a linear; the heads are split and merged by
reshapes and transposes, and the attention itself is ``F.scaled_dot_product_attention``, which
``passes/decompose_attention.py`` (run next, ``passes/canonicalize.py``) turns into matmul, scale, softmax, matmul.

Matches:     ``call_module`` nodes of an ``nn.MultiheadAttention`` (torch.fx keeps it a leaf; torch.export traces
             through it) with query, key and value of the same embedding size (``_qkv_same_embed_dim``), no
             ``bias_k`` / ``bias_v``, no ``add_zero_attn``, no ``key_padding_mask`` or ``attn_mask``, not causal,
             and whose attention weights are unused (``need_weights=False``, or result 1 never read). Others are
             left as they are (and refused by ``check_supported`` as the module type they are).
Rewrites to: per call, ``<name>_mha.{q_proj,k_proj,v_proj,out_proj}`` linears (copies of the packed slices);
             ``q = q_proj(query)``, ... (``transpose(0, 1)`` around it all unless ``batch_first``), each
             ``reshape(b, n, heads, head_dim).transpose(1, 2)``, ``F.scaled_dot_product_attention(q, k, v,
             scale=1/sqrt(head_dim))``, ``transpose(1, 2).reshape(b, n, embed)``, ``out_proj``; every
             ``getitem(mha, 0)`` reads the result. The sizes ``b, n`` are shape queries of the inputs (the graph
             stays generic in batch and length); the new nodes keep the module node's ``nn_module_stack`` and
             ``stack_trace``.
Requires:    a GraphModule from ``capture``; runs before ``decompose_attention``.
Ensures:     the graph computes what the module computes in eval mode, up to fp32 rounding (tested against the
             module); the module is gone from ``gm`` (where no other node calls it). Modifies ``gm`` in place.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn


def decompose_mha(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every matching ``nn.MultiheadAttention`` call (see the module docstring)."""
    changed = False
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.MultiheadAttention) and _supported(module, node):
            _rewrite(gm, node, module)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
         "is_causal")


def _call(node: fx.Node) -> dict:
    call = dict(zip(_ARGS, node.args))
    call.update(node.kwargs)
    return call


def _supported(module: nn.MultiheadAttention, node: fx.Node) -> bool:
    call = _call(node)
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return False
    if any(call.get(name) is not None for name in ("key_padding_mask", "attn_mask")) or call.get("is_causal"):
        return False
    return all(user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)
               and (user.args[1] == 0 or not user.users) for user in node.users)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _rewrite(gm: fx.GraphModule, node: fx.Node, module: nn.MultiheadAttention) -> None:
    graph, call = gm.graph, _call(node)
    embed, heads = module.embed_dim, module.num_heads
    head_dim = embed // heads
    weights = module.in_proj_weight.detach().chunk(3)
    biases = module.in_proj_bias.detach().chunk(3) if module.in_proj_bias is not None else (None,) * 3
    container = nn.Module()
    for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
        container.add_module(name, _linear(w, b))
    out = module.out_proj
    container.add_module("out_proj", _linear(out.weight.detach(), None if out.bias is None else out.bias.detach()))
    prefix = f"{node.target.replace('.', '_')}_mha"
    gm.add_module(prefix, container)

    created: list[fx.Node] = []

    def add(kind: str, target, *args, **kwargs) -> fx.Node:
        new = graph.create_node(kind, target, args, kwargs)
        created.append(new)
        return new

    with graph.inserting_before(node):
        inputs = [call["query"], call["key"], call["value"]]
        if not module.batch_first:
            inputs = [add("call_method", "transpose", x, 0, 1) for x in inputs]
        split, shapes = [], []
        for name, x in zip(("q_proj", "k_proj", "v_proj"), inputs):
            shape = add("call_function", getattr, x, "shape")
            shapes.append(shape)
            batch, length = (add("call_function", operator.getitem, shape, i) for i in (0, 1))
            projected = add("call_module", f"{prefix}.{name}", x)
            heads_first = add("call_method", "reshape", projected, batch, length, heads, head_dim)
            split.append(add("call_method", "transpose", heads_first, 1, 2))
        attended = add("call_function", F.scaled_dot_product_attention, *split, scale=1.0 / math.sqrt(head_dim))
        batch, length = (add("call_function", operator.getitem, shapes[0], i) for i in (0, 1))
        merged = add("call_method", "reshape", add("call_method", "transpose", attended, 1, 2), batch, length, embed)
        result = add("call_module", f"{prefix}.out_proj", merged)
        if not module.batch_first:
            result = add("call_method", "transpose", result, 0, 1)
    for new in created:
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(result)
        graph.erase_node(user)
    graph.erase_node(node)
    if not any(n.op == "call_module" and n.target == node.target for n in graph.nodes):
        gm.delete_submodule(node.target)  # its packed weights are the new linears' now
