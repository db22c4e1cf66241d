"""conv1d / conv2d / linear: the quantized layers, exact int32 accumulators.

Input: an 8-bit-storage integer from a ``quantize`` node with a per-tensor scale ``s_a``; weight ``w`` integer in
its b-bit signed range with per-output-channel scale ``s_w``; bias ``round_half_even(b / (s_a * s_w))`` in int32.
Output: the exact int32 accumulator ``acc = sum(q_a * w) + bias`` with scale ``s_a * s_w[c]``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpqc.errors import MpqcError
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, register_op
from mpqc.qmodules import QuantConv1d, QuantConv2d, QuantLinear
from mpqc.quantizers.base import FixedQuantizer

INT32_MAX = 2**31 - 1
_FP32_EXACT = 2**24  # every integer of smaller magnitude is an fp32 value, and so is every partial sum below it

_TESTS = ("tests/test_tvm.py::test_resnet20_is_bit_exact_with_the_reference",
          "tests/test_tvm.py::test_less_common_ops_are_bit_exact",
          "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits",
          "tests/test_reference.py::test_integer_layer_sums_are_exact_in_fp32_and_float64")


@register_op
class Layer(OpDef):
    """A quantized conv1d/conv2d/linear module (``mpqc.qmodules``); an unquantized one is refused."""

    names = ("conv1d", "conv2d", "linear")
    modules = (QuantConv1d, QuantConv2d, QuantLinear, nn.Conv1d, nn.Conv2d, nn.Linear)
    #: the quantizable module types and their program ops (subclasses, e.g. the quantized versions, count too)
    layer_types: dict[type[nn.Module], str] = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Linear: "linear"}
    is_layer = True
    quantized_inputs = (0,)
    numerics_tests = _TESTS

    def describe(self, gm, node, frozen):
        module = gm.get_submodule(node.target)
        if not isinstance(module, (QuantConv1d, QuantConv2d, QuantLinear)):
            raise Unsupported("layer was not quantized")
        if not frozen:
            return IntNode(node.name, "layer", [arg.name for arg in node.all_input_nodes])
        return _describe_layer(gm, node, module)

    def evaluate(self, program, node, env):
        x: IntValue = env[node.inputs[0]]
        acc = integer_layer_sum(node.op, x.q, node.tensors["weight"], node.attrs)
        channel_dim = -1 if node.op == "linear" else 1  # a linear layer's output channels are its last dimension
        acc = torch.round(acc).to(torch.int64) + channel_scale(node.tensors["bias"].to(torch.int64), acc.dim(),
                                                               channel_dim)
        if largest_magnitude(acc) > INT32_MAX:
            raise MpqcError(f"layer {node.attrs['module']!r}: the accumulator reached {largest_magnitude(acc)}, "
                            f"beyond the int32 range the integer contract guarantees")
        return IntValue(acc, channel_scale(accumulator_scale(x.scale, node.tensors["weight_scale"]), acc.dim(),
                                           channel_dim))

    def relax(self, lowering, node):
        from mpqc.targets.tvm import _convert_layer  # its ISA-specific kernels live with the TVM target

        return _convert_layer(lowering, node)

    def relax_check(self, node):
        if node.attrs["weight_bits"] > 8:
            return f"{node.attrs['weight_bits']}-bit weights (the TVM target stores weights in int8)"
        return None

    def onnx(self, builder, node):
        from mpqc.targets.onnx import _convert_layer  # its storage types live with the ONNX target

        _convert_layer(builder, node)


def _describe_layer(gm, node, module: nn.Module) -> IntNode:
    source = node.args[0]
    quantizer = gm.get_submodule(source.target) if source.op == "call_module" else None
    if not isinstance(quantizer, FixedQuantizer) or not isinstance(module.weight_quantizer, FixedQuantizer):
        raise Unsupported("layer is not frozen: freeze the graph before building the integer program")
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise Unsupported(f"padding_mode={module.padding_mode!r}")
    weight_q = module.weight_quantizer.frozen()
    input_scale = float(quantizer.frozen().scale.reshape(-1)[0])
    weight_int = weight_q.quantize(module.weight.detach())
    weight_scale = weight_q.scale.reshape(-1).to(torch.float32)
    if weight_scale.numel() == 1:
        weight_scale = weight_scale.expand(weight_int.shape[0]).clone()
    acc_scale = input_scale * weight_scale.double()
    # the float bias with a shifted input's correction from the program's own W_q (``QuantLinear.shifted_bias``)
    weight_values = weight_int.double() * weight_q.scale.double().reshape([-1] + [1] * (weight_int.dim() - 1))
    bias = module.shifted_bias(weight_values)
    bias = bias.detach().double() if bias is not None else torch.zeros(weight_int.shape[0], dtype=torch.float64)
    bias_steps = torch.round(bias / acc_scale)
    if bool((bias_steps.abs() > INT32_MAX).any()):
        raise MpqcError(
            f"layer {node.target!r}: its bias needs {float(bias_steps.abs().max()):.3g} accumulator steps "
            f"(s_in * s_w), more than int32 holds; the input quantizer's range collapsed to {input_scale:.3g}"
        )
    bias_int = bias_steps.to(torch.int32)
    storage = torch.int8 if weight_q.bits <= 8 else torch.int16
    attrs: dict[str, Any] = {"module": node.target, "weight_bits": weight_q.bits}
    if isinstance(module, QuantLinear):
        op = "linear"
    else:
        op = "conv2d" if isinstance(module, QuantConv2d) else "conv1d"
        if isinstance(module.padding, str):
            raise Unsupported(f"string padding {module.padding!r}")
        attrs.update(stride=list(module.stride), padding=list(module.padding), dilation=list(module.dilation),
                     groups=module.groups)
    return IntNode(node.name, op, [source.name], attrs, {
        "weight": weight_int.to(storage), "weight_scale": weight_scale, "bias": bias_int,
    })


def accumulator_scale(input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """The scale of a layer's int32 accumulator per output channel: the fp32 product ``fp32(s_in) * fp32(s_w)``
    (held in float64). A region's multiplier ``M = fp32(acc_scale / s_out)`` is then the correctly rounded fp32
    quotient of two fp32 numbers: exactly the ``fp32(s_in * s_w / s_out)`` that onnxruntime's QLinearConv/QGemm
    compute in fp32 arithmetic, so their requantisation agrees with the reference bit for bit. (With the product in
    float64, 53 of one Inception-v3 layer's 192 channel multipliers differed from onnxruntime's by an ulp, and a code
    flipped at a rounding tie.)"""
    return (input_scale.to(torch.float32) * weight_scale.to(torch.float32)).to(torch.float64)


def channel_scale(scale: Tensor, ndim: int, channel_dim: int = 1) -> Tensor:
    """Per-channel values shaped to broadcast along ``channel_dim`` of a rank-``ndim`` tensor."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return scale.reshape(shape)


def largest_magnitude(values: Tensor) -> int:
    """``max |values|`` (0 for an empty tensor), without an ``abs`` copy."""
    if not values.numel():
        return 0
    low, high = torch.aminmax(values)
    return max(-int(low), int(high))


def integer_layer_sum(op: str, q: Tensor, weight: Tensor, attrs: dict) -> Tensor:
    """``sum(q * w)`` of a ``conv1d``/``conv2d``/``linear`` layer on integer tensors, exactly, as float values.

    Computed in fp32 where no partial sum can leave the integers fp32 holds exactly (``max|q| * max|w| * fan_in <
    2**24``, true of most layers at <= 6 bits), else in float64 (exact below 2**53; PyTorch's float64 convolution
    is several times slower). Either way the sums are the exact integers, whatever the summation order."""
    bound = largest_magnitude(q) * largest_magnitude(weight) * weight[0].numel()
    dtype = torch.float32 if bound < _FP32_EXACT else torch.float64
    q, w = q.to(dtype), weight.to(dtype)
    if op == "linear":
        return F.linear(q, w)
    conv = F.conv2d if op == "conv2d" else F.conv1d
    return conv(q, w, None, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
