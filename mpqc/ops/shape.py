"""Data movement: flatten (and the batch-flattening ``view``/``reshape``), cat; facts about the others.

``flatten`` keeps integers (and is a step of a requantisation region on floats); ``cat`` dequantizes its inputs
and concatenates fp32 values.
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import Node

from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, dequantize, register_op

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def is_batch_flatten(node: Node) -> bool:
    """``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x.flatten(1)`` or ATen ``view(x, [s0, -1])``."""
    if node.target == "flatten":
        return tuple(node.args[1:]) in ((1,), (1, -1)) or node.kwargs.get("start_dim") == 1
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], Node)


@register_op
class Flatten(OpDef):
    """``flatten(x, start_dim)`` with ``end_dim`` -1; ``view``/``reshape`` only as a batch flatten."""

    names = ("flatten",)
    modules = (nn.Flatten,)
    functions = (torch.flatten, aten.flatten.using_ints) + _VIEWS
    methods = ("flatten", "view", "reshape")
    keeps_integers = True
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = ("tests/test_tvm.py::test_less_common_ops_are_bit_exact",
                      "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits")

    def start_dim(self, gm, node: Node) -> int:
        """The flatten's ``start_dim``; raises :class:`Unsupported` for other reshapes."""
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if module.end_dim != -1:
                raise Unsupported("flatten with end_dim != -1")
            return module.start_dim
        if node.op == "call_function" and node.target in (torch.flatten, aten.flatten.using_ints):
            if arg(node, 2, "end_dim", -1) != -1:
                raise Unsupported("flatten with end_dim != -1")
            return arg(node, 1, "start_dim", 0)
        if not is_batch_flatten(node):
            kind = f"method .{node.target}()" if node.op == "call_method" else f"function {node.target}"
            raise Unsupported(f"{kind} other than a batch flatten")
        return 1

    def describe(self, gm, node, frozen):
        return IntNode(node.name, "flatten", [node.all_input_nodes[0].name], {"start_dim": self.start_dim(gm, node)})

    def evaluate(self, program, node, env):
        x, start = env[node.inputs[0]], node.attrs["start_dim"]
        if isinstance(x, IntValue):
            scale = x.scale.expand(1, *x.q.shape[1:]) if x.scale.dim() == x.q.dim() else x.scale
            return IntValue(torch.flatten(x.q, start), torch.flatten(scale, start) if scale.dim() else scale)
        return torch.flatten(x, start)

    def requantize_step(self, node, inputs, s_out):
        return torch.flatten(inputs[0], node.attrs["start_dim"])

    def relax(self, lowering, node):
        from mpqc.targets.tvm import NCHW, _flatten, _Float, _Int, _shape

        x, start = lowering.in_layout(lowering.env[node.inputs[0]], NCHW), node.attrs["start_dim"]
        flat = lowering.emit(_flatten(x.expr, start))
        if isinstance(x, _Int):
            shape = _shape(x.expr)
            scale = x.scale.expand(1, *shape[1:]) if x.scale.dim() == len(shape) else x.scale
            return _Int(flat, torch.flatten(scale, start) if scale.dim() else scale)
        return _Float(flat)

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        from mpqc.targets.tvm import NCHW, _flatten, _Float

        x = lowering.in_layout(inputs[0], NCHW)
        return _Float(lowering.emit(_flatten(x.expr, node.attrs["start_dim"])))

    def onnx(self, builder, node):
        import numpy as np
        from onnx import numpy_helper

        label, x, start = builder.label(node), node.inputs[0], node.attrs["start_dim"]
        rank = builder.rank.get(x)
        if start < 0:
            if rank is None:
                raise Unsupported(f"flatten(start_dim={start}) of a tensor of unknown rank: pass input_shapes")
            start += rank
        if start == 1:
            builder.add("Flatten", [x], [node.name], label, axis=1)
        else:  # torch.flatten(x, start): keep the first `start` dims (0 copies a dim in Reshape), merge the rest
            shape = builder.initializer(numpy_helper.from_array(np.array([0] * start + [-1], dtype=np.int64),
                                                                f"{label}.shape"))
            builder.add("Reshape", [x, shape], [node.name], label)
        builder.rank[node.name] = start + 1


@register_op
class Cat(OpDef):
    names = ("cat",)
    functions = (torch.cat, aten.cat.default)
    sign = "preserving"
    numerics_tests = ("tests/test_tvm.py::test_less_common_ops_are_bit_exact",
                      "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits")

    def describe(self, gm, node, frozen):
        tensors = node.args[0]
        if not isinstance(tensors, (list, tuple)):
            raise Unsupported("cat of a value that is not a list of tensors")
        return IntNode(node.name, "cat", [a.name for a in tensors], {"dim": arg(node, 1, "dim", 0)})

    def evaluate(self, program, node, env):
        return torch.cat([dequantize(env[n]) for n in node.inputs], node.attrs["dim"])

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import NCHW, _Float

        parts = [lowering.dequantize(lowering.in_layout(lowering.env[name], NCHW)) for name in node.inputs]
        return _Float(lowering.emit(R.concat(parts, axis=node.attrs["dim"])))

    def onnx(self, builder, node):
        builder.add("Concat", list(node.inputs), [node.name], builder.label(node), axis=node.attrs["dim"])
        builder.rank[node.name] = builder.rank.get(node.inputs[0])


# ------------------------------------------------------------------------- facts only (no integer semantics yet)
@register_op
class DataMovement(OpDef):
    """Indexing, permutations: they move values, so they keep the sign."""

    functions = (operator.getitem,)
    methods = ("permute", "transpose")
    sign = "preserving"


@register_op
class NonNegativeActivation(OpDef):
    """Softmax: nonnegative outputs (the sign inference needs it); no semantics yet (sigmoid and hardsigmoid are
    lookup tables: ``mpqc/ops/lookup.py``)."""

    modules = (nn.Softmax,)
    functions = (torch.nn.functional.softmax, torch.softmax, aten._softmax.default, aten.softmax.int)
    methods = ("softmax",)
    sign = "nonnegative"
