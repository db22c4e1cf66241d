"""``expand``: a value broadcast to a larger shape, e.g. a ViT's class token repeated for every sample of the batch.

``expand`` (attrs ``sizes``: ints, ``-1`` keeps a dim, ``None`` is the batch size of the second input)
    The batch size is a run-time value in the model (``class_token.expand(x.shape[0], -1, -1)``): the program node
    reads it from the tensor whose shape the model queried (its second input, ``batch_of``); every other size
    written as a run-time value is resolved from the traced shape, as ``reshape`` resolves them. On an integer
    value the codes and their scale are broadcast alike (exact); on a float value (a constant: the class token) the
    fp32 values are. Not a requantisation step: an expanded constant is a float leaf of the region that reads it.
    TVM ``broadcast_to`` on the static shape; ONNX ``Expand`` with the batch size taken from ``Shape`` of the
    second input (``-1`` written as 1: ONNX broadcasting keeps that dim).
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from mpqc.ops.movement import MOVEMENT_TESTS
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, register_op
from mpqc.ops.scales import move, relax_move, traced_shape

aten = torch.ops.aten


def batch_of(size: Any) -> Node | None:
    """The tensor whose dim 0 ``size`` is (``t.shape[0]``, ``t.size()[0]``, ``t.size(0)``, ATen ``sym_size(t, 0)``),
    else None."""
    if not isinstance(size, Node):
        return None
    if size.op == "call_function" and size.target is aten.sym_size.int and size.args[1] == 0:
        return size.args[0]
    if size.op == "call_method" and size.target == "size" and size.args[1:] == (0,):
        return size.args[0]
    if size.op == "call_function" and size.target is operator.getitem and size.args[1] == 0:
        shape = size.args[0]
        if isinstance(shape, Node) and ((shape.op == "call_function" and shape.target is getattr
                                         and shape.args[1] == "shape")
                                        or (shape.op == "call_method" and shape.target == "size"
                                            and len(shape.args) == 1)):
            return shape.args[0]
    return None


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple((value.q if isinstance(value, IntValue) else value).shape)


@register_op
class Expand(OpDef):
    """``x.expand(*sizes)`` and ATen ``expand`` (see the module docstring)."""

    names = ("expand",)
    functions = (aten.expand.default,)
    methods = ("expand",)
    keeps_integers = True
    sign = "preserving"
    numerics_tests = ("tests/test_ops_vit.py::test_tiny_vit_goes_through_every_stage",)

    def describe(self, gm: GraphModule, node: Node, frozen: bool) -> IntNode:
        sizes = list(node.args[1:]) if node.op == "call_method" else node.args[1]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = list(sizes[0])
        traced = traced_shape(node)
        source = node.args[0]
        inputs, resolved = [source.name], []
        for i, size in enumerate(sizes):
            batch = batch_of(size) if i == 0 else None
            if isinstance(size, int):
                resolved.append(size)
            elif batch is not None:
                inputs.append(batch.name)
                resolved.append(None)
            elif traced is not None and len(traced) == len(sizes):
                resolved.append(traced[i])
            else:
                raise Unsupported(f"expand to a size computed at run time ({size}) without the traced shapes")
        return IntNode(node.name, "expand", inputs, {"sizes": resolved})

    def output_is_integer(self, node, integer_inputs):
        return integer_inputs[0]  # the batch reference only lends its size

    @staticmethod
    def sizes(node: IntNode, batch: int | None) -> list[int]:
        return [batch if size is None else size for size in node.attrs["sizes"]]

    def evaluate(self, program, node, env):
        batch = _shape_of(env[node.inputs[1]])[0] if len(node.inputs) > 1 else None
        sizes = self.sizes(node, batch)
        return move(env[node.inputs[0]], lambda t: t.expand(sizes))

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _shape

        batch = _shape(lowering.env[node.inputs[1]].expr)[0] if len(node.inputs) > 1 else None
        sizes = self.sizes(node, batch)

        def expr_fn(expr):
            shape = list(torch.empty(_shape(expr), device="meta").expand(sizes).shape)
            return R.broadcast_to(expr, shape)

        return relax_move(lowering, lowering.env[node.inputs[0]], expr_fn, lambda t: t.expand(sizes))

    def onnx(self, builder, node):
        from onnx import numpy_helper

        label = builder.label(node)
        sizes = [1 if size == -1 else size for size in node.attrs["sizes"]]

        def constant(name: str, values: list[int]) -> str:
            return builder.initializer(numpy_helper.from_array(np.array(values, dtype=np.int64), f"{label}.{name}"))

        if None in sizes:
            at = sizes.index(None)
            builder.add("Shape", [node.inputs[1]], [f"{label}.full_shape"], f"{label}/Shape")
            builder.add("Slice", [f"{label}.full_shape", constant("start", [0]), constant("end", [1])],
                        [f"{label}.source_shape"], f"{label}/Slice")  # (Shape's start/end: opset 15 on)
            parts = []
            if at:
                parts.append(constant("before", sizes[:at]))
            parts.append(f"{label}.source_shape")
            if at + 1 < len(sizes):
                parts.append(constant("after", sizes[at + 1:]))
            builder.add("Concat", parts, [f"{label}.shape"], f"{label}/Concat", axis=0)
            shape = f"{label}.shape"
        else:
            shape = constant("shape", sizes)
        builder.add("Expand", [node.inputs[0], shape], [node.name], label)
        builder.rank[node.name] = len(sizes)

