"""Fold computations on constant tensors (buffers, not parameters) into constants.

HF models index their position and token-type embeddings with buffers (``position_ids[:, :S]``, and
``token_type_ids`` gathered and expanded to the batch when the caller gives none); torch.export records those
slices, gathers and expands, which the integer program has no ops for and which never change.

Matches:     ``call_function`` / ``call_method`` nodes whose tensor inputs are all ``get_attr`` nodes of buffers or
             plain tensors (never a ``Parameter``: trained values must stay in the graph) or nodes folded before,
             and whose other arguments are Python values. Also an ``expand`` of such a constant with size 1 in dim 0
             to the batch size (a shape value) whose users are embedding lookups only (``F.embedding``, ATen
             ``embedding``, an ``nn.Embedding``): the lookup of the unexpanded ids gives the same rows with a batch
             dim of 1, which the ops reading it broadcast (the shapes after the rewrite are checked, see Ensures).
Rewrites to: a ``get_attr`` node of a new buffer ``_mpqc_constants.<node>`` holding the value (the expanded node: its
             input). Unused nodes are left to ``passes/dead_code.py``.
Requires:    a GraphModule from ``capture`` (shapes in ``node.meta["tensor_meta"]``).
Ensures:     the folded values are the ones the graph computed (the same calls on the same tensors); where an
             expand is dropped, every user of the embedding lookup it fed broadcasts the lookup against an operand
             with the traced batch size, else the expand is kept. Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

aten = torch.ops.aten

CONSTANTS = "_mpqc_constants"
_EXPANDS = (aten.expand.default, "expand")
_EMBEDDINGS = (F.embedding, aten.embedding.default)
_BROADCASTING = (aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, torch.add, torch.mul, torch.sub)


def fold_constants(gm: fx.GraphModule) -> fx.GraphModule:
    values: dict[fx.Node, torch.Tensor] = {}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            value = _attribute(gm, node.target)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                values[node] = value
        elif node.op in ("call_function", "call_method") and node.users:
            if _foldable(node, values):
                value = _run(node, values)
                values[_replace(gm, node, value)] = value
            elif _batch_expand(gm, node, values):
                node.replace_all_uses_with(node.args[0])
    gm.graph.lint()
    gm.recompile()
    return gm


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name, None)


def _inputs_constant(node: fx.Node, values: dict[fx.Node, torch.Tensor]) -> bool:
    return bool(node.all_input_nodes) and all(arg in values for arg in node.all_input_nodes)


def _foldable(node: fx.Node, values: dict[fx.Node, torch.Tensor]) -> bool:
    return _inputs_constant(node, values) and isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _run(node: fx.Node, values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    args = fx.node.map_arg(node.args, values.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
    with torch.no_grad():
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs).clone()
        return node.target(*args, **kwargs).clone()


def _replace(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor) -> fx.Node:
    if not hasattr(gm, CONSTANTS):
        gm.add_module(CONSTANTS, nn.Module())
    gm.get_submodule(CONSTANTS).register_buffer(node.name, value)
    with gm.graph.inserting_before(node):
        constant = gm.graph.get_attr(f"{CONSTANTS}.{node.name}")
    constant.meta.update(node.meta)
    node.replace_all_uses_with(constant)
    return constant


def _batch_expand(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, torch.Tensor]) -> bool:
    """``expand(c, [batch, ...])`` of a constant ``c`` with dim 0 of size 1, read by embedding lookups only, each
    of whose users broadcasts it against a value of the full traced shape."""
    if node.target not in _EXPANDS or not node.args or node.args[0] not in values:
        return False
    source = values[node.args[0]]
    meta = node.meta.get("tensor_meta")
    if meta is None or source.dim() != len(meta.shape) or source.shape[0] != 1 \
            or tuple(source.shape[1:]) != tuple(meta.shape[1:]):
        return False
    return all(_is_embedding(gm, user) and all(_broadcasts_to_batch(reader, user) for reader in user.users)
               for user in node.users)


def _is_embedding(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Embedding)
    return node.op == "call_function" and node.target in _EMBEDDINGS


def _broadcasts_to_batch(reader: fx.Node, lookup: fx.Node) -> bool:
    """``reader`` is a binary add/mul/sub whose other operand has the lookup's traced shape."""
    if reader.op != "call_function" or reader.target not in _BROADCASTING or len(reader.args) != 2:
        return False
    other = reader.args[1] if reader.args[0] is lookup else reader.args[0]
    ours, theirs = lookup.meta.get("tensor_meta"), getattr(other, "meta", {}).get("tensor_meta")
    return ours is not None and theirs is not None and tuple(ours.shape) == tuple(theirs.shape)
