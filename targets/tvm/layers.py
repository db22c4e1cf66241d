"""conv1d / conv2d / linear layers: the kernel the registry chooses for each (``kernels/registry.py``, from the
target's ISA and the layer's bit-widths), emitted into the lowering.

*Matches*: every ``conv1d``/``conv2d``/``linear`` node (``mpqc/ops/layers.py``'s ``relax`` calls
:func:`_convert_layer`).
*Rewrites to*: an implicit-GEMM kernel (``kernels/implicit_gemm.py`` with the chosen ISA's micro-kernel: NHWC int32
accumulators, output channels sliced back from a multiple of 16; a linear layer's tokens ``[batch, ..., features]``
flattened to one ``[rows, features]`` GEMM and reshaped back; a signed input shifted by the kernel's shift and
``shift * sum(w)`` taken from the bias), or the generic kernel (``kernels/generic.py``) where none takes the layer;
then the int32 bias. *Ensures*: the int32 accumulator of the reference, exactly.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from mpqc.errors import MpqcError
from mpqc.ops.layers import accumulator_scale
from mpqc.reference import IntNode
from mpqc.targets.tvm.kernels import generic, registry
from mpqc.targets.tvm.kernels.implicit_gemm import ConvGeometry, conv2d_te
from mpqc.targets.tvm.values import NHWC, _dtype, _Int, _shape


def _layer_facts(lowering, node: IntNode, x: _Int) -> registry.LayerFacts:
    producer = lowering.by_name[node.inputs[0]]
    return registry.LayerFacts(node.op, int(node.attrs.get("groups", 1)), int(node.attrs["weight_bits"]),
                               int(producer.attrs.get("bits", 8)), _dtype(x.expr) == "int8", len(_shape(x.expr)),
                               int(node.tensors["weight"].shape[1]),
                               node.op == "conv2d" and int(node.attrs["dilation"][1]) > 1)


def _layer_kernel(lowering, node: IntNode, x: _Int) -> registry.Kernel | None:
    """The kernel of ``lowering.isa`` that takes this layer (``kernels/registry.py``), or None (generic)."""
    return registry.choose(lowering.isa, _layer_facts(lowering, node, x))


def _convert_layer(lowering, node: IntNode) -> _Int:
    """The layer's int32 accumulator (bias added) as an :class:`_Int` of scale ``s_in * weight_scale``."""
    x = lowering.env[node.inputs[0]]
    if not isinstance(x, _Int) or _dtype(x.expr) not in ("int8", "uint8"):
        raise MpqcError(f"layer {node.name!r} reads {node.inputs[0]!r}, which is not an 8-bit quantized value")
    bias = node.tensors["bias"].to(torch.int32).numpy()
    scale = accumulator_scale(x.scale, node.tensors["weight_scale"])  # the reference's
    kernel = _layer_kernel(lowering, node, x)
    if kernel is None:
        return generic.convert(lowering, node, x, bias, scale)
    return _convert_layer_kernel(lowering, node, x, bias, scale, kernel)


def _convert_layer_kernel(lowering, node: IntNode, x: _Int, bias: np.ndarray, scale: torch.Tensor,
                          kernel: registry.Kernel) -> _Int:
    """conv2d / linear on the implicit-GEMM kernel with ``kernel``'s micro-kernel."""
    from tvm.relax import op as R

    facts = _layer_facts(lowering, node, x)
    micro, shift = kernel.micro(facts), kernel.shift(facts)
    weight = node.tensors["weight"].to(torch.int64)
    out_channels = int(weight.shape[0])
    signed = _dtype(x.expr) == "int8"
    if signed:
        corrected = bias.astype(np.int64) - shift * weight.reshape(out_channels, -1).sum(1).numpy()
        if np.abs(corrected).max(initial=0) > np.iinfo(np.int32).max:
            raise MpqcError(f"layer {node.name!r}: the bias minus {shift}*sum(w) for the signed input's +{shift} "
                            f"shift leaves int32")
        bias = corrected.astype(np.int32)
    x_expr, leading = x.expr, _shape(x.expr)[:-1]
    if node.op == "linear":
        geometry = ConvGeometry("NC", signed, int(weight.shape[1]), shift=shift)
        if len(leading) > 1:  # tokens [batch, ..., features]: one [rows, features] GEMM, reshaped back after
            x_expr = lowering.emit(R.reshape(x_expr, [int(np.prod(leading)), int(weight.shape[1])]))
    else:
        a = node.attrs
        geometry = micro.widened(ConvGeometry(x.layout, signed, int(weight.shape[1]), tuple(weight.shape[2:]),
                                              tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]),
                                              shift=shift))
    w = lowering.weight(node, "vnni", kernel_width=geometry.kernel[1] + geometry.extra_columns
                        if geometry.extra_columns else 0)
    lowering.kernel_layers[node.name] = micro.block
    acc = lowering.bb.emit_te(functools.partial(conv2d_te, geometry=geometry, name=micro.block), x_expr, w,
                              primfunc_name_hint=micro.block)
    shape = _shape(acc)
    if shape[-1] != out_channels:
        acc = lowering.emit(R.strided_slice(acc, axes=[3], begin=[0], end=[out_channels]))
    if node.op == "linear":
        acc = lowering.emit(R.reshape(acc, [*leading, out_channels]))
    b = lowering.param(f"{node.name}.bias", bias)
    acc = lowering.emit(R.add(acc, b))
    if node.op == "linear":
        return _Int(acc, scale.reshape(1, -1))
    return _Int(acc, scale.reshape(1, 1, 1, -1), NHWC)


