"""Elementwise ops: relu, clamp (ReLU6, Hardtanh), add, identity (Dropout and Identity in eval mode); products,
differences, constants and scale changes are in ``mpqc/ops/arith.py``.

``relu`` on an integer value stays integer (exact); ``clamp`` and ``add`` on integers dequantize
(``fp32(q) * fp32(s)``) and compute in fp32. Inside a requantisation region (units of ``s_out``): ``add`` sums,
``relu`` is ``max(y, 0)``, ``clamp(lo, hi)`` is ``min(max(y, fp32(lo / s_out)), fp32(hi / s_out))``.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from mpqc.ops.arith import TensorSum, nonnegative_with_constants
from mpqc.ops.registry import IntNode, Unsupported, IntValue, OpDef, arg, dequantize, register_op

aten = torch.ops.aten

_MIXED_BITS = ("tests/test_tvm.py::test_resnet20_is_bit_exact_with_the_reference",
               "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits",
               "tests/test_reference.py::test_integer_reference_agrees_with_fake_quant_at_mixed_bits")


def _onnx_unary(builder, node: IntNode, onnx_op: str, **attrs) -> None:
    builder.add(onnx_op, [node.inputs[0]], [node.name], builder.label(node), **attrs)
    builder.rank[node.name] = builder.rank.get(node.inputs[0])


@register_op
class ReLU(OpDef):
    names = ("relu",)
    modules = (nn.ReLU,)
    functions = (F.relu, torch.relu, aten.relu.default)
    methods = ("relu",)
    keeps_integers = True
    sign = "nonnegative"
    keeps_zero = True
    elementwise = True
    clamps = True
    fuses_into_requantize = True
    keeps_shape = True
    numerics_tests = _MIXED_BITS + ("tests/test_to_integer_program.py::test_residual_relu_region",)

    def evaluate(self, program, node, env):
        x = env[node.inputs[0]]
        return IntValue(x.q.clamp_min(0), x.scale) if isinstance(x, IntValue) else torch.relu(x)

    def requantize_step(self, node, inputs, s_out):
        return torch.relu(inputs[0])

    def relax(self, lowering, node):
        from tvm import relax
        from tvm.relax import op as R

        from mpqc.targets.tvm import _dtype, _Float, _Int

        x = lowering.env[node.inputs[0]]
        if isinstance(x, _Int):
            if _dtype(x.expr) == "uint8":
                return x
            return _Int(lowering.emit(R.maximum(x.expr, relax.const(0, _dtype(x.expr)))), x.scale, x.layout)
        return _Float(lowering.emit(R.nn.relu(x.expr)), x.layout)

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _Float

        return _Float(lowering.emit(R.nn.relu(inputs[0].expr)), inputs[0].layout)

    def onnx(self, builder, node):
        _onnx_unary(builder, node, "Relu")


@register_op
class Clamp(OpDef):
    """``clamp(x, min, max)``: ReLU6 and Hardtanh."""

    names = ("clamp",)
    modules = (nn.ReLU6, nn.Hardtanh)  # (nn.ReLU6 subclasses nn.Hardtanh)
    functions = (F.relu6, F.hardtanh, aten.hardtanh.default, aten.relu6.default)
    elementwise = True
    clamps = True
    fuses_into_requantize = True
    keeps_shape = True
    numerics_tests = _MIXED_BITS + ("tests/test_tvm.py::test_less_common_ops_are_bit_exact",)

    @staticmethod
    def bounds(gm, node: Node) -> tuple[float, float]:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            return float(module.min_val), float(module.max_val)
        if node.target in (F.relu6, aten.relu6.default):
            return 0.0, 6.0
        return float(arg(node, 1, "min_val", -1.0)), float(arg(node, 2, "max_val", 1.0))

    def is_nonnegative(self, gm, node, inputs_nonnegative):
        return self.bounds(gm, node)[0] >= 0

    def zero_preserving(self, gm, node):
        low, high = self.bounds(gm, node)
        return low <= 0 <= high

    def describe(self, gm, node, frozen):
        low, high = self.bounds(gm, node)
        return IntNode(node.name, "clamp", [node.all_input_nodes[0].name], {"min": low, "max": high})

    def evaluate(self, program, node, env):
        return torch.clamp(dequantize(env[node.inputs[0]]), node.attrs["min"], node.attrs["max"])

    def requantize_step(self, node, inputs, s_out):
        low = torch.tensor(node.attrs["min"] / s_out, dtype=torch.float32)
        high = torch.tensor(node.attrs["max"] / s_out, dtype=torch.float32)
        return torch.minimum(torch.maximum(inputs[0], low), high)

    def relax(self, lowering, node):
        from tvm import relax
        from tvm.relax import op as R

        from mpqc.targets.tvm import _Float

        value = lowering.env[node.inputs[0]]
        x = lowering.dequantize(value)
        low, high = np.float32(node.attrs["min"]), np.float32(node.attrs["max"])  # torch.clamp: scalar_t(min)
        return _Float(lowering.emit(R.minimum(R.maximum(x, relax.const(low)), relax.const(high))), value.layout)

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        from tvm import relax
        from tvm.relax import op as R

        from mpqc.targets.tvm import _Float

        x = inputs[0]
        low = relax.const(np.float32(node.attrs["min"] / s_out))
        high = relax.const(np.float32(node.attrs["max"] / s_out))
        return _Float(lowering.emit(R.minimum(R.maximum(x.expr, low), high)), x.layout)

    def onnx(self, builder, node):
        from mpqc.targets.onnx import _float_tensor

        label = builder.label(node)
        low = builder.initializer(_float_tensor(node.attrs["min"], f"{label}.min"))
        high = builder.initializer(_float_tensor(node.attrs["max"], f"{label}.max"))
        builder.add("Clip", [node.inputs[0], low, high], [node.name], label)
        builder.rank[node.name] = builder.rank.get(node.inputs[0])


@register_op
class Add(TensorSum):
    """``a + b`` of two graph tensors (a residual add, broadcasting); ``x + c`` with a Python number ``c`` is an
    ``add_const`` node (``mpqc/ops/arith.py``)."""

    names = ("add",)
    functions = (operator.add, torch.add, aten.add.Tensor, aten.add.Scalar)
    methods = ("add",)
    numerics_tests = _MIXED_BITS + ("tests/test_reference.py::test_residual_add_is_requantized_in_one_region",)

    def is_nonnegative(self, gm, node, inputs_nonnegative):
        return nonnegative_with_constants(node, inputs_nonnegative)


def _stochastic_depth() -> tuple:
    """torchvision's ``stochastic_depth`` (EfficientNet, ConvNeXt): the identity in eval mode."""
    try:
        from torchvision.ops.stochastic_depth import stochastic_depth
    except ImportError:  # torchvision is optional for the registry
        return ()
    return (stochastic_depth,)


@register_op
class Identity(OpDef):
    """Dropout and torchvision's stochastic depth (eval mode), Identity, ``clone``, ``contiguous``: the value
    itself."""

    names = ("identity",)
    modules = (nn.Dropout, nn.Identity)
    functions = (F.dropout, aten.dropout.default, aten.clone.default, aten.contiguous.default) + _stochastic_depth()
    methods = ("contiguous",)
    keeps_integers = True
    sign = "preserving"
    keeps_zero = True
    elementwise = True
    keeps_shape = True
    numerics_tests = ("tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits",
                      "tests/test_tvm.py::test_torchvision_models_are_bit_exact")

    def describe(self, gm, node, frozen):
        if node.target in _stochastic_depth() and arg(node, 3, "training", True):
            raise Unsupported("stochastic_depth in training mode (capture the model in eval mode)")
        return IntNode(node.name, "identity", [node.all_input_nodes[0].name])

    def evaluate(self, program, node, env):
        return env[node.inputs[0]]

    def relax(self, lowering, node):
        return lowering.env[node.inputs[0]]

    def onnx(self, builder, node):
        _onnx_unary(builder, node, "Identity")
