"""LayerNorm and L2-normalize over the last dim on b-bit codes: integer-only (I-BERT's integer mean and variance,
an integer square root, one exact rational output step), the kernel ``mpqc/integer_kernels/norm.py``.

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

``l2_normalize`` (program op; :func:`l2_normalize`, what ``passes/fuse_normalize.py`` writes for ``F.normalize`` and
``x / x.norm(dim=-1, keepdim=True)``): ``x / max(||x||, eps)`` over the last dim, the same kernel without centering
or affine (:class:`~mpqc.integer_kernels.norm.IntegerL2Normalize`: integer sum of squares, integer square root,
one rational step rounded half to even), input and output codes as LayerNorm's. Swin V2's cosine attention.

``rms_norm`` (``nn.RMSNorm``, ``F.rms_norm``): the same kernel without centering (``IntegerNorm(center=False)``),
over the last dim, an optional per-channel weight; ``eps=None`` is the input dtype's (float32) machine epsilon, as
torch's. A hand-written RMSNorm (LLaMA's ``x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``, times a weight) is
rewritten to ``F.rms_norm`` at capture (``passes/fuse_rms_norm.py``).

``group_norm`` (``nn.GroupNorm``, ``F.group_norm``): the LayerNorm kernel on the codes reshaped to
``[B, G, (C/G) * prod(spatial)]`` and back (:meth:`~mpqc.integer_kernels.norm.IntegerNorm.group_norm`), the
per-channel affine repeated over each group's positions; TVM reads its input in the program's NCHW layout. The
kernel's int64 bounds grow with ``((C/G) * prod(spatial))^3``: the input stays at up to 8 bits (``operand_bits``),
and a group too large for int64 even then is refused when the quantizers are inserted, before any training.
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
from mpqc.ops.scales import traced_shape

aten = torch.ops.aten

TESTS = ("tests/test_ops_transformer.py::test_transformer_ops_are_bit_exact_on_tvm",
         "tests/test_ops_transformer.py::test_transformer_ops_agree_with_onnxruntime",
         "tests/test_ops_transformer.py::test_hf_bert_goes_through_every_stage",
         "tests/test_ops_transformer.py::test_reference_agrees_with_fake_quant")
NORM_TESTS = ("tests/test_ops_norm.py::test_rms_norm_agrees_with_fake_quant_and_onnxruntime",
              "tests/test_ops_norm.py::test_group_norm_agrees_with_fake_quant_and_onnxruntime",
              "tests/test_ops_norm.py::test_norms_are_bit_exact_on_tvm")
NORMALIZE_TESTS = ("tests/test_ops_vit.py::test_l2_normalize_with_an_outlier_channel_through_every_backend",
                   "tests/test_ops_vit.py::test_tiny_family_agrees_with_fake_quant_and_onnxruntime")


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


class _NormKernel(OpDef):
    """An op computed by the integer norm kernel on its input's codes, making its output quantizer's codes
    (``spec`` gives the kernel's frozen parameters of a program node)."""

    keeps_shape = True
    quantized_inputs = (0,)
    quantized_output = True
    numerics_tests = TESTS
    spec_attrs: tuple[str, ...] = ()

    def spec(self, node: IntNode):
        raise NotImplementedError

    def evaluate(self, program, node, env):
        from mpqc.integer_kernels.norm import norm_reference

        x: IntValue = env[node.inputs[0]]
        a = node.attrs
        kb.check_range(node, x.q, a["in_bits"], a["in_signed"])
        return IntValue(norm_reference(x.q, self.spec(node)), torch.tensor(float(a["scale"]), dtype=torch.float64))

    def relax(self, lowering, node):
        from mpqc.integer_kernels.norm import norm_relax

        codes, x = kb.relax_codes(lowering, node.inputs[0], node.op)
        a = node.attrs
        return kb.relax_output_codes(lowering, norm_relax(lowering.bb, codes, self.spec(node)), a["bits"],
                                     a["signed"], a["scale"], x.layout)

    def relax_check(self, node):
        return kb.relax_check_codes(node, self.spec_attrs)

    def onnx(self, builder, node):
        from mpqc.integer_kernels.norm import norm_onnx

        kernel = self.spec(node)
        kb.onnx_kernel(builder, node, lambda graph, codes: norm_onnx(graph, codes, kernel))

    def _frozen(self, gm: GraphModule, node: Node, source: Node, attrs: dict[str, Any],
                tensors: dict[str, Tensor] | None = None) -> IntNode:
        """The program node with its input and output codes' attrs, checked (refused at freeze time where the
        kernel could overflow int64)."""
        name = self.names[0]
        attrs = {**attrs, **kb.input_attrs(*kb.frozen_codes(gm, source, name))}
        bits, signed, scale = kb.output_codes(gm, node, name)
        attrs.update(bits=bits, signed=signed, scale=scale)
        result = IntNode(node.name, name, [source.name], attrs, tensors or {})
        self.spec(result)
        return result


@register_op
class LayerNorm(_NormKernel):
    """LayerNorm over the last dim as the integer kernel (see the module docstring)."""

    names = ("layer_norm",)
    modules = (nn.LayerNorm,)
    functions = (F.layer_norm, torch.layer_norm, aten.layer_norm.default)
    operand_bits = 16  # the integer kernel takes 16-bit codes exactly (int64 throughout)
    spec_attrs = ("size", "in_bits", "in_signed", "in_scale", "bits", "signed", "scale", "eps")
    center = True  # subtract the mean (RMSNorm: no)

    def params(self, gm: GraphModule, node: Node) -> tuple[list[int], Tensor | None, Tensor | None, float]:
        """``(normalized_shape, weight, bias, eps)`` of the node."""
        return layer_norm_params(gm, node)

    def describe(self, gm, node, frozen):
        name = self.names[0]
        source = node.args[0] if node.args else None
        if not isinstance(source, Node):
            raise Unsupported(f"{name} of a constant")
        shape, weight, bias, eps = self.params(gm, node)
        if len(shape) != 1:
            raise Unsupported(f"{name} over {len(shape)} dims (the last dim only)")
        if not frozen:
            return IntNode(node.name, name, [source.name])
        tensors = {key: t.detach().double().clone() for key, t in (("weight", weight), ("bias", bias))
                   if t is not None}
        return self._frozen(gm, node, source, {"size": int(shape[0]), "eps": eps}, tensors)

    def spec(self, node):
        from mpqc.integer_kernels.norm import IntegerNorm

        a = node.attrs
        kb.require_attrs(node, self.spec_attrs)
        try:
            return IntegerNorm(size=int(a["size"]), in_bits=int(a["in_bits"]), in_scale=float(a["in_scale"]),
                               out_bits=int(a["bits"]), out_scale=float(a["scale"]),
                               weight=node.tensors.get("weight"), bias=node.tensors.get("bias"), eps=float(a["eps"]),
                               center=self.center, out_signed=bool(a["signed"]))
        except ConfigError as error:
            raise Unsupported(f"{self.names[0]} {node.name!r}: {error}") from None


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """``x / max(||x||_2, eps)`` over ``dim`` (``F.normalize(x, 2.0, dim, eps)``), what
    ``passes/fuse_normalize.py`` writes for ``F.normalize`` and ``x / x.norm(dim=..., keepdim=True)``; with
    ``eps`` 0 an all-zero row gives zeros (the integer kernel's semantics), not the division's NaN."""
    norm = torch.linalg.vector_norm(x, 2, dim, keepdim=True)
    return x / norm.clamp_min(eps if eps > 0 else torch.finfo(x.dtype).tiny)


@register_op
class L2Normalize(_NormKernel):
    """``l2_normalize(x, dim, eps)`` over the last dim as the integer kernel
    (:class:`~mpqc.integer_kernels.norm.IntegerL2Normalize`): Swin V2's cosine attention."""

    names = ("l2_normalize",)
    functions = (l2_normalize,)
    sign = "preserving"
    spec_attrs = ("size", "in_bits", "in_signed", "in_scale", "bits", "signed", "scale", "eps")
    numerics_tests = NORMALIZE_TESTS

    def describe(self, gm, node, frozen):
        source = node.args[0] if node.args else None
        if not isinstance(source, Node):
            raise Unsupported("l2_normalize of a constant")
        shape = traced_shape(node) or traced_shape(source)  # (a quantizer inserted before has no shape)
        if shape is None:
            raise Unsupported("l2_normalize of a value without a traced shape")
        dim = int(arg(node, 1, "dim", -1))
        if dim not in (-1, len(shape) - 1):
            raise Unsupported(f"l2_normalize over dim {dim} of a rank-{len(shape)} value (the last dim only)")
        if not frozen:
            return IntNode(node.name, "l2_normalize", [source.name])
        return self._frozen(gm, node, source, {"size": int(shape[-1]), "eps": float(arg(node, 2, "eps", 1e-12))})

    def spec(self, node):
        from mpqc.integer_kernels.norm import IntegerL2Normalize

        a = node.attrs
        kb.require_attrs(node, self.spec_attrs)
        try:
            return IntegerL2Normalize(size=int(a["size"]), in_bits=int(a["in_bits"]), in_scale=float(a["in_scale"]),
                                      out_bits=int(a["bits"]), out_scale=float(a["scale"]), eps=float(a["eps"]),
                                      out_signed=bool(a["signed"]))
        except ConfigError as error:
            raise Unsupported(f"l2_normalize {node.name!r}: {error}") from None


def _eps(value: Any) -> float:
    """RMSNorm's eps: None is float32's machine epsilon (torch's default for an fp32 input)."""
    return float(torch.finfo(torch.float32).eps) if value is None else float(value)


@register_op
class RMSNorm(LayerNorm):
    """RMSNorm over the last dim as the integer kernel without centering (see the module docstring)."""

    names = ("rms_norm",)
    modules = (nn.RMSNorm,)
    functions = (F.rms_norm, torch.rms_norm, aten.rms_norm.default)
    numerics_tests = NORM_TESTS
    center = False

    def params(self, gm, node):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            return list(module.normalized_shape), module.weight, None, _eps(module.eps)
        shape = arg(node, 1, "normalized_shape", None)
        shape = list(shape) if isinstance(shape, (tuple, list, torch.Size)) else [shape]
        return shape, _attribute(gm, arg(node, 2, "weight", None)), None, _eps(arg(node, 3, "eps", None))


@register_op
class GroupNorm(_NormKernel):
    """GroupNorm of ``[B, C, *spatial]`` as the LayerNorm kernel over ``[B, G, (C/G) * prod(spatial)]`` (see the
    module docstring)."""

    names = ("group_norm",)
    modules = (nn.GroupNorm,)
    functions = (F.group_norm, torch.group_norm, aten.group_norm.default)
    operand_bits = 8
    spec_attrs = ("groups", "channels", "spatial", "in_bits", "in_signed", "in_scale", "bits", "signed", "scale",
                  "eps")
    numerics_tests = NORM_TESTS

    def _params(self, gm, node) -> tuple[int, Tensor | None, Tensor | None, float]:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            return int(module.num_groups), module.weight, module.bias, float(module.eps)
        # F.group_norm(input, num_groups, weight, bias, eps) and ATen's (..., eps, cudnn_enabled) alike
        return (int(arg(node, 1, "num_groups", 1)), _attribute(gm, arg(node, 2, "weight", None)),
                _attribute(gm, arg(node, 3, "bias", None)), float(arg(node, 4, "eps", 1e-5)))

    def describe(self, gm, node, frozen):
        source = node.args[0] if node.args else None
        if not isinstance(source, Node):
            raise Unsupported("group_norm of a constant")
        shape = traced_shape(node) or traced_shape(source)
        if shape is None or len(shape) < 3:
            raise Unsupported("group_norm of a value without a traced [batch, channels, *spatial] shape")
        groups, weight, bias, eps = self._params(gm, node)
        channels, spatial = int(shape[1]), int(torch.Size(shape[2:]).numel())
        attrs = {"groups": groups, "channels": channels, "spatial": spatial, "eps": eps}
        if not frozen:  # refused before training where even 8-bit input codes could overflow the int64 kernel
            self._checked(node.name, attrs, weight, bias, in_bits=self.operand_bits)
            return IntNode(node.name, "group_norm", [source.name])
        tensors = {key: t.detach().double().clone() for key, t in (("weight", weight), ("bias", bias))
                   if t is not None}
        return self._frozen(gm, node, source, attrs, tensors)

    def _checked(self, name: str, attrs: dict[str, Any], weight, bias, in_bits: int, in_scale: float = 1.0,
                 out_bits: int = 8, out_scale: float = 1.0, out_signed: bool = True):
        from mpqc.integer_kernels.norm import IntegerNorm

        try:
            return IntegerNorm.group_norm(int(attrs["groups"]), int(attrs["channels"]), int(attrs["spatial"]),
                                          weight=weight, bias=bias, in_bits=in_bits, in_scale=in_scale,
                                          out_bits=out_bits, out_scale=out_scale, eps=float(attrs["eps"]),
                                          out_signed=out_signed)
        except ConfigError as error:
            raise Unsupported(f"group_norm {name!r} ({attrs['channels']} channels in {attrs['groups']} groups, "
                              f"{attrs['spatial']} positions): {error}") from None

    def spec(self, node):
        a = node.attrs
        kb.require_attrs(node, self.spec_attrs)
        return self._checked(node.name, a, node.tensors.get("weight"), node.tensors.get("bias"),
                             in_bits=int(a["in_bits"]), in_scale=float(a["in_scale"]), out_bits=int(a["bits"]),
                             out_scale=float(a["scale"]), out_signed=bool(a["signed"]))

    def evaluate(self, program, node, env):
        from mpqc.integer_kernels.norm import norm_reference

        x: IntValue = env[node.inputs[0]]
        a = node.attrs
        kb.check_range(node, x.q, a["in_bits"], a["in_signed"])
        grouped = x.q.reshape(x.q.shape[0], int(a["groups"]), -1)
        out = norm_reference(grouped, self.spec(node)).reshape(x.q.shape)
        return IntValue(out, torch.tensor(float(a["scale"]), dtype=torch.float64))

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.integer_kernels.norm import norm_relax
        from mpqc.targets.tvm import NCHW
        from mpqc.targets.tvm.values import _shape

        codes, _ = kb.relax_codes(lowering, node.inputs[0], node.op, layout=NCHW)
        shape = [int(d) for d in _shape(codes)]
        a = node.attrs
        grouped = lowering.emit(R.reshape(codes, [shape[0], int(a["groups"]), -1]))
        out = lowering.emit(R.reshape(norm_relax(lowering.bb, grouped, self.spec(node)), shape))
        return kb.relax_output_codes(lowering, out, a["bits"], a["signed"], a["scale"], NCHW)

    def onnx(self, builder, node):
        import numpy as np

        from mpqc.integer_kernels.norm import norm_onnx

        kernel, groups = self.spec(node), int(node.attrs["groups"])

        def grouped_norm(graph, codes: str) -> str:
            grouped = graph.node("Reshape", [codes, graph.const(np.array([0, groups, -1], dtype=np.int64), "groups")])
            return graph.node("Reshape", [norm_onnx(graph, grouped, kernel), graph.node("Shape", [codes])])

        kb.onnx_kernel(builder, node, grouped_norm)
