"""Decompose a two-operand ``einsum`` that is a batched matrix product into permutes around one ``matmul``.

MaxViT's attention writes ``einsum("BGHID,BGHJD->BGHIJ", q, k)`` and ``einsum("BGHIJ,BGHJD->BGHID", p, v)``; the
integer program has the activation matmul (``mpqc/ops/matmul.py``) and permutes, not einsum.

Matches:     ``torch.einsum`` / ``torch.functional.einsum`` (operands as arguments or one list) and ATen
             ``einsum`` with two graph tensors and an explicit equation (``->``, no ``...``, no repeated letter in
             one term) of the form batch letters (in both operands and the output), one letter ``i`` of the first
             operand only, one ``j`` of the second only, one contracted letter ``k`` of both operands and not the
             output; letters in any order within each term. Others are left (and refused by ``check_supported``).
Rewrites to: ``permute(a, batch + i + k)`` and ``permute(b, batch + k + j)`` (each only where not already in that
             order), ``torch.matmul``, then ``permute`` to the output's order where it differs. The new nodes keep the
             einsum's ``nn_module_stack`` / ``stack_trace``; shapes are recorded again by ``analyze_layers``.
Requires:    a GraphModule from ``capture``; runs in ``canonicalize``.
Ensures:     the same values up to fp32 summation order (tested against the einsum); no matched einsum is left.
             Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

import torch
from torch import fx

from mpqc.ops.registry import calls

aten = torch.ops.aten

_EINSUM = (torch.einsum, torch.functional.einsum, aten.einsum.default)


def decompose_einsum(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every matching einsum (see the module docstring)."""
    changed = False
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and calls(n, _EINSUM)]:
        call = _operands(node)
        plan = _plan(*call) if call is not None else None
        if plan is None:
            continue
        (a, b), (perm_a, perm_b, perm_out) = call[1:], plan
        created: list[fx.Node] = []

        def add(target, *args) -> fx.Node:
            created.append(gm.graph.call_function(target, args))
            return created[-1]

        with gm.graph.inserting_before(node):
            a = add(torch.permute, a, perm_a) if perm_a != sorted(perm_a) else a
            b = add(torch.permute, b, perm_b) if perm_b != sorted(perm_b) else b
            out = add(torch.matmul, a, b)
            out = add(torch.permute, out, perm_out) if perm_out != sorted(perm_out) else out
        for new in created:
            new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
        out.meta = {**node.meta, **out.meta}
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _operands(node: fx.Node) -> tuple[str, fx.Node, fx.Node] | None:
    """``(equation, a, b)`` of a two-tensor einsum call, else None."""
    if not node.args or not isinstance(node.args[0], str) or node.kwargs:
        return None
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2 or not all(isinstance(t, fx.Node) for t in operands):
        return None
    return node.args[0], operands[0], operands[1]


def _plan(equation: str, a: fx.Node, b: fx.Node) -> tuple[list[int], list[int], list[int]] | None:
    """The permutations of ``a``, ``b`` and the product (``[batch, i, j]`` -> the output's order), or None."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != 2 or any(len(set(t)) != len(t) for t in (*terms, out)):
        return None
    ta, tb = terms
    batch = [c for c in out if c in ta and c in tb]
    i, j = [c for c in ta if c not in tb], [c for c in tb if c not in ta]
    k = [c for c in ta if c in tb and c not in out]
    if len(i) != 1 or len(j) != 1 or len(k) != 1 or sorted(out) != sorted(batch + i + j) \
            or sorted(ta) != sorted(batch + i + k) or sorted(tb) != sorted(batch + k + j):
        return None
    product = batch + i + j
    return ([ta.index(c) for c in batch + i + k], [tb.index(c) for c in batch + k + j],
            [product.index(c) for c in out])
