"""Pooling: max_pool2d, global_avg_pool (adaptive average pooling to 1x1), avg_pool2d (any padding, ceil_mode,
count_include_pad).

``max_pool2d`` keeps integers (and is a step of a requantisation region on floats); ``global_avg_pool`` and
``avg_pool2d`` on integers become the exact integer *sum* with scale ``s / window``; on floats they are PyTorch's
fp32 mean (TVM reproduces its summation order).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpqc.errors import MpqcError
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, pair, register_op

aten = torch.ops.aten

_TESTS = ("tests/test_tvm.py::test_less_common_ops_are_bit_exact",
          "tests/test_tvm.py::test_resnet20_is_bit_exact_with_the_reference",
          "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits")


def pool_attrs(kernel, stride, padding, dilation, ceil_mode) -> dict:
    return {"kernel": list(pair(kernel)), "stride": list(pair(stride if stride else kernel)),
            "padding": list(pair(padding)), "dilation": list(pair(dilation)), "ceil_mode": bool(ceil_mode)}


def max_pool(x, a: dict):
    return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


def window_bounds(size: int, out: int, kernel: int, stride: int, padding: int) -> list[tuple[int, int]]:
    """Per output index along one dim: the input range ``[start, end)`` its window sums (clipped to the input;
    padding adds zeros)."""
    return [(max(i * stride - padding, 0), min(i * stride - padding + kernel, size)) for i in range(out)]


def _pool(x: torch.Tensor, a: dict, **kwargs) -> torch.Tensor:
    return F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], **kwargs)


def pool_divisors(node: IntNode, height: int, width: int) -> torch.Tensor:
    """The divisor of each output position (float64, ``[1, 1, oh, ow]``): what PyTorch divides each window's sum
    by, found by pooling ones (so every padding / ceil_mode / count_include_pad rule is PyTorch's own)."""
    a = node.attrs
    ones = torch.ones(1, 1, height, width, dtype=torch.float64)
    sums = _pool(ones, a, count_include_pad=True, divisor_override=1)
    return torch.round(sums / _pool(ones, a, count_include_pad=a.get("count_include_pad", True)))


def window_sums(node: IntNode, q: torch.Tensor) -> torch.Tensor:
    """The exact integer sum of each pooling window of ``q`` (int64; padding adds zeros)."""
    sums = _pool(q.to(torch.float64), node.attrs, count_include_pad=True, divisor_override=1)
    return torch.round(sums).to(torch.int64)


def _padded_window_sum_te(x, rows, cols, out_dtype: str):
    """TVM: the sum of each window (``rows``/``cols``: per output index, its clipped input range), in row-major
    order; every window's bounds are constants of the generated code."""
    from tvm import te, tirx

    n, c = (int(d) for d in x.shape[:2])

    def window(index, bounds):
        # the per-output bounds as a select chain on the output index (a handful of distinct windows)
        start, end = tirx.const(bounds[-1][0], "int32"), tirx.const(bounds[-1][1], "int32")
        for k in range(len(bounds) - 2, -1, -1):
            start = tirx.Select(index == k, tirx.const(bounds[k][0], "int32"), start)
            end = tirx.Select(index == k, tirx.const(bounds[k][1], "int32"), end)
        return start, end

    kh = max(r1 - r0 for r0, r1 in rows)
    kw = max(c1 - c0 for c0, c1 in cols)
    height, width = int(x.shape[2]), int(x.shape[3])

    def body(b, ch, i, j):
        (r0, r1), (c0, c1) = window(i, rows), window(j, cols)
        total = None
        for u in range(kh):
            for v in range(kw):
                h, w = r0 + u, c0 + v
                inside = tirx.all(h < r1, w < c1)
                value = x[b, ch, tirx.min(h, height - 1), tirx.min(w, width - 1)].astype(out_dtype)
                value = tirx.Select(inside, value, tirx.const(0, out_dtype))
                total = value if total is None else total + value
        return total

    return te.compute((n, c, len(rows), len(cols)), body, name="window_sum")


@register_op
class MaxPool2d(OpDef):
    names = ("max_pool2d",)
    modules = (nn.MaxPool2d,)
    functions = (F.max_pool2d, aten.max_pool2d.default)
    keeps_integers = True
    sign = "preserving"  # padding never wins a max against a value >= 0
    keeps_zero = True
    fuses_into_requantize = True
    numerics_tests = _TESTS

    def describe(self, gm, node, frozen):
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            attrs = pool_attrs(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        else:
            kernel = arg(node, 1, "kernel_size", None)
            attrs = pool_attrs(kernel, arg(node, 2, "stride", None), arg(node, 3, "padding", 0),
                               arg(node, 4, "dilation", 1), arg(node, 5, "ceil_mode", False))
        return IntNode(node.name, "max_pool2d", [node.all_input_nodes[0].name], attrs)

    def evaluate(self, program, node, env):
        x = env[node.inputs[0]]
        if isinstance(x, IntValue):
            return IntValue(torch.round(max_pool(x.q.to(torch.float64), node.attrs)).to(torch.int64), x.scale)
        return max_pool(x, node.attrs)

    def requantize_step(self, node, inputs, s_out):
        return max_pool(inputs[0], node.attrs)

    def relax(self, lowering, node):
        from mpqc.targets.tvm import _Float, _Int, _max_pool

        x = lowering.env[node.inputs[0]]
        pooled = lowering.emit(_max_pool(x.expr, node.attrs, x.layout))
        if isinstance(x, _Int):
            return _Int(pooled, x.scale, x.layout)
        return _Float(pooled, x.layout)

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        from mpqc.targets.tvm import _Float, _max_pool

        x = inputs[0]
        return _Float(lowering.emit(_max_pool(x.expr, node.attrs, x.layout)), x.layout)

    def onnx(self, builder, node):
        a = node.attrs
        builder.add("MaxPool", [node.inputs[0]], [node.name], builder.label(node), kernel_shape=a["kernel"],
                    strides=a["stride"], pads=list(a["padding"]) * 2, dilations=a["dilation"],
                    ceil_mode=int(a["ceil_mode"]))
        builder.rank[node.name] = 4


@register_op
class GlobalAvgPool(OpDef):
    """Adaptive average pooling to 1x1."""

    names = ("global_avg_pool",)
    modules = (nn.AdaptiveAvgPool2d,)
    functions = (F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default)
    keeps_integers = True
    sign = "preserving"
    keeps_zero = True
    averages = True
    numerics_tests = _TESTS + ("tests/test_tvm.py::test_torch_sum_order_reproduces_pytorch_mean",)

    def describe(self, gm, node, frozen):
        if node.op == "call_module":
            size = gm.get_submodule(node.target).output_size
        else:
            size = arg(node, 1, "output_size", None)
        if pair(size) != (1, 1):
            raise Unsupported("adaptive average pooling to a size other than 1x1")
        return IntNode(node.name, "global_avg_pool", [node.all_input_nodes[0].name])

    def evaluate(self, program, node, env):
        x = env[node.inputs[0]]
        if isinstance(x, IntValue):
            window = x.q.shape[-1] * x.q.shape[-2]
            return IntValue(x.q.sum(dim=(-2, -1), keepdim=True), x.scale / window)
        return F.adaptive_avg_pool2d(x, 1)

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import (_CHECKED_FLOAT_MEAN_WINDOW, NCHW, NHWC, _Float, _float_global_avg_pool_te, _Int,
                                      _shape, _sum_dtype)

        x = lowering.env[node.inputs[0]]
        if isinstance(x, _Int):
            axes = [1, 2] if x.layout == NHWC else [-2, -1]
            shape = _shape(x.expr)
            summed = lowering.emit(R.sum(R.astype(x.expr, _sum_dtype(x.expr)), axis=axes, keepdims=True))
            return _Int(summed, x.scale / (shape[axes[0]] * shape[axes[1]]), x.layout)
        x = lowering.in_layout(x, NCHW)
        shape = _shape(x.expr)
        window = shape[-1] * shape[-2]
        if window > _CHECKED_FLOAT_MEAN_WINDOW:
            lowering.inexact.append(f"{node.name}: fp32 mean over {window} elements (PyTorch's summation order is "
                                    f"reproduced and checked only up to {_CHECKED_FLOAT_MEAN_WINDOW})")
        return _Float(lowering.bb.emit_te(_float_global_avg_pool_te, x.expr, primfunc_name_hint="float_mean"))

    def onnx(self, builder, node):
        builder.add("GlobalAveragePool", [node.inputs[0]], [node.name], builder.label(node))
        builder.rank[node.name] = builder.rank.get(node.inputs[0])


def pooled_integer(node: IntNode, x) -> IntValue:
    """The reference of an average pool on an integer value: exact window sums, scale ``s / divisor`` per
    position (``[1, C or 1, oh, ow]``)."""
    if not isinstance(x, IntValue):
        raise MpqcError(f"node {node.name!r}: {node.op} reads a float value (its input must be quantized)")
    divisors = pool_divisors(node, x.q.shape[-2], x.q.shape[-1])
    return IntValue(window_sums(node, x.q), x.scale / divisors)


def relax_pooled_integer(lowering, node: IntNode):
    """TVM: ``pooled_integer`` (the same divisors and scales, from the same torch code)."""
    from mpqc.targets.tvm import NCHW, _Int, _shape, _sum_dtype

    x = lowering.in_layout(lowering.env[node.inputs[0]], NCHW)
    if not isinstance(x, _Int):
        raise MpqcError(f"node {node.name!r}: {node.op} reads a float value (its input must be quantized)")
    n, c, height, width = _shape(x.expr)
    divisors = pool_divisors(node, height, width)
    oh, ow = divisors.shape[-2:]
    a = node.attrs
    rows = window_bounds(height, oh, a["kernel"][0], a["stride"][0], a["padding"][0])
    cols = window_bounds(width, ow, a["kernel"][1], a["stride"][1], a["padding"][1])
    summed = lowering.bb.emit_te(_padded_window_sum_te, x.expr, rows, cols, _sum_dtype(x.expr),
                                 primfunc_name_hint="window_sum")
    return _Int(summed, x.scale / divisors)


@register_op
class AvgPool2d(OpDef):
    """Average pooling with any padding, ``ceil_mode`` and ``count_include_pad``: exact integer window sums, each
    position's scale ``s / PyTorch's divisor there``; ``divisor_override`` is refused."""

    names = ("avg_pool2d",)
    modules = (nn.AvgPool2d,)
    functions = (F.avg_pool2d, aten.avg_pool2d.default)
    keeps_integers = True
    sign = "preserving"
    keeps_zero = True
    averages = True
    numerics_tests = _TESTS + ("tests/test_tvm.py::test_padded_avg_pools_are_bit_exact",)

    def describe(self, gm, node, frozen):
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            kernel, stride, padding, ceil_mode, include_pad, divisor = (
                m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
        else:
            kernel, stride = arg(node, 1, "kernel_size", None), arg(node, 2, "stride", None)
            padding, ceil_mode = arg(node, 3, "padding", 0), arg(node, 4, "ceil_mode", False)
            include_pad, divisor = arg(node, 5, "count_include_pad", True), arg(node, 6, "divisor_override", None)
        if divisor:
            raise Unsupported("average pooling with divisor_override")
        attrs = pool_attrs(kernel, stride, padding, 1, ceil_mode)
        attrs["count_include_pad"] = bool(include_pad)
        return IntNode(node.name, "avg_pool2d", [node.all_input_nodes[0].name], attrs)

    def evaluate(self, program, node, env):
        x, a = env[node.inputs[0]], node.attrs
        if isinstance(x, IntValue):
            return pooled_integer(node, x)
        return F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                            a.get("count_include_pad", True))

    def relax(self, lowering, node):
        from mpqc.targets.tvm import NCHW, _Float, _Int, _window_sum_te as float_window_avg

        x = lowering.in_layout(lowering.env[node.inputs[0]], NCHW)
        a = node.attrs
        if isinstance(x, _Int):
            return relax_pooled_integer(lowering, node)
        if a["padding"] != [0, 0] or a["ceil_mode"]:
            raise MpqcError(f"node {node.name!r}: a padded or ceil_mode average pool of a float value")
        return _Float(lowering.bb.emit_te(float_window_avg, x.expr, a["kernel"], a["stride"], "float32", True,
                                          primfunc_name_hint="window_avg"))

    def onnx(self, builder, node):
        a = node.attrs
        pads = list(a["padding"]) * 2
        builder.add("AveragePool", [node.inputs[0]], [node.name], builder.label(node), kernel_shape=a["kernel"],
                    strides=a["stride"], pads=pads, ceil_mode=int(a["ceil_mode"]),
                    count_include_pad=int(a.get("count_include_pad", True)))
        builder.rank[node.name] = 4


# ------------------------------------------------------------------------- facts only (no integer semantics yet)
@register_op
class MaxPool1d(OpDef):
    modules = (nn.MaxPool1d,)
    sign = "preserving"
    keeps_zero = True


@register_op
class AvgPool1d(OpDef):
    modules = (nn.AvgPool1d, nn.AdaptiveAvgPool1d)
    sign = "preserving"
    keeps_zero = True
    averages = True


@register_op
class AdaptiveMaxPool2d(OpDef):
    modules = (nn.AdaptiveMaxPool2d,)
    functions = (F.adaptive_max_pool2d,)
    sign = "preserving"


@register_op
class Reduce(OpDef):
    """``mean`` / ``sum`` over dims (``keepdim`` or not), ``x.mean((2, 3))``: on an integer value the exact integer
    sum (int32, int64 for int32 accumulators) with scale ``s / count`` (``s`` for a sum); on a float value PyTorch's
    fp32 reduction (TVM: the last two dims of a rank-4 value only, in PyTorch's summation order). The reduced dims
    may not include the channel dim of a per-channel scale (refused at run time with the node's name)."""

    names = ("mean", "sum")
    functions = (torch.mean, torch.sum, aten.mean.dim, aten.sum.dim_IntList)
    methods = ("mean", "sum")
    keeps_integers = True
    sign = "preserving"
    averages = True  # its input gets a quantizer (an integer sum) when it would be a float value
    numerics_tests = ("tests/test_tvm.py::test_reductions_are_bit_exact",
                      "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits")

    def describe(self, gm, node, frozen):
        op = "sum" if node.target in (torch.sum, aten.sum.dim_IntList, "sum") else "mean"
        dims = arg(node, 1, "dim", None)
        if dims is None or node.kwargs.get("dtype") is not None:
            raise Unsupported(f"{op} over every dim, or with a dtype (reduce over some dims instead)")
        dims = [dims] if isinstance(dims, int) else list(dims)
        return IntNode(node.name, op, [node.all_input_nodes[0].name],
                       {"dims": dims, "keepdim": bool(arg(node, 2, "keepdim", False))})

    @staticmethod
    def dims(node: IntNode, rank: int) -> list[int]:
        return sorted(d % rank for d in node.attrs["dims"])

    @staticmethod
    def reduced_scale(node: IntNode, scale, shape: list[int], dims: list[int]):
        """The integer value's scale after the reduction: ``scale / count`` for a mean, without the reduced dims
        unless ``keepdim``; refused where a reduced dim carries different scales."""
        count = math.prod(shape[d] for d in dims) if node.op == "mean" else 1
        if scale.dim() == len(shape):
            if any(scale.shape[d] != 1 for d in dims):
                raise MpqcError(f"node {node.name!r}: {node.op} over a dim with per-channel scales")
            if not node.attrs["keepdim"]:
                scale = scale.squeeze(tuple(dims))
        return scale / count

    def evaluate(self, program, node, env):
        x = env[node.inputs[0]]
        keepdim = node.attrs["keepdim"]
        if isinstance(x, IntValue):
            dims = self.dims(node, x.q.dim())
            return IntValue(x.q.sum(dim=dims, keepdim=keepdim),
                            self.reduced_scale(node, x.scale, list(x.q.shape), dims))
        reduce = torch.mean if node.op == "mean" else torch.sum
        return reduce(x, dim=self.dims(node, x.dim()), keepdim=keepdim)

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import NCHW, _Float, _float_global_avg_pool_te, _Int, _shape, _sum_dtype

        x = lowering.in_layout(lowering.env[node.inputs[0]], NCHW)
        shape = _shape(x.expr)
        dims, keepdim = self.dims(node, len(shape)), node.attrs["keepdim"]
        if isinstance(x, _Int):
            summed = lowering.emit(R.sum(R.astype(x.expr, _sum_dtype(x.expr)), axis=dims, keepdims=keepdim))
            return _Int(summed, self.reduced_scale(node, x.scale, shape, dims))
        if node.op != "mean" or len(shape) != 4 or dims != [2, 3]:
            raise MpqcError(f"node {node.name!r}: the TVM target reduces float values only as a mean over the last "
                            f"two dims of a rank-4 value (got {node.op} over {dims} of rank {len(shape)})")
        mean = lowering.bb.emit_te(_float_global_avg_pool_te, x.expr, primfunc_name_hint="float_mean")
        return _Float(mean if keepdim else lowering.emit(R.reshape(mean, shape[:2])))

    def onnx(self, builder, node):
        import numpy as np
        from onnx import numpy_helper

        rank = builder.rank.get(node.inputs[0])
        if rank is None and any(d < 0 for d in node.attrs["dims"]):
            raise Unsupported(f"{node.op} over negative dims of a tensor of unknown rank: pass input_shapes")
        dims = [d % rank if rank else d for d in node.attrs["dims"]]
        keepdims = int(node.attrs["keepdim"])
        onnx_op = "ReduceMean" if node.op == "mean" else "ReduceSum"
        label = builder.label(node)
        if onnx_op == "ReduceSum" or builder.opset >= 18:  # axes became an input (ReduceSum: opset 13)
            axes = builder.initializer(numpy_helper.from_array(np.array(dims, dtype=np.int64), f"{label}.axes"))
            builder.add(onnx_op, [node.inputs[0], axes], [node.name], label, keepdims=keepdims)
        else:
            builder.add(onnx_op, [node.inputs[0]], [node.name], label, axes=dims, keepdims=keepdims)
        builder.rank[node.name] = None if rank is None else rank - (0 if keepdims else len(dims))
