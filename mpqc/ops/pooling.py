"""Pooling windows: max_pool1d/2d, avg_pool1d/2d (any padding, ceil_mode, count_include_pad), and the window
helpers the adaptive pools (``mpqc/ops/adaptive.py``) share.

``max_pool*`` keeps integers (and is a step of a requantisation region on floats); ``avg_pool*`` on integers
becomes the exact integer *sum* of each window with scale ``s / divisor`` (PyTorch's divisor at that position); on
floats it is PyTorch's fp32 mean (TVM: unpadded windows only, in ATen's summation order). The 1-d pools are the
2-d ones on a ``[N, C, 1, L]`` view (the same window rules: ATen computes them so), in the reference and in TVM;
ONNX has 1-d pools of its own.

A max or a sum of codes is only meaningful where the codes share one scale over the window: an integer value whose
scale varies over the pooled dims (after a ``count_include_pad=False`` average pool, say) is refused with the
node's name (:func:`check_uniform`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpqc.errors import MpqcError
from mpqc.ops.scales import compact_scale, move, relax_move
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, register_op

aten = torch.ops.aten

_TESTS = ("tests/test_tvm.py::test_less_common_ops_are_bit_exact",
          "tests/test_tvm.py::test_resnet20_is_bit_exact_with_the_reference",
          "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits")
POOL_TESTS = ("tests/test_ops_movement.py::test_pools_are_bit_exact_on_tvm",
              "tests/test_ops_movement.py::test_pools_agree_with_onnxruntime",
              "tests/test_ops_movement.py::test_onnxruntime_agrees_on_an_emulated_avx2_cpu")


# --------------------------------------------------------------------------------------------- shared helpers
def check_uniform(node: IntNode, scale: torch.Tensor, rank: int, dims: tuple[int, ...] = (-2, -1)) -> None:
    """Refuse an integer value whose scale varies along the pooled ``dims`` (codes of different scales)."""
    scale = compact_scale(scale)
    for d in dims:
        at = d % rank - (rank - scale.dim())
        if at >= 0 and scale.shape[at] > 1:
            raise MpqcError(f"node {node.name!r}: {node.op} of an integer value whose scale varies along the pooled "
                            f"dims (e.g. after an average pool with count_include_pad=False); quantize it first")


def pool_attrs(kernel, stride, padding, dilation, ceil_mode, dims: int = 2) -> dict:
    def many(value):
        return list(value) if isinstance(value, (tuple, list)) else [value] * dims

    return {"kernel": many(kernel), "stride": many(stride if stride else kernel), "padding": many(padding),
            "dilation": many(dilation), "ceil_mode": bool(ceil_mode)}


def as_2d(attrs: dict) -> dict:
    """The attributes of a 1-d pool as those of the 2-d pool on a ``[N, C, 1, L]`` view."""
    if len(attrs["kernel"]) == 2:
        return attrs
    lifted = {key: [first, *attrs[key]] for key, first in (("kernel", 1), ("stride", 1), ("padding", 0),
                                                           ("dilation", 1))}
    return {**attrs, **lifted}


def on_2d_view(value: Any, one_d: bool, pool: Callable[[Any], Any]) -> Any:
    """Reference: ``pool`` (a 2-d pool) applied to a 1-d value (``one_d``) through its ``[N, C, 1, L]`` view."""
    if not one_d:
        return pool(value)
    return move(pool(move(value, lambda t: t.unsqueeze(-2))), lambda t: t.squeeze(-2))


def relax_on_2d_view(lowering, value: Any, one_d: bool, pool: Callable[[Any], Any]) -> Any:
    """TVM: ``on_2d_view``."""
    from tvm.relax import op as R

    if not one_d:
        return pool(value)
    lifted = relax_move(lowering, value, lambda e: R.expand_dims(e, -2), lambda t: t.unsqueeze(-2))
    return relax_move(lowering, pool(lifted), lambda e: R.squeeze(e, [-2]), lambda t: t.squeeze(-2))


def max_pool(x, a: dict):
    return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


def _pool(x: torch.Tensor, a: dict, **kwargs) -> torch.Tensor:
    return F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], **kwargs)


def pool_divisors(attrs: dict, height: int, width: int) -> torch.Tensor:
    """The divisor of each output position (float64, ``[1, 1, oh, ow]``): what PyTorch divides each window's sum
    by, found by pooling ones (so every padding / ceil_mode / count_include_pad rule is PyTorch's own)."""
    ones = torch.ones(1, 1, height, width, dtype=torch.float64)
    sums = _pool(ones, attrs, count_include_pad=True, divisor_override=1)
    return torch.round(sums / _pool(ones, attrs, count_include_pad=attrs.get("count_include_pad", True)))


def window_sums(attrs: dict, q: torch.Tensor) -> torch.Tensor:
    """The exact integer sum of each pooling window of ``q`` (int64; padding adds zeros)."""
    sums = _pool(q.to(torch.float64), attrs, count_include_pad=True, divisor_override=1)
    return torch.round(sums).to(torch.int64)


def windows(kind: str, count: int, size: int, *args: int) -> tuple:
    """The windows along one dim as TVM computes them: ``("window", count, size, kernel, stride, padding)`` (a pool's,
    clipped to the input) or ``("adaptive", count, size)`` (PyTorch's adaptive windows)."""
    return (kind, count, size, *args)


def window_range(spec: tuple, i):
    """``[start, end)`` of window ``i`` (a Python int or a TIR expression) of ``spec`` (:func:`windows`)."""
    from tvm import tirx

    kind, count, size, *args = spec
    if kind == "adaptive":
        return (i * size) // count, ((i + 1) * size + count - 1) // count
    kernel, stride, padding = args
    if isinstance(i, int):
        return max(i * stride - padding, 0), min(i * stride - padding + kernel, size)
    return tirx.max(i * stride - padding, 0), tirx.min(i * stride - padding + kernel, size)


def window_te(x, rows: tuple, cols: tuple, out_dtype: str, reduce: str = "sum"):
    """TVM: the sum (or max) of each window of ``x`` (``[N, C, H, W]``; ``rows``/``cols``: :func:`windows`), a
    reduction over the largest window's extent with each window's bounds in closed form of the output index. A
    sum masks what lies past a window's end; a max reads ``min(start + u, end - 1)`` there (the window's own last
    element again, which leaves the max unchanged). Integer sums and maxima are exact in any order."""
    from tvm import te, tirx

    n, c, height, width = (int(d) for d in x.shape)
    kh = max(b - a for a, b in (window_range(rows, i) for i in range(rows[1])))
    kw = max(b - a for a, b in (window_range(cols, j) for j in range(cols[1])))
    u, v = te.reduce_axis((0, kh), name="u"), te.reduce_axis((0, kw), name="v")

    def body(b, ch, i, j):
        (r0, r1), (c0, c1) = window_range(rows, i), window_range(cols, j)
        if reduce == "max":
            return te.max(x[b, ch, tirx.min(r0 + u, r1 - 1), tirx.min(c0 + v, c1 - 1)].astype(out_dtype), axis=[u, v])
        value = x[b, ch, tirx.min(r0 + u, height - 1), tirx.min(c0 + v, width - 1)].astype(out_dtype)
        return te.sum(tirx.Select(tirx.all(r0 + u < r1, c0 + v < c1), value, tirx.const(0, out_dtype)), axis=[u, v])

    return te.compute((n, c, rows[1], cols[1]), body, name=f"window_{reduce}")


def integer_input(node: IntNode, x):
    if not isinstance(x, IntValue) and type(x).__name__ != "_Int":
        raise MpqcError(f"node {node.name!r}: {node.op} reads a float value (its input must be quantized)")
    return x


def pooled_integer(node: IntNode, x: IntValue, attrs: dict) -> IntValue:
    """The reference of an average pool on an integer value: exact window sums, scale ``s / divisor`` per
    position (compacted: one number where every divisor is the same)."""
    check_uniform(node, x.scale, x.q.dim())
    divisors = pool_divisors(attrs, x.q.shape[-2], x.q.shape[-1])
    return IntValue(window_sums(attrs, x.q), compact_scale(x.scale / divisors))


def relax_pooled_integer(lowering, node: IntNode, x, attrs: dict):
    """TVM: ``pooled_integer`` (the same divisors and scales, from the same torch code)."""
    from mpqc.targets.tvm import NCHW, _Int, _shape, _sum_dtype

    x = lowering.in_layout(x, NCHW)
    n, c, height, width = _shape(x.expr)
    check_uniform(node, x.scale, 4)
    divisors = pool_divisors(attrs, height, width)
    oh, ow = divisors.shape[-2:]
    rows = windows("window", oh, height, attrs["kernel"][0], attrs["stride"][0], attrs["padding"][0])
    cols = windows("window", ow, width, attrs["kernel"][1], attrs["stride"][1], attrs["padding"][1])
    summed = lowering.bb.emit_te(window_te, x.expr, rows, cols, _sum_dtype(x.expr), primfunc_name_hint="window_sum")
    return _Int(summed, compact_scale(x.scale / divisors))


# --------------------------------------------------------------------------------------------- max pooling
@register_op
class MaxPool(OpDef):
    names = ("max_pool2d", "max_pool1d")
    modules = (nn.MaxPool2d, nn.MaxPool1d)
    functions = (F.max_pool2d, aten.max_pool2d.default, F.max_pool1d, aten.max_pool1d.default)
    keeps_integers = True
    sign = "preserving"  # padding never wins a max against a value >= 0
    keeps_zero = True
    fuses_into_requantize = True
    commutes_with_rounding = True  # max(f(x_i)) == f(max(x_i)) for the monotone scale-round-clip f
    numerics_tests = _TESTS + POOL_TESTS

    def describe(self, gm, node, frozen):
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            dims = 1 if isinstance(m, nn.MaxPool1d) else 2
            if m.return_indices:
                raise Unsupported("max pooling with return_indices")
            attrs = pool_attrs(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, dims)
        else:
            dims = 1 if node.target in (F.max_pool1d, aten.max_pool1d.default) else 2
            if arg(node, 6, "return_indices", False):
                raise Unsupported("max pooling with return_indices")
            attrs = pool_attrs(arg(node, 1, "kernel_size", None), arg(node, 2, "stride", None),
                               arg(node, 3, "padding", 0), arg(node, 4, "dilation", 1),
                               arg(node, 5, "ceil_mode", False), dims)
        return IntNode(node.name, f"max_pool{dims}d", [node.all_input_nodes[0].name], attrs)

    def evaluate(self, program, node, env):
        a = as_2d(node.attrs)

        def pool(x):
            if isinstance(x, IntValue):
                check_uniform(node, x.scale, x.q.dim())
                return IntValue(torch.round(max_pool(x.q.to(torch.float64), a)).to(torch.int64), x.scale)
            return max_pool(x, a)

        return on_2d_view(env[node.inputs[0]], node.op.endswith("1d"), pool)

    def requantize_step(self, node, inputs, s_out):
        return on_2d_view(inputs[0], node.op.endswith("1d"), lambda x: max_pool(x, as_2d(node.attrs)))

    def relax(self, lowering, node):
        return self._relax(lowering, node, lowering.env[node.inputs[0]])

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        return self._relax(lowering, node, inputs[0])

    def _relax(self, lowering, node, value):
        from mpqc.targets.tvm import NHWC, _Float, _Int, _max_pool

        a = as_2d(node.attrs)

        def pool(x):
            pooled = lowering.emit(_max_pool(x.expr, a, x.layout))
            if isinstance(x, _Int):
                check_uniform(node, x.scale, 4, (1, 2) if x.layout == NHWC else (2, 3))
                return _Int(pooled, x.scale, x.layout)
            return _Float(pooled, x.layout)

        return relax_on_2d_view(lowering, value, node.op.endswith("1d"), pool)

    def onnx(self, builder, node):
        a = node.attrs
        builder.add("MaxPool", [node.inputs[0]], [node.name], builder.label(node), kernel_shape=a["kernel"],
                    strides=a["stride"], pads=list(a["padding"]) * 2, dilations=a["dilation"],
                    ceil_mode=int(a["ceil_mode"]))
        builder.rank[node.name] = len(a["kernel"]) + 2


MaxPool2d = MaxPool  # (the name it had before the 1-d pools joined it)


# --------------------------------------------------------------------------------------------- average pooling
@register_op
class AvgPool(OpDef):
    """Average pooling with any padding, ``ceil_mode`` and ``count_include_pad``: exact integer window sums, each
    position's scale ``s / PyTorch's divisor there``; ``divisor_override`` is refused."""

    names = ("avg_pool2d", "avg_pool1d")
    modules = (nn.AvgPool2d, nn.AvgPool1d)
    functions = (F.avg_pool2d, aten.avg_pool2d.default, F.avg_pool1d, aten.avg_pool1d.default)
    keeps_integers = True
    sign = "preserving"
    keeps_zero = True
    averages = True
    numerics_tests = _TESTS + POOL_TESTS + ("tests/test_tvm.py::test_padded_avg_pools_are_bit_exact",)

    def describe(self, gm, node, frozen):
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            dims = 1 if isinstance(m, nn.AvgPool1d) else 2
            kernel, stride, padding, ceil_mode, include_pad = (m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                               m.count_include_pad)
            divisor = getattr(m, "divisor_override", None)
        else:
            dims = 1 if node.target in (F.avg_pool1d, aten.avg_pool1d.default) else 2
            kernel, stride = arg(node, 1, "kernel_size", None), arg(node, 2, "stride", None)
            padding, ceil_mode = arg(node, 3, "padding", 0), arg(node, 4, "ceil_mode", False)
            include_pad = arg(node, 5, "count_include_pad", True)
            divisor = arg(node, 6, "divisor_override", None) if dims == 2 else None
        if divisor:
            raise Unsupported("average pooling with divisor_override")
        attrs = pool_attrs(kernel, stride, padding, 1, ceil_mode, dims)
        attrs["count_include_pad"] = bool(include_pad)
        return IntNode(node.name, f"avg_pool{dims}d", [node.all_input_nodes[0].name], attrs)

    def evaluate(self, program, node, env):
        a = as_2d(node.attrs)

        def pool(x):
            if isinstance(x, IntValue):
                return pooled_integer(node, x, a)
            return F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                                a.get("count_include_pad", True))

        return on_2d_view(env[node.inputs[0]], node.op.endswith("1d"), pool)

    def relax(self, lowering, node):
        from mpqc.targets.tvm import NCHW, _Float, _Int, _window_sum_te as float_window_avg

        a = as_2d(node.attrs)

        def pool(x):
            x = lowering.in_layout(x, NCHW)
            if isinstance(x, _Int):
                return relax_pooled_integer(lowering, node, x, a)
            if any(a["padding"]) or a["ceil_mode"]:
                raise MpqcError(f"node {node.name!r}: a padded or ceil_mode average pool of a float value")
            return _Float(lowering.bb.emit_te(float_window_avg, x.expr, a["kernel"], a["stride"], "float32", True,
                                              primfunc_name_hint="window_avg"))

        return relax_on_2d_view(lowering, lowering.env[node.inputs[0]], node.op.endswith("1d"), pool)

    def onnx(self, builder, node):
        a = node.attrs
        pads = list(a["padding"]) * 2
        builder.add("AveragePool", [node.inputs[0]], [node.name], builder.label(node), kernel_shape=a["kernel"],
                    strides=a["stride"], pads=pads, ceil_mode=int(a["ceil_mode"]),
                    count_include_pad=int(a.get("count_include_pad", True)))
        builder.rank[node.name] = len(a["kernel"]) + 2


AvgPool2d = AvgPool
