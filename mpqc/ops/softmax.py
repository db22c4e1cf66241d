"""Softmax over any dim on b-bit codes, masked or not: the kernel ``mpqc/integer_kernels/softmax.py`` (an exp table
over the code distance from the row maximum, exact for <= 8-bit codes, then integer normalization).

``softmax`` (program op): input codes (``in_bits`` <= 8, sign, scale ``s_in``) from the input quantizer
(``quantized_inputs``), output codes (unsigned ``bits``, scale ``s_out``) for the output quantizer
(``quantized_output``), which passes them through (multiplier 1). An optional second input is a boolean *keep*
mask broadcasting against the scores (False: the entry is masked out and contributes exactly 0; a fully masked row
gives zeros). The reference, TVM and onnxruntime run the same integer arithmetic: bit for bit equal.

fx forms: ``nn.Softmax``, ``F.softmax``, ``torch.softmax``, ``Tensor.softmax``, ATen ``_softmax`` /
``softmax.int``; and :func:`masked_softmax` (what ``passes/decompose_attention.py`` writes for an attention mask).
Masks: :func:`key_padding_mask` (program op ``key_padding_mask``: a ``[B, S]`` 0/1 padding mask as the
``[B, 1, 1, S]`` keep mask, what ``passes/attention_masks.py`` writes for HF's mask construction) and
:func:`additive_mask_keep` (program op ``mask_keep``: an additive float mask of 0 and large negatives as a keep
mask, exact by construction; the reference refuses other values, which are a bias, not a mask). A keep mask may
also be a program ``constant`` (fp32 0/1: Swin's shifted-window mask, ``passes/constant_masks.py``); every backend
reads it as ``!= 0``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node

from mpqc.ops import kernel_bridge as kb
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, register_op
from mpqc.ops.scales import traced_shape

aten = torch.ops.aten

TESTS = ("tests/test_ops_transformer.py::test_transformer_ops_are_bit_exact_on_tvm",
         "tests/test_ops_transformer.py::test_transformer_ops_agree_with_onnxruntime",
         "tests/test_ops_transformer.py::test_hf_bert_goes_through_every_stage",
         "tests/test_ops_transformer.py::test_reference_agrees_with_fake_quant")
MASK_THRESHOLD = -1e4  # additive mask entries at or below this are masked out (integer_kernels.softmax)


# --------------------------------------------------------------------------------------------- fx functions
def masked_softmax(x: Tensor, keep: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``x`` over ``dim`` where ``keep`` (bool, broadcasting) is True; masked entries are 0, and a
    fully masked row is all zeros (the integer kernel's semantics)."""
    filled = x.masked_fill(~keep, float("-inf"))
    return torch.nan_to_num(torch.softmax(filled, dim), nan=0.0)


def key_padding_mask(mask: Tensor) -> Tensor:
    """A ``[B, S]`` padding mask (nonzero: a real token) as the ``[B, 1, 1, S]`` keep mask of attention scores."""
    return (mask != 0)[:, None, None, :]


def additive_mask_keep(mask: Tensor) -> Tensor:
    """The keep mask of an additive attention mask (0: keep, <= -1e4: masked out)."""
    return mask > MASK_THRESHOLD


def _dim(node: Node) -> int:
    if node.op == "call_module":
        raise AssertionError("modules are read by Softmax.describe")
    if node.target is masked_softmax:
        return int(arg(node, 2, "dim", -1))
    value = arg(node, 1, "dim", None)
    if value is None:
        raise Unsupported("softmax without a dim")
    return int(value)


# --------------------------------------------------------------------------------------------- softmax
@register_op
class Softmax(OpDef):
    """Softmax of codes over one dim, optionally masked (see the module docstring)."""

    names = ("softmax",)
    modules = (nn.Softmax,)
    functions = (F.softmax, torch.softmax, aten._softmax.default, aten.softmax.int, masked_softmax)
    methods = ("softmax",)
    sign = "nonnegative"
    keeps_shape = True
    quantized_inputs = (0,)
    quantized_output = True
    numerics_tests = TESTS

    def describe(self, gm, node, frozen):
        source = node.args[0] if node.args else None
        if not isinstance(source, Node):
            raise Unsupported("softmax of a constant")
        if node.op == "call_module":
            dim = gm.get_submodule(node.target).dim
            if dim is None:
                raise Unsupported("nn.Softmax without a dim")
        else:
            dim = _dim(node)
        if node.op == "call_function" and node.target is aten.softmax.int and arg(node, 2, "dtype", None) is not None:
            raise Unsupported("softmax with a dtype")
        axis = dim  # counted from the end (any batch size): a dim >= 0 needs the traced rank
        if dim >= 0:
            shape = traced_shape(node) or traced_shape(source)  # (a quantizer inserted before has no shape)
            if shape is None:
                raise Unsupported(f"softmax over dim {dim} of a value without a traced shape")
            axis = dim - len(shape)
        inputs = [source.name]
        if node.target is masked_softmax:
            keep = arg(node, 1, "keep", None)
            if not isinstance(keep, Node):
                raise Unsupported("masked_softmax with a constant mask")
            inputs.append(keep.name)
        if not frozen:
            return IntNode(node.name, "softmax", inputs, {"axis": axis})
        attrs: dict[str, Any] = {"axis": axis, **kb.input_attrs(*kb.frozen_codes(gm, source, "softmax"))}
        bits, signed, scale = kb.output_codes(gm, node, "softmax")
        if signed:
            raise Unsupported("softmax needs an unsigned output quantizer")
        attrs.update(bits=bits, signed=False, scale=scale)
        result = IntNode(node.name, "softmax", inputs, attrs)
        spec(result)
        return result

    def evaluate(self, program, node, env):
        from mpqc.integer_kernels.softmax import softmax_reference

        x: IntValue = env[node.inputs[0]]
        kb.check_range(node, x.q, node.attrs["in_bits"], node.attrs["in_signed"])
        keep = env[node.inputs[1]].bool() if len(node.inputs) > 1 else None
        codes = softmax_reference(x.q, spec(node), keep)
        return IntValue(codes, torch.tensor(float(node.attrs["scale"]), dtype=torch.float64))

    def relax(self, lowering, node):
        from mpqc.integer_kernels.softmax import softmax_relax
        from mpqc.targets.tvm.values import _dtype

        codes, x = kb.relax_codes(lowering, node.inputs[0], "softmax")
        keep = lowering.env[node.inputs[1]].expr if len(node.inputs) > 1 else None
        if keep is not None and _dtype(keep) != "bool":  # a constant keep mask: fp32 0/1
            from tvm import relax
            from tvm.relax import op as R

            keep = lowering.emit(R.not_equal(keep, relax.const(0.0, _dtype(keep))))
        out = softmax_relax(lowering.bb, codes, spec(node), keep)
        return kb.relax_output_codes(lowering, out, node.attrs["bits"], False, node.attrs["scale"], x.layout)

    def relax_check(self, node):
        return kb.relax_check_codes(node, SPEC_ATTRS)

    def onnx(self, builder, node):
        from mpqc.integer_kernels.softmax import softmax_onnx

        from onnx import TensorProto

        kernel, keep = spec(node), (node.inputs[1] if len(node.inputs) > 1 else None)

        def build(graph, codes):  # (a constant keep mask is fp32 0/1: cast, as a bool one is unchanged by it)
            return softmax_onnx(graph, codes, kernel, None if keep is None else
                                graph.node("Cast", [keep], to=TensorProto.BOOL))

        kb.onnx_kernel(builder, node, build)


SPEC_ATTRS = ("in_bits", "in_signed", "in_scale", "bits", "scale", "axis")


def spec(node: IntNode):
    """The kernel's frozen parameters of a ``softmax`` program node."""
    from mpqc.errors import ConfigError
    from mpqc.integer_kernels.softmax import IntegerSoftmax

    a = node.attrs
    kb.require_attrs(node, SPEC_ATTRS)
    if a["in_bits"] > 8:
        raise Unsupported(f"softmax {node.name!r}: a {a['in_bits']}-bit input (the exp table takes at most 8 bits)")
    try:
        return IntegerSoftmax(in_bits=int(a["in_bits"]), in_scale=float(a["in_scale"]), out_bits=int(a["bits"]),
                              out_scale=float(a["scale"]), axis=int(a["axis"]))
    except ConfigError as error:
        raise Unsupported(f"softmax {node.name!r}: {error}") from None


# --------------------------------------------------------------------------------------------- masks
class _Mask(OpDef):
    """A boolean keep mask computed from a float value (a graph input): no codes, exact in every backend."""

    keeps_shape = False
    numerics_tests = TESTS

    def describe(self, gm, node, frozen):
        source = node.args[0] if node.args else None
        if not isinstance(source, Node):
            raise Unsupported(f"{self.names[0]} of a constant")
        return IntNode(node.name, self.names[0], [source.name])

    def evaluate(self, program, node, env):
        value = env[node.inputs[0]]
        if isinstance(value, IntValue):
            value = value.q.to(torch.float32) * value.scale.to(torch.float32)
        return self.reference(node, value)

    def reference(self, node: IntNode, value: Tensor) -> Tensor:
        raise NotImplementedError


@register_op
class KeyPaddingMask(_Mask):
    """``key_padding_mask(m)``: ``(m != 0)[:, None, None, :]``."""

    names = ("key_padding_mask",)
    functions = (key_padding_mask,)

    def reference(self, node, value):
        return key_padding_mask(value)

    def relax(self, lowering, node):
        from tvm import relax
        from tvm.relax import op as R

        from mpqc.targets.tvm import _Float, _shape

        x = lowering.env[node.inputs[0]].expr
        b, s = _shape(x)
        keep = lowering.emit(R.not_equal(x, relax.const(0.0, "float32")))
        return _Float(lowering.emit(R.reshape(keep, [b, 1, 1, s])))

    def onnx(self, builder, node):
        import numpy as np

        graph = kb.BuilderGraph(builder, builder.label(node))
        zero = graph.const(np.float32(0.0), "zero")
        keep = graph.node("Not", [graph.node("Equal", [node.inputs[0], zero])])
        builder.add("Unsqueeze", [keep, graph.const(np.array([1, 2], np.int64), "axes")], [node.name],
                    f"{graph.label}/Unsqueeze")
        builder.rank[node.name] = 4


@register_op
class AdditiveMaskKeep(_Mask):
    """``additive_mask_keep(m)``: ``m > -1e4``; the reference refuses entries other than 0 or <= -1e4."""

    names = ("mask_keep",)
    functions = (additive_mask_keep,)

    def reference(self, node, value):
        from mpqc.errors import ConfigError, MpqcError
        from mpqc.integer_kernels.softmax import keep_from_additive_mask

        try:
            return keep_from_additive_mask(value)
        except ConfigError as error:
            raise MpqcError(f"mask_keep {node.name!r}: {error}") from None

    def relax(self, lowering, node):
        from tvm import relax
        from tvm.relax import op as R

        from mpqc.targets.tvm import _Float

        x = lowering.env[node.inputs[0]].expr
        return _Float(lowering.emit(R.greater(x, relax.const(MASK_THRESHOLD, "float32"))))

    def onnx(self, builder, node):
        import numpy as np

        graph = kb.BuilderGraph(builder, builder.label(node))
        builder.add("Greater", [node.inputs[0], graph.const(np.float32(MASK_THRESHOLD), "threshold")], [node.name],
                    f"{graph.label}/Greater")
        builder.rank[node.name] = builder.rank.get(node.inputs[0])
