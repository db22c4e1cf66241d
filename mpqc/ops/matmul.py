"""Matmul between two activations (attention's ``Q @ K^T`` and ``P @ V``), batched and broadcasting: the exact
integer product of the codes, the kernel ``mpqc/integer_kernels/matmul.py``.

``matmul`` (program op): both operands are b-bit codes with per-tensor scales (``quantized_operands``: an
activation quantizer on each where it is not codes already, so each operand's bit-width is its own quantizer's);
the value is the int32 accumulator ``IntValue(q_a @ q_b, s_a * s_b)`` (refused beyond the int32 range), which the
quantizer that follows requantizes like a layer's accumulator. TVM: ``matmul`` of int32 operands with int32
output (exact). ONNX: ``QuantizeLinear`` of each operand at its own scale (its exact codes in UINT8 storage, zero
point 128 for signed codes), ``MatMulInteger`` (u8 x u8: exact on every x86 CPU), then ``DequantizeLinear`` at
``fp32(s_a * s_b)``: the reference's accumulator, requantized within the contract's 1 LSB.

fx forms: ``torch.matmul``, ``@``, ``torch.bmm``, ``Tensor.matmul`` / ``.bmm``, ATen ``matmul`` / ``bmm``. A
product with a parameter tensor is a linear layer written by hand and is refused (use ``nn.Linear``).
"""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch.fx import Node

from mpqc.errors import MpqcError
from mpqc.ops import kernel_bridge as kb
from mpqc.ops.layers import INT32_MAX, largest_magnitude
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, register_op

aten = torch.ops.aten

TESTS = ("tests/test_ops_transformer.py::test_transformer_ops_are_bit_exact_on_tvm",
         "tests/test_ops_transformer.py::test_transformer_ops_agree_with_onnxruntime",
         "tests/test_ops_transformer.py::test_hf_bert_goes_through_every_stage",
         "tests/test_ops_transformer.py::test_reference_agrees_with_fake_quant")


OPERAND_ATTRS = tuple(f"{side}_{key}" for side in "ab" for key in ("bits", "signed", "scale"))


def _operands(node: Node) -> tuple[Node, Node]:
    args = list(node.args) + [node.kwargs[k] for k in ("other", "mat2") if k in node.kwargs]
    if len(args) != 2 or node.kwargs.keys() - {"other", "mat2"}:
        raise Unsupported(f"matmul with arguments {node.args} {node.kwargs}")
    for value in args:
        if not isinstance(value, Node):
            raise Unsupported(f"matmul with the constant {value!r}")
        if value.op == "get_attr":
            raise Unsupported(f"matmul with the parameter tensor {value.target!r} (a linear layer: use nn.Linear)")
    return args[0], args[1]


@register_op
class Matmul(OpDef):
    """``a @ b`` of two activations (see the module docstring)."""

    names = ("matmul",)
    functions = (operator.matmul, torch.matmul, torch.bmm, aten.matmul.default, aten.bmm.default)
    methods = ("matmul", "bmm")
    quantized_inputs = (0, 1)
    multiplies_operands = True
    numerics_tests = TESTS

    def quantized_operands(self, gm, node):
        try:
            return list(_operands(node))
        except Unsupported:
            return []

    def product_macs(self, gm, node, output_elements):
        """Each output element sums ``K`` products: ``K`` is the first operand's last dimension."""
        meta = _operands(node)[0].meta.get("tensor_meta")
        return output_elements * int(meta.shape[-1]) if hasattr(meta, "shape") else output_elements

    def describe(self, gm, node, frozen):
        a, b = _operands(node)
        if not frozen:
            return IntNode(node.name, "matmul", [a.name, b.name])
        attrs = {**kb.input_attrs(*kb.frozen_codes(gm, a, "matmul"), prefix="a"),
                 **kb.input_attrs(*kb.frozen_codes(gm, b, "matmul"), prefix="b")}
        return IntNode(node.name, "matmul", [a.name, b.name], attrs)

    def output_is_integer(self, node, integer_inputs):
        return bool(integer_inputs) and all(integer_inputs)

    def evaluate(self, program, node, env):
        a, b = (env[name] for name in node.inputs)
        if not (isinstance(a, IntValue) and isinstance(b, IntValue)) or a.scale.numel() != 1 or b.scale.numel() != 1:
            raise MpqcError(f"matmul {node.name!r}: both operands must be per-tensor quantized values")
        q = torch.matmul(a.q.to(torch.int64), b.q.to(torch.int64))
        if largest_magnitude(q) > INT32_MAX:
            raise MpqcError(f"matmul {node.name!r}: the accumulator reached {largest_magnitude(q)}, beyond the "
                            "int32 range the integer contract guarantees")
        return IntValue(q, (a.scale * b.scale).reshape(()))

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import NCHW, _Int

        a, b = (lowering.in_layout(lowering.env[name], NCHW) for name in node.inputs)
        if not (isinstance(a, _Int) and isinstance(b, _Int)) or a.scale.numel() != 1 or b.scale.numel() != 1:
            raise MpqcError(f"matmul {node.name!r}: both operands must be per-tensor quantized values")
        acc = lowering.emit(R.matmul(R.astype(a.expr, "int32"), R.astype(b.expr, "int32"), out_dtype="int32"))
        return _Int(acc, (a.scale * b.scale).reshape(()), NCHW)

    def relax_check(self, node):
        return kb.relax_check_codes(node, OPERAND_ATTRS)

    def onnx(self, builder, node):
        kb.require_attrs(node, OPERAND_ATTRS)
        graph = kb.BuilderGraph(builder, builder.label(node))
        at = node.attrs
        (a, a_zero), (b, b_zero) = [kb.onnx_storage_codes(graph, name, at[f"{p}_bits"], at[f"{p}_signed"],
                                                           at[f"{p}_scale"]) for name, p in zip(node.inputs, "ab")]
        zeros = [graph.const(np.uint8(zero), f"{p}_zero_point") for zero, p in ((a_zero, "a"), (b_zero, "b"))]
        acc = graph.node("MatMulInteger", [a, b, *zeros])  # operands are <= 8 bits (OpDef.operand_bits): UINT8
        builder.bits[acc] = 32
        scale = float(np.float64(at["a_scale"]) * np.float64(at["b_scale"]))
        kb.onnx_value(graph, acc, scale, node.name)
        ranks = [builder.rank.get(name) for name in node.inputs]
        builder.rank[node.name] = None if None in ranks else max(ranks)
