"""Arithmetic: products of two activations, multiplication and division by a Python number, subtraction, adding a
number.

``mul`` (``a * b`` of two graph tensors, broadcasting; squeeze-excitation's ``x * gate``; ConvNeXt's layer scale
    ``gamma * x``, a constant tensor and a value: no codes for the constant, the fp32 product)
    Both inputs integer, ``(q_a, s_a)`` and ``(q_b, s_b)``: the exact integer product ``IntValue(q_a * q_b,
    s_a * s_b)`` (int64 in the reference, refused beyond the int32 range; TVM multiplies in int32). Otherwise the
    fp32 product of the dequantized values (one rounding). Not a requantisation step: a ``quantize`` reads it as a
    leaf (``fp32(q_a * q_b) * fp32((s_a * s_b) / s_out)``).
``scale`` (``x * c``, ``c * x``, ``x / c`` with a Python number ``c``; ``factor`` is ``c`` or ``1 / c``, float64)
    On an integer value a change of scale only: ``IntValue(q, s * factor)``, or ``IntValue(-q, s * |factor|)`` for a
    negative factor (scales stay positive: max pooling and ReLU on codes need it). On a float value and as a
    requantisation step: ``y * fp32(factor)``.
``sub`` (``a - b`` of two graph tensors): as ``add``: fp32 ``a - b`` of the dequantized values; step ``y_a - y_b``.
``add_const`` (``x + c``, ``x - c``, ``c - x``; attrs ``constant`` and ``negate``)
    ``x + fp32(c)`` (``fp32(c) - x``) on the dequantized value; step ``y + fp32(c / s_out)`` (``fp32(c / s_out) -
    y``). Hardswish written by hand, ``x * F.relu6(x + 3) / 6``, is ``add_const``, ``clamp``, ``mul``, ``scale``.
``batch_norm``: see ``mpqc/ops/batchnorm.py``.

TVM computes every fp32 product as an exact multiply (``targets/tvm.py``'s ``_exact_mul_te``, never contracted into
an FMA with the sum that follows), so it rounds as the reference does. ONNX: a product of two quantized values is
``Cast`` of the codes to int32, ``Mul`` (exact), then ``DequantizeLinear`` at ``fp32(s_a * s_b)``; the other ops are
fp32 ``Mul``/``Add``/``Sub`` on dequantized values (within the contract's 1 LSB).
"""
from __future__ import annotations

import math
import operator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from mpqc.errors import MpqcError
from mpqc.ops.layers import INT32_MAX, largest_magnitude
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, dequantize, is_bookkeeping, register_op

aten = torch.ops.aten

TESTS = ("tests/test_ops_arith.py::test_arithmetic_is_bit_exact_on_tvm",
         "tests/test_ops_arith.py::test_onnxruntime_agrees_on_arithmetic",
         "tests/test_ops_arith.py::test_reference_agrees_with_fake_quant",
         "tests/test_ops_arith.py::test_float_and_broadcast_operands_on_a_hand_built_program")


# --------------------------------------------------------------------------------------------- fx operands
def _operands(node: Node, what: str) -> tuple[Any, Any]:
    """``(a, b)`` of a binary call (function or method); refuses ``alpha``/``rounding_mode``/``out`` and the like."""
    args = list(node.args)
    kwargs = dict(node.kwargs)
    for name, neutral in (("alpha", 1), ("rounding_mode", None)):
        if kwargs.get(name, neutral) != neutral:
            raise Unsupported(f"{what} with {name}={kwargs[name]!r}")
        kwargs.pop(name, None)
    if len(args) == 3 and args[2] == 1 and node.target in (aten.add.Tensor, aten.sub.Tensor, aten.rsub.Scalar):
        args = args[:2]  # alpha=1 given positionally
    if "other" in kwargs:
        args.append(kwargs.pop("other"))
    if len(args) != 2 or kwargs:
        raise Unsupported(f"{what} with arguments {node.args} {node.kwargs} (two operands only)")
    return args[0], args[1]


def _number(value: Any, what: str) -> float:
    """A Python int/float operand as a float; anything else refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unsupported(f"{what} with the {type(value).__name__} operand {value!r} (only a Python number or a "
                          "graph tensor)")
    if not math.isfinite(value):
        raise Unsupported(f"{what} with {value!r}")
    return float(value)


def _tensor_operands(gm: GraphModule, what: str, *values: Any, constants: bool = False) -> list[Node]:
    """The operands that are graph tensors; a constant tensor (``get_attr``; allowed with ``constants``: a float
    value of the program) or a shape value is refused."""
    tensors = [v for v in values if isinstance(v, Node)]
    for v in tensors:
        if v.op == "get_attr" and not constants:
            raise Unsupported(f"{what} with a constant tensor operand {v.target!r} (only a Python number or a "
                              "graph tensor computed from the inputs)")
        if is_bookkeeping(gm, v):
            raise Unsupported(f"{what} with a shape value {v.name} (only a Python number or a graph tensor)")
    return tensors


def _scale_node(node: Node, x: Node, factor: float) -> IntNode:
    if factor == 0.0:
        raise Unsupported("multiplication by 0")
    return IntNode(node.name, "scale", [x.name], {"factor": factor})


def nonnegative_with_constants(node: Node, inputs_nonnegative, positive: bool = False) -> bool:
    constants = [a for a in node.args if not isinstance(a, Node)]
    ok = all(isinstance(c, (int, float)) and (c > 0 if positive else c >= 0) for c in constants)
    return ok and inputs_nonnegative()


def sum_node(gm: GraphModule, node: Node, *, subtract: bool = False) -> IntNode:
    """``a + b`` (``subtract``: ``a - b``) of two graph tensors as an ``add`` (``sub``) node; with a Python number
    ``c``: ``x + c``, ``c + x``, ``x - c``, ``c - x`` (ATen ``rsub(x, c)``) as an ``add_const`` node."""
    what = "subtraction" if subtract else "addition"
    a, b = _operands(node, what)
    if node.target is aten.rsub.Scalar:
        a, b = b, a  # rsub(x, c) = c - x
    tensors = _tensor_operands(gm, what, a, b, constants=True)  # x + table: a float leaf (position embeddings)
    if len(tensors) == 2:
        return IntNode(node.name, "sub" if subtract else "add", [a.name, b.name])
    if not tensors:
        raise Unsupported(f"{what} of two numbers")
    x, constant = (a, b) if isinstance(a, Node) else (b, a)
    c = _number(constant, what)
    negate = subtract and x is b  # c - x
    if subtract and not negate:
        c = -c
    return IntNode(node.name, "add_const", [x.name], {"constant": c, "negate": negate})


class TensorSum(OpDef):
    """``a + b`` (``subtract``: ``a - b``) of two graph tensors, broadcasting: dequantized and summed in fp32 (on
    integers), or a step of the requantisation region; with a Python number, ``add_const`` (``sum_node``).
    ``Add`` (``mpqc/ops/elementwise.py``) and ``Sub`` (below) are its two registered families."""

    subtract: ClassVar[bool] = False
    fuses_into_requantize = True
    keeps_shape = True

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        return a - b if self.subtract else a + b

    def describe(self, gm, node, frozen):
        return sum_node(gm, node, subtract=self.subtract)  # alpha refused

    def evaluate(self, program, node, env):
        return self._combine(dequantize(env[node.inputs[0]]), dequantize(env[node.inputs[1]]))

    def requantize_step(self, node, inputs, s_out):
        return self._combine(inputs[0], inputs[1])

    def _relax_sum(self, lowering, a, b):
        from tvm.relax import op as R

        return lowering.emit((R.subtract if self.subtract else R.add)(a, b))

    def relax(self, lowering, node):
        from mpqc.targets.tvm import _Float

        (a, b), layout = common_layout(lowering, [lowering.env[name] for name in node.inputs])
        return _Float(self._relax_sum(lowering, lowering.dequantize(a), lowering.dequantize(b)), layout)

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        from mpqc.targets.tvm import _Float

        (a, b), layout = common_layout(lowering, inputs)
        return _Float(self._relax_sum(lowering, a.expr, b.expr), layout)

    def onnx(self, builder, node):
        builder.add("Sub" if self.subtract else "Add", list(node.inputs), [node.name], builder.label(node))
        ranks = [builder.rank.get(name) for name in node.inputs]
        builder.rank[node.name] = None if None in ranks else max(ranks)


# --------------------------------------------------------------------------------------------- fx families
@register_op
class Mul(OpDef):
    """``a * b``: two graph tensors -> ``mul`` (one of them may be a constant tensor: a float operand, the fp32
    product); a tensor and a Python number -> ``scale``."""

    names = ("mul",)
    functions = (operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar)
    methods = ("mul",)
    keeps_integers = True  # a product of integers, or an integer rescaled: output_is_integer says which
    keeps_shape = True
    quantized_inputs = (0, 1)
    multiplies_operands = True
    numerics_tests = TESTS

    def is_nonnegative(self, gm, node, inputs_nonnegative):
        return nonnegative_with_constants(node, inputs_nonnegative)

    def zero_preserving(self, gm, node):
        return sum(isinstance(a, Node) for a in node.args) == 1  # x * c: 0 stays 0 in every channel

    def quantized_operands(self, gm, node):
        tensors = [a for a in node.args if isinstance(a, Node)]
        if len(tensors) != 2 or is_bookkeeping(gm, node) or any(t.op == "get_attr" for t in tensors):
            return []  # shape values compute no tensor; a constant factor is refused by ``describe``
        return tensors  # x * c is a scale change: integer or float, no codes needed

    def describe(self, gm, node, frozen):
        a, b = _operands(node, "multiplication")
        tensors = _tensor_operands(gm, "multiplication", a, b, constants=True)  # x * table: ConvNeXt's layer scale
        if len(tensors) == 2:
            return IntNode(node.name, "mul", [a.name, b.name])
        if not tensors:
            raise Unsupported("multiplication of two numbers")
        x, constant = (a, b) if isinstance(a, Node) else (b, a)
        return _scale_node(node, x, _number(constant, "multiplication"))

    def output_is_integer(self, node, integer_inputs):
        return bool(integer_inputs) and all(integer_inputs)

    def evaluate(self, program, node, env):
        a, b = (env[name] for name in node.inputs)
        if isinstance(a, IntValue) and isinstance(b, IntValue):
            q = a.q * b.q
            if largest_magnitude(q) > INT32_MAX:
                raise MpqcError(f"node {node.name!r}: the product of two integer values reached "
                                f"{largest_magnitude(q)}, beyond the int32 range the integer contract guarantees "
                                "(quantize the inputs of the product)")
            return IntValue(q, a.scale * b.scale)
        return dequantize(a) * dequantize(b)

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _dtype, _Float, _Int

        (a, b), layout = common_layout(lowering, [lowering.env[name] for name in node.inputs])
        if isinstance(a, _Int) and isinstance(b, _Int):
            wide = "int64" if "int64" in (_dtype(a.expr), _dtype(b.expr)) else "int32"
            qa, qb = (v.expr if _dtype(v.expr) == wide else lowering.emit(R.astype(v.expr, wide)) for v in (a, b))
            return _Int(lowering.emit(R.multiply(qa, qb)), a.scale * b.scale, layout)
        return _Float(exact_product(lowering, lowering.dequantize(a), lowering.dequantize(b)), layout)

    def onnx(self, builder, node):
        from onnx import TensorProto, numpy_helper

        from mpqc.targets.onnx import _float_tensor

        label = builder.label(node)
        infos = [builder.quantizers.get(name) for name in node.inputs]
        ranks = [builder.rank.get(name) for name in node.inputs]
        builder.rank[node.name] = None if None in ranks else max(ranks)
        if None in infos:  # a value without codes (an accumulator, a float): the fp32 product
            builder.add("Mul", list(node.inputs), [node.name], label)
            return
        codes = []
        for side, info in zip("ab", infos):  # the exact integers: codes - zero point, in int32
            wide = f"{label}.{side}.int32"
            builder.add("Cast", [info["tensor"]], [wide], f"{label}/{side}/Cast", to=TensorProto.INT32)
            if info["zero_point"]:
                zero = builder.initializer(numpy_helper.from_array(np.array(info["zero_point"], np.int32),
                                                                   f"{label}.{side}.zero_point"))
                builder.add("Sub", [wide, zero], [f"{label}.{side}.q"], f"{label}/{side}/Sub")
                wide = f"{label}.{side}.q"
            codes.append(wide)
        product = f"{label}.product"
        builder.add("Mul", codes, [product], label)
        product_scale = float(infos[0]["scale"]) * float(infos[1]["scale"])  # float64, as the reference's
        builder.products[node.name] = (product, torch.tensor(product_scale, dtype=torch.float64))
        scale = builder.initializer(_float_tensor(product_scale, f"{label}.product_scale"))
        zero = builder.initializer(numpy_helper.from_array(np.array(0, np.int32), f"{label}.product_zero_point"))
        builder.add("DequantizeLinear", [product, scale, zero], [node.name], f"{label}/DequantizeLinear")
        builder.bits[product] = 32


@register_op
class Div(OpDef):
    """``x / c`` with a Python number ``c`` -> ``scale`` by ``1 / c``; division by a tensor is refused."""

    functions = (operator.truediv, torch.div, torch.true_divide, aten.div.Tensor, aten.div.Scalar)
    methods = ("div",)
    keeps_integers = True
    keeps_zero = True
    keeps_shape = True

    def is_nonnegative(self, gm, node, inputs_nonnegative):
        return nonnegative_with_constants(node, inputs_nonnegative, positive=True)

    def describe(self, gm, node, frozen):
        a, b = _operands(node, "division")
        _tensor_operands(gm, "division", a, b)
        if isinstance(b, Node) or not isinstance(a, Node):
            raise Unsupported("division by a tensor (only by a Python number)")
        divisor = _number(b, "division")
        if divisor == 0.0:
            raise Unsupported("division by 0")
        return _scale_node(node, a, 1.0 / divisor)


@register_op
class Sub(TensorSum):
    """``a - b``: two graph tensors -> ``sub``; with a Python number -> ``add_const``."""

    names = ("sub",)
    functions = (operator.sub, torch.sub, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar)
    methods = ("sub",)
    subtract = True
    numerics_tests = TESTS


# --------------------------------------------------------------------------------------------- program-only ops
@register_op
class Scale(OpDef):
    """``x * factor`` (from ``Mul`` and ``Div``): a scale change on integers, ``y * fp32(factor)`` on floats."""

    names = ("scale",)
    keeps_integers = True
    fuses_into_requantize = True
    keeps_shape = True
    numerics_tests = TESTS

    def evaluate(self, program, node, env):
        x, factor = env[node.inputs[0]], node.attrs["factor"]
        if isinstance(x, IntValue):
            return IntValue(x.q if factor > 0 else -x.q, x.scale * abs(factor))
        return x * torch.tensor(factor, dtype=torch.float32)

    def requantize_step(self, node, inputs, s_out):
        return inputs[0] * torch.tensor(node.attrs["factor"], dtype=torch.float32)

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _dtype, _Float, _Int

        x, factor = lowering.env[node.inputs[0]], node.attrs["factor"]
        if isinstance(x, _Int):
            expr = x.expr
            if factor < 0:
                if _dtype(expr) == "uint8":
                    expr = lowering.emit(R.astype(expr, "int32"))
                expr = lowering.emit(R.negative(expr))  # codes are symmetric: -q fits the same type
            return _Int(expr, x.scale * abs(factor), x.layout)
        return _Float(lowering.mul(x.expr, torch.tensor(factor, dtype=torch.float32)), x.layout)

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        from mpqc.targets.tvm import _Float

        x = inputs[0]
        return _Float(lowering.mul(x.expr, torch.tensor(node.attrs["factor"], dtype=torch.float32)), x.layout)

    def onnx(self, builder, node):
        from mpqc.targets.onnx import _float_tensor

        label = builder.label(node)
        factor = builder.initializer(_float_tensor(node.attrs["factor"], f"{label}.factor"))
        builder.add("Mul", [node.inputs[0], factor], [node.name], label)
        builder.rank[node.name] = builder.rank.get(node.inputs[0])


@register_op
class AddConst(OpDef):
    """``x + c`` or ``c - x`` (``negate``) with a Python number ``c`` (from ``Add`` and ``Sub``)."""

    names = ("add_const",)
    fuses_into_requantize = True
    keeps_shape = True
    numerics_tests = TESTS

    @staticmethod
    def _apply(x, c, negate: bool):
        return c - x if negate else x + c

    def evaluate(self, program, node, env):
        c = torch.tensor(node.attrs["constant"], dtype=torch.float32)
        return self._apply(dequantize(env[node.inputs[0]]), c, node.attrs["negate"])

    def requantize_step(self, node, inputs, s_out):
        c = torch.tensor(node.attrs["constant"] / s_out, dtype=torch.float32)
        return self._apply(inputs[0], c, node.attrs["negate"])

    def _relax(self, lowering, x, layout, constant: float, negate: bool):
        from tvm import relax
        from tvm.relax import op as R

        from mpqc.targets.tvm import _Float

        c = relax.const(np.float32(constant))
        return _Float(lowering.emit(R.subtract(c, x) if negate else R.add(x, c)), layout)

    def relax(self, lowering, node):
        value = lowering.env[node.inputs[0]]
        return self._relax(lowering, lowering.dequantize(value), value.layout, node.attrs["constant"],
                           node.attrs["negate"])

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        return self._relax(lowering, inputs[0].expr, inputs[0].layout, node.attrs["constant"] / s_out,
                           node.attrs["negate"])

    def onnx(self, builder, node):
        from mpqc.targets.onnx import _float_tensor

        label = builder.label(node)
        c = builder.initializer(_float_tensor(node.attrs["constant"], f"{label}.constant"))
        x = node.inputs[0]
        builder.add("Sub", [c, x], [node.name], label) if node.attrs["negate"] else builder.add(
            "Add", [x, c], [node.name], label)
        builder.rank[node.name] = builder.rank.get(x)


# --------------------------------------------------------------------------------------------- TVM helpers
def common_layout(lowering, values: list) -> tuple[list, str]:
    """``values`` in one layout for a broadcasting binary op: channels-last when all are rank 4 and one is
    already channels-last, else the program's NCHW (broadcasting aligns trailing dims, so a lower-rank operand
    must see the program's layout)."""
    from mpqc.targets.tvm import NCHW, NHWC, _shape

    ranks = {len(_shape(v.expr)) for v in values}
    layout = NHWC if ranks == {4} and any(v.layout == NHWC for v in values) else NCHW
    return [lowering.in_layout(v, layout) for v in values], layout


def exact_product(lowering, a, b):
    """fp32 ``a * b`` (NumPy broadcasting), rounded once and never contracted into an FMA."""
    from tvm.relax import op as R

    from mpqc.targets.tvm import _exact_mul_te, _shape

    out = list(np.broadcast_shapes(tuple(_shape(a)), tuple(_shape(b))))
    if _shape(a) != out:
        a, b = (b, a) if _shape(b) == out else (lowering.emit(R.broadcast_to(a, out)), b)
    return lowering.bb.emit_te(_exact_mul_te, a, b, mode=lowering.mode, primfunc_name_hint="exact_mul")
