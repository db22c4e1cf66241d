"""Joining and padding: cat, stack, constant padding.

All keep integers exact (see ``mpqc/ops/movement.py`` for how a scale moves with its codes):

* ``cat`` / ``stack`` of integer values: the codes joined, the scales joined alongside (a per-tensor scale becomes
  per channel where the inputs' scales differ along the joined dim), so nothing is rounded; the quantize node
  that follows requantizes the joined value to its one scale in its region, each channel with its own multiplier
  ``fp32(s_c / s_out)``. With a float input the result is float: the inputs dequantized and joined; inside a
  region each input enters in units of ``s_out`` (an integer input as ``q * M``, one rounding) and the step joins
  them.
* ``pad``: constant padding (``F.pad``, ``nn.ZeroPad2d``, ``nn.ConstantPad*d``); on an integer value only the
  value 0 (exact: a code 0), the scale extended by its edge values; negative pads crop. Inside a region the
  value is ``fp32(value / s_out)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpqc.errors import MpqcError
from mpqc.ops.movement import MOVEMENT_TESTS
from mpqc.ops.scales import broadcast_scale, compact_scale, move, moved_scale, relax_move
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, dequantize, register_op

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------- cat / stack
def joined_scale(scales: Sequence[Tensor], shapes: Sequence[Sequence[int]], dim: int) -> Tensor:
    """The scale of integer values (``scales``, of ``shapes``) concatenated along ``dim``: their common scale where
    they share one that is constant along ``dim``, else the scales broadcast to their values and concatenated."""
    compact = [compact_scale(s) for s in scales]
    first = compact[0]
    at = dim % len(shapes[0]) - (len(shapes[0]) - first.dim())  # ``dim`` in the scale's dims (< 0: broadcast)
    if all(s.shape == first.shape and torch.equal(s, first) for s in compact) and (at < 0 or first.shape[at] == 1):
        return first
    return compact_scale(torch.cat([broadcast_scale(s, shape) for s, shape in zip(scales, shapes)], dim))


@register_op
class Cat(OpDef):
    """``torch.cat`` and ``torch.stack`` (``stack``: each input unsqueezed at ``dim``, then joined)."""

    names = ("cat", "stack")
    functions = (torch.cat, torch.concat, aten.cat.default, torch.stack, aten.stack.default)
    keeps_integers = True  # when every input is integer (passes/to_integer_program.py: integer_values)
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = MOVEMENT_TESTS + ("tests/test_tvm.py::test_less_common_ops_are_bit_exact",
                                       "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits")

    def describe(self, gm, node, frozen):
        tensors = node.args[0]
        if not isinstance(tensors, (list, tuple)):
            raise Unsupported("cat of a value that is not a list of tensors")
        op = "stack" if node.target in (torch.stack, aten.stack.default) else "cat"
        return IntNode(node.name, op, [a.name for a in tensors], {"dim": arg(node, 1, "dim", 0)})

    def evaluate(self, program, node, env):
        dim = node.attrs["dim"]
        values = [env[name] for name in node.inputs]
        if node.op == "stack":
            values = [move(v, lambda t: t.unsqueeze(dim)) for v in values]
        if all(isinstance(v, IntValue) for v in values):
            return IntValue(torch.cat([v.q for v in values], dim),
                            joined_scale([v.scale for v in values], [v.q.shape for v in values], dim))
        return torch.cat([dequantize(v) for v in values], dim)

    def requantize_step(self, node, inputs, s_out):
        join = torch.stack if node.op == "stack" else torch.cat
        return join(inputs, node.attrs["dim"])

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _dtype, _Float, _Int, _shape

        values = self._unsqueezed(lowering, node, [lowering.env[name] for name in node.inputs])
        dim = node.attrs["dim"] % len(_shape(values[0].expr))
        if all(isinstance(v, _Int) for v in values):
            dtypes = {_dtype(v.expr) for v in values}
            common = dtypes.pop() if len(dtypes) == 1 else "int64" if "int64" in dtypes else "int32"
            exprs = [v.expr if _dtype(v.expr) == common else R.astype(v.expr, common) for v in values]
            scale = joined_scale([v.scale for v in values], [_shape(v.expr) for v in values], dim)
            return _Int(lowering.emit(R.concat(exprs, axis=dim)), scale)
        return _Float(lowering.emit(R.concat([lowering.dequantize(v) for v in values], axis=dim)))

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _Float, _shape

        values = self._unsqueezed(lowering, node, inputs)
        dim = node.attrs["dim"] % len(_shape(values[0].expr))
        return _Float(lowering.emit(R.concat([v.expr for v in values], axis=dim)))

    @staticmethod
    def _unsqueezed(lowering, node: IntNode, values: list) -> list:
        """The inputs in NCHW layout, each unsqueezed at ``dim`` for a ``stack``."""
        from tvm.relax import op as R

        from mpqc.targets.tvm import NCHW

        values = [lowering.in_layout(v, NCHW) for v in values]
        if node.op != "stack":
            return values
        dim = node.attrs["dim"]
        return [relax_move(lowering, v, lambda e: R.expand_dims(e, dim), lambda t: t.unsqueeze(dim)) for v in values]

    def onnx(self, builder, node):
        from onnx import numpy_helper

        label, dim, inputs = builder.label(node), node.attrs["dim"], list(node.inputs)
        rank = builder.rank.get(inputs[0])
        if node.op == "stack":
            axes = builder.initializer(numpy_helper.from_array(np.array([dim], dtype=np.int64), f"{label}.axes"))
            for i, name in enumerate(inputs):
                builder.add("Unsqueeze", [name, axes], [f"{label}.{i}"], f"{label}/Unsqueeze{i}")
            inputs = [f"{label}.{i}" for i in range(len(inputs))]
            rank = None if rank is None else rank + 1
        builder.add("Concat", inputs, [node.name], label, axis=dim)
        builder.rank[node.name] = rank


# --------------------------------------------------------------------------------------------- pad
def edge_padded(t: Tensor, pad: Sequence[int]) -> Tensor:
    """``t`` padded as ``F.pad(t, pad)`` pads, with copies of its edge values (negative pads crop)."""
    for i in range(len(pad) // 2):
        dim = t.dim() - 1 - i
        for before, amount in ((True, pad[2 * i]), (False, pad[2 * i + 1])):
            size = t.shape[dim]
            if amount < 0:
                t = t.narrow(dim, -amount if before else 0, size + amount)
            elif amount > 0:
                edge = t.narrow(dim, 0 if before else size - 1, 1)
                edges = edge.expand(*t.shape[:dim], amount, *t.shape[dim + 1:])
                t = torch.cat([edges, t] if before else [t, edges], dim)
    return t


@register_op
class Pad(OpDef):
    """Constant padding; other modes (reflect, replicate, circular) are refused."""

    names = ("pad",)
    modules = (nn.modules.padding._ConstantPadNd,)
    functions = (F.pad, aten.pad.default, aten.constant_pad_nd.default)
    keeps_integers = True
    fuses_into_requantize = True
    numerics_tests = MOVEMENT_TESTS

    @staticmethod
    def value(gm, node) -> float:
        if node.op == "call_module":
            return float(gm.get_submodule(node.target).value)
        if node.target is aten.constant_pad_nd.default:
            return float(arg(node, 2, "value", 0.0))
        return float(arg(node, 3, "value", None) or 0.0)

    def is_nonnegative(self, gm, node, inputs_nonnegative):
        return self.value(gm, node) >= 0 and inputs_nonnegative()

    def describe(self, gm, node, frozen):
        if node.op == "call_module":
            pad = list(gm.get_submodule(node.target).padding)
        else:
            pad = list(arg(node, 1, "pad", ()))
            mode = "constant" if node.target is aten.constant_pad_nd.default else arg(node, 2, "mode", "constant")
            if mode != "constant":
                raise Unsupported(f"padding mode {mode!r} (constant padding only)")
        if not all(isinstance(p, int) for p in pad) or len(pad) % 2:
            raise Unsupported(f"padding {pad}")
        return IntNode(node.name, "pad", [node.all_input_nodes[0].name], {"pad": pad, "value": self.value(gm, node)})

    @staticmethod
    def check(node: IntNode, integer: bool) -> None:
        if integer and node.attrs["value"] != 0:
            raise MpqcError(f"node {node.name!r}: padding an integer value with {node.attrs['value']} (only 0 is "
                            "a code of every scale); quantize after the padding")

    def evaluate(self, program, node, env):
        x, pad = env[node.inputs[0]], node.attrs["pad"]
        if isinstance(x, IntValue):
            self.check(node, True)
            return IntValue(F.pad(x.q, pad), moved_scale(x.scale, x.q.shape, lambda t: edge_padded(t, pad)))
        return F.pad(x, pad, value=node.attrs["value"])

    @staticmethod
    def units(node: IntNode, s_out: float) -> float:
        return float(np.float32(node.attrs["value"] / s_out))

    def requantize_step(self, node, inputs, s_out):
        return F.pad(inputs[0], node.attrs["pad"], value=self.units(node, s_out))

    def relax(self, lowering, node):
        from mpqc.targets.tvm import _Int

        value = lowering.env[node.inputs[0]]
        self.check(node, isinstance(value, _Int))
        return self._relax(lowering, node, value, node.attrs["value"])

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        return self._relax(lowering, node, inputs[0], self.units(node, s_out))

    def _relax(self, lowering, node, value, pad_value: float):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _shape

        pad = node.attrs["pad"]

        def expr_fn(expr):
            shape = _shape(expr)
            widths = [[0, 0] for _ in shape]
            axes, begin, end = [], [], []
            for i in range(len(pad) // 2):
                dim = len(shape) - 1 - i
                before, after = pad[2 * i], pad[2 * i + 1]
                if before < 0 or after < 0:
                    axes.append(dim), begin.append(max(-before, 0)), end.append(shape[dim] - max(-after, 0))
                widths[dim] = [max(before, 0), max(after, 0)]
            if axes:
                expr = R.strided_slice(expr, axes, begin, end)
            if any(w != [0, 0] for w in widths):
                expr = R.nn.pad(expr, [w for pair in widths for w in pair], "constant", pad_value)
            return expr

        return relax_move(lowering, value, expr_fn, lambda t: edge_padded(t, pad))

    def onnx(self, builder, node):
        from onnx import numpy_helper

        from mpqc.targets.onnx import _float_tensor

        label, pad, x = builder.label(node), node.attrs["pad"], node.inputs[0]
        count = len(pad) // 2
        pads = [pad[2 * i] for i in range(count)] + [pad[2 * i + 1] for i in range(count)]
        inputs = [x, builder.initializer(numpy_helper.from_array(np.array(pads, dtype=np.int64), f"{label}.pads")),
                  builder.initializer(_float_tensor(node.attrs["value"], f"{label}.value"))]
        rank = builder.rank.get(x)
        if builder.opset >= 18:  # axes: the padded dims, last first as F.pad lists them
            inputs.append(builder.initializer(numpy_helper.from_array(
                np.array([-1 - i for i in range(count)], dtype=np.int64), f"{label}.axes")))
        elif rank is None:
            raise Unsupported("padding a tensor of unknown rank below opset 18: pass input_shapes")
        else:
            full = [0] * (2 * rank)
            for i in range(count):
                full[rank - 1 - i], full[2 * rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
            inputs[1] = builder.initializer(numpy_helper.from_array(np.array(full, dtype=np.int64),
                                                                    f"{label}.pads_all"))
        builder.add("Pad", inputs, [node.name], label, mode="constant")
        builder.rank[node.name] = rank

