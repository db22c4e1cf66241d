"""LayerNorm over the last dim on b-bit codes: integer-only (I-BERT's integer mean and variance, a Newton integer
square root, one exact rational output step), the kernel ``mpqc/integer_kernels/norm.py``.

``insert_quantizers`` gives the op an input quantizer (``quantized_inputs``) and an output quantizer
(``quantized_output``); at freeze time ``describe`` reads both (input bits, sign, scale ``s_in``; output bits, sign,
scale ``s_out``) and the affine ``gamma``/``beta`` into an :class:`~mpqc.integer_kernels.norm.IntegerNorm`. The
program node ``layer_norm`` holds ``gamma``/``beta`` (float64) and produces the output codes at ``s_out``; the
output quantizer that follows passes them through (multiplier 1). The reference, TVM and onnxruntime run the same
int64 arithmetic (``norm_reference`` / ``norm_relax`` / ``norm_onnx``), so they agree bit for bit; the fake-quant
graph computes float LayerNorm on the fake-quantized input and agrees within 1 LSB (the kernel's error is well
under one output LSB, ``tests/test_integer_kernels.py``).

Matches ``nn.LayerNorm`` modules, ``F.layer_norm`` and ATen ``layer_norm`` with parameter tensors (``get_attr``)
or none; ``passes/functional_layers.py`` turns the functional forms with parameters into ``nn.LayerNorm``
modules. Only a normalized shape of one dim (the last) is supported.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from mpqc.errors import ConfigError
from mpqc.ops import kernel_bridge as kb
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, register_op

aten = torch.ops.aten

TESTS = ("tests/test_ops_transformer.py::test_transformer_ops_are_bit_exact_on_tvm",
         "tests/test_ops_transformer.py::test_transformer_ops_agree_with_onnxruntime",
         "tests/test_ops_transformer.py::test_hf_bert_goes_through_every_stage",
         "tests/test_ops_transformer.py::test_reference_agrees_with_fake_quant")


def _attribute(gm: GraphModule, value: Any) -> Tensor | None:
    if value is None:
        return None
    if not isinstance(value, Node) or value.op != "get_attr":
        raise Unsupported(f"a LayerNorm affine parameter computed at run time ({value})")
    owner, _, name = value.target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def layer_norm_params(gm: GraphModule, node: Node) -> tuple[list[int], Tensor | None, Tensor | None, float]:
    """``(normalized_shape, weight, bias, eps)`` of a LayerNorm node (module or function)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return list(module.normalized_shape), module.weight, module.bias, float(module.eps)
    shape = arg(node, 1, "normalized_shape", None)
    weight = _attribute(gm, arg(node, 2, "weight", None))
    bias = _attribute(gm, arg(node, 3, "bias", None))
    return list(shape), weight, bias, float(arg(node, 4, "eps", 1e-5))


@register_op
class LayerNorm(OpDef):
    """LayerNorm over the last dim as the integer kernel (see the module docstring)."""

    names = ("layer_norm",)
    modules = (nn.LayerNorm,)
    functions = (F.layer_norm, torch.layer_norm, aten.layer_norm.default)
    keeps_shape = True
    quantized_inputs = (0,)
    quantized_output = True
    operand_bits = 16  # the integer kernel takes 16-bit codes exactly (int64 throughout)
    numerics_tests = TESTS

    def describe(self, gm, node, frozen):
        source = node.args[0] if node.args else None
        if not isinstance(source, Node):
            raise Unsupported("layer_norm of a constant")
        shape, weight, bias, eps = layer_norm_params(gm, node)
        if len(shape) != 1:
            raise Unsupported(f"layer_norm over {len(shape)} dims (the last dim only)")
        if not frozen:
            return IntNode(node.name, "layer_norm", [source.name])
        attrs: dict[str, Any] = {"size": int(shape[0]), "eps": eps}
        attrs.update(kb.input_attrs(*kb.frozen_codes(gm, source, "layer_norm")))
        bits, signed, scale = kb.output_codes(gm, node, "layer_norm")
        attrs.update(bits=bits, signed=signed, scale=scale)
        tensors = {key: t.detach().double().clone() for key, t in (("weight", weight), ("bias", bias))
                   if t is not None}
        result = IntNode(node.name, "layer_norm", [source.name], attrs, tensors)
        spec(result)  # refuses sizes and affine values that could overflow int64, at freeze time
        return result

    def evaluate(self, program, node, env):
        from mpqc.integer_kernels.norm import norm_reference

        x: IntValue = env[node.inputs[0]]
        a = node.attrs
        kb.check_range(node, x.q, a["in_bits"], a["in_signed"])
        return IntValue(norm_reference(x.q, spec(node)), torch.tensor(float(a["scale"]), dtype=torch.float64))

    def relax(self, lowering, node):
        from mpqc.integer_kernels.norm import norm_relax

        codes, x = kb.relax_codes(lowering, node.inputs[0], "layer_norm")
        a = node.attrs
        return kb.relax_output_codes(lowering, norm_relax(lowering.bb, codes, spec(node)), a["bits"], a["signed"],
                                     a["scale"], x.layout)

    def relax_check(self, node):
        return kb.relax_check_codes(node, SPEC_ATTRS)

    def onnx(self, builder, node):
        from mpqc.integer_kernels.norm import norm_onnx

        kernel = spec(node)
        kb.onnx_kernel(builder, node, lambda graph, codes: norm_onnx(graph, codes, kernel))


SPEC_ATTRS = ("size", "in_bits", "in_signed", "in_scale", "bits", "signed", "scale", "eps")


def spec(node: IntNode):
    """The kernel's frozen parameters of a ``layer_norm`` program node."""
    from mpqc.integer_kernels.norm import IntegerNorm

    a = node.attrs
    kb.require_attrs(node, SPEC_ATTRS)
    try:
        return IntegerNorm(size=int(a["size"]), in_bits=int(a["in_bits"]), in_scale=float(a["in_scale"]),
                           out_bits=int(a["bits"]), out_scale=float(a["scale"]), weight=node.tensors.get("weight"),
                           bias=node.tensors.get("bias"), eps=float(a["eps"]), center=True,
                           out_signed=bool(a["signed"]))
    except ConfigError as error:
        raise Unsupported(f"layer_norm {node.name!r}: {error}") from None
