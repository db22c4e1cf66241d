"""Constant computations of a captured graph: which nodes compute a tensor that depends on no graph input's values
(``is_constant``), and that value (``constant_value``), which the integer program holds as a ``constant``
(``mpqc/ops/registry.py``'s ``describe``): Swin's relative position bias gathered from its table, its shifted-window
mask, Swin V2's continuous position bias (a small MLP on a coordinate table) and its qkv bias with the key part
zeroed.

In-place mutations are part of such computations: torch.export records Swin's window mask as ``new_zeros`` then
``mask[h0:h1, w0:w1] = count`` (``slice`` views and ``fill_`` nodes that nothing reads: the value lives in the base
tensor), and Swin V2 zeroes a slice of a cloned bias with ``zero_``. ``mutates`` tells such nodes; dead-code
elimination keeps them, and ``constant_value`` runs the constant ones that write into the tensors it computes, in
graph order, as eager PyTorch did.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node


def mutates(node: Node) -> bool:
    """Whether ``node`` writes into its first argument in place (an ATen op with a mutable schema such as
    ``fill_``/``zero_``, a ``Tensor`` method ``x.fill_(...)``, ``x[i] = v``)."""
    if node.op == "call_method":
        return node.target == "__setitem__" or (node.target.endswith("_") and not node.target.startswith("_"))
    if node.op != "call_function":
        return False
    if node.target is operator.setitem:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


#: Ops whose value is made from another tensor's shape and dtype only (the shifted-window mask of Swin).
SHAPE_ONLY = frozenset({torch.ops.aten.new_zeros.default, torch.ops.aten.new_ones.default,
                        torch.ops.aten.new_full.default, torch.ops.aten.zeros_like.default,
                        torch.ops.aten.ones_like.default, torch.ops.aten.full_like.default, torch.zeros_like,
                        torch.ones_like, torch.full_like, "new_zeros", "new_ones", "new_full"})
_CONSTANT_META = "mpqc.constant"


def _shape_only(node: Node) -> bool:
    try:
        return node.op in ("call_function", "call_method") and node.target in SHAPE_ONLY
    except TypeError:
        return False


def is_constant(gm: GraphModule, node: Node) -> bool:
    """Whether ``node``'s value is a tensor that depends on no graph input's values: a ``get_attr``, a tensor made
    from another's shape (``x.new_zeros(...)``), or a call whose graph inputs are all constant (a Swin's relative
    position bias gathered from its table, its shifted-window mask), with a traced tensor shape. The answer is kept
    in ``node.meta`` once the node's shape is recorded. An embedding table's lookup never is (a quantized layer)."""
    from torch.fx.passes.shape_prop import TensorMetadata

    known: dict[Node, bool] = {}

    def answer(n: Node, value: bool, final: bool) -> None:
        known[n] = value
        if final:
            n.meta[_CONSTANT_META] = value

    stack = [node]
    while stack:
        current = stack[-1]
        if current in known or _CONSTANT_META in current.meta:
            known.setdefault(current, current.meta.get(_CONSTANT_META, False))
            stack.pop()
            continue
        traced = isinstance(current.meta.get("tensor_meta"), TensorMetadata)
        inputs = current.all_input_nodes
        if current.op == "get_attr":
            answer(current, True, True)
        elif current.op == "call_module" and isinstance(gm.get_submodule(current.target), nn.Embedding):
            answer(current, False, True)  # a table lookup is a layer (its table quantized, counted), even at fixed
            # indices (BERT's position and token-type ids): the program keeps it as one
        elif _shape_only(current):
            answer(current, traced, traced)
        elif current.op not in ("call_function", "call_method", "call_module") or not inputs:
            answer(current, False, True)
        else:
            pending = [n for n in inputs if n not in known and _CONSTANT_META not in n.meta]
            if pending:
                stack.extend(pending)
                continue
            inputs_constant = all(known.get(n, n.meta.get(_CONSTANT_META)) for n in inputs)
            answer(current, inputs_constant and traced, traced or not inputs_constant)
        stack.pop()
    return known[node]


def constant_value(gm: GraphModule, node: Node) -> Tensor:
    """The value of a constant computation (``is_constant``) as its first reader reads it (a user that is not an
    in-place write or a view written into), computed from the graph's current attributes: the constant in-place
    writes (``mutates``) into the tensors it is computed from (or views of them) that come before that reader run
    too, in graph order."""
    from torch import fx

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    until = min((order[user] for user in node.users if not _only_writes(user)), default=len(order))
    needed = _closure([node])
    writes = [n for n in gm.graph.nodes if order[n] < until and mutates(n) and n not in needed]
    while True:  # the writes into a needed tensor, through the views of it they write to
        found = [n for n in writes if n not in needed and _writes_into(n, needed) and is_constant(gm, n)]
        if not found:
            break
        needed |= _closure(found)
    values: dict[Node, Any] = {}
    with torch.no_grad():
        for current in gm.graph.nodes:
            if current not in needed or order[current] >= until:
                continue
            if current.op == "get_attr":
                owner, _, name = current.target.rpartition(".")
                value = getattr(gm.get_submodule(owner) if owner else gm, name)
                values[current] = value.detach().clone() if isinstance(value, Tensor) else value  # (never the
                continue  # model's own tensor: a write into a view of it would change the model)
            stand_in = _like(current)  # (read by a SHAPE_ONLY op, whose inputs are not computed)
            args = fx.node.map_arg(current.args, lambda n: values[n] if n in values else stand_in)
            kwargs = fx.node.map_arg(current.kwargs, lambda n: values[n] if n in values else stand_in)
            if current.op == "call_module":
                values[current] = gm.get_submodule(current.target)(*args, **kwargs)
            elif current.op == "call_method":
                values[current] = getattr(args[0], current.target)(*args[1:], **kwargs)
            else:
                values[current] = current.target(*args, **kwargs)
    return values[node].detach().clone()


def _closure(nodes: list[Node]) -> set[Node]:
    """``nodes`` and the nodes their values are computed from (not through a ``SHAPE_ONLY`` op's input)."""
    needed, stack = set(), list(nodes)
    while stack:
        current = stack.pop()
        if current not in needed:
            needed.add(current)
            if current.op != "get_attr" and not _shape_only(current):
                stack.extend(current.all_input_nodes)
    return needed


def _only_writes(node: Node) -> bool:
    """Whether ``node`` is an in-place write, or a view whose readers all are (``mask[:2, 2:]`` then ``fill_``),
    followed iteratively: a constant read first by a chain through the whole net (MaxViT-T's, each node the next
    one's first argument) passed Python's recursion limit."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen or mutates(current):
            continue
        seen.add(current)
        if not current.users:
            return False
        for user in current.users:
            if not user.args or user.args[0] is not current:
                return False
            stack.append(user)
    return True


def _writes_into(write: Node, needed: set[Node]) -> bool:
    """Whether the in-place ``write`` writes into a tensor of ``needed`` (its target, or what that is a view of:
    followed through first arguments)."""
    target = write.args[0] if write.args else None
    while isinstance(target, Node):
        if target in needed:
            return True
        if target.op not in ("call_function", "call_method") or not target.args:
            return False
        target = target.args[0]
    return False


def _like(node: Node) -> Tensor | None:
    """For a ``SHAPE_ONLY`` op ``node``: a tensor of its own traced shape and dtype, standing for its input (whose
    shape and dtype alone it reads: ``zeros_like`` keeps both, ``new_zeros`` the dtype)."""
    meta = node.meta.get("tensor_meta")
    if not _shape_only(node) or not hasattr(meta, "shape"):
        return None
    return torch.zeros(tuple(int(d) for d in meta.shape), dtype=meta.dtype)
