"""Adaptive pooling, 1-d and 2-d: average (``global_avg_pool`` for a 2-d value pooled to 1x1,
``adaptive_avg_pool`` to any size) and max (``adaptive_max_pool``).

PyTorch's adaptive window ``i`` of an input of size ``H`` pooled to ``out`` covers ``[floor(i * H / out),
ceil((i + 1) * H / out))`` (:func:`adaptive_bounds`); windows may overlap and differ in size. On an integer value:

* average: the exact integer sum of the codes in each window (int64 in the reference, from an integral image; int32
  sums of 8-bit codes in TVM, the windows' bounds constants of the generated code) with scale ``s / count`` per
  position, the count a float64 of the reference's own (TVM uses the same torch expression): the division is in
  the scale, so nothing is rounded before the quantize node that follows, whose multipliers both compute alike.
  A float input is refused (``averages``: the quantizer pass quantizes it first).
* max: the max of the codes (exact); on floats (a step of a requantisation region) the max of the fp32 values.

ONNX has no adaptive pools: where every window has the same size (the input a multiple of the output) they are
AveragePool/MaxPool with kernel = stride; otherwise the average is two MatMuls with 0/1 window matrices then a
division by the counts (fp32: within the 1-LSB contract), and the max is a Gather of each window's elements
(indices clamped to the window, as in TVM) then ReduceMax, per dim. Both need the input's spatial size, recorded
from the traced shapes at ``describe`` (``input_size``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpqc.ops.scales import compact_scale, traced_shape
from mpqc.ops.pooling import (_TESTS, POOL_TESTS, check_uniform, integer_input, on_2d_view, relax_on_2d_view,
                              window_te, windows)
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, op_of, pair, register_op

aten = torch.ops.aten


def adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive windows ``[floor(i * size / out), ceil((i + 1) * size / out))``."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def window_specs(node: IntNode, height: int, width: int) -> tuple[tuple, tuple]:
    """The row and column windows (``pooling.windows``) of a (2-d view of a) value of ``height`` x ``width``."""
    sizes = node.attrs["output_size"]
    if len(sizes) == 1:
        return windows("adaptive", 1, 1), windows("adaptive", sizes[0] or width, width)
    return windows("adaptive", sizes[0] or height, height), windows("adaptive", sizes[1] or width, width)


def window_grid(node: IntNode, height: int, width: int) -> tuple[list, list]:
    """The row and column windows as lists of ``(start, end)``."""
    return tuple(adaptive_bounds(size, count) for _, count, size in window_specs(node, height, width))


def window_counts(rows: list, cols: list) -> torch.Tensor:
    """Elements per window (float64, ``[1, 1, oh, ow]``)."""
    r = torch.tensor([b - a for a, b in rows], dtype=torch.float64)
    c = torch.tensor([b - a for a, b in cols], dtype=torch.float64)
    return (r[:, None] * c[None, :]).reshape(1, 1, len(rows), len(cols))


def integral_sums(q: torch.Tensor, rows: list, cols: list) -> torch.Tensor:
    """The exact sum of each window of ``q`` (``[..., H, W]``, int64) from its integral image."""
    s = torch.nn.functional.pad(q.to(torch.int64).cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    r0, r1 = (torch.tensor([b[k] for b in rows]) for k in (0, 1))
    c0, c1 = (torch.tensor([b[k] for b in cols]) for k in (0, 1))

    def at(r, c):
        return s.index_select(-2, r).index_select(-1, c)

    return at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)


def input_size(gm, node) -> list[int] | None:
    """The traced spatial size of ``node``'s input (through the quantizers inserted after the capture)."""
    source = node.all_input_nodes[0]
    while traced_shape(source) is None and getattr(op_of(gm, source), "keeps_shape", False):
        source = source.all_input_nodes[0]
    shape = traced_shape(source)
    return None if shape is None else shape[2:]


def adaptive_attrs(gm, node, dims: int) -> dict:
    size = gm.get_submodule(node.target).output_size if node.op == "call_module" else \
        arg(node, 1, "output_size", None)
    size = [size] * dims if not isinstance(size, (tuple, list)) else list(size)
    attrs: dict[str, Any] = {"output_size": size}
    spatial = input_size(gm, node)
    if spatial is not None:
        attrs["input_size"] = spatial
    return attrs


@register_op
class GlobalAvgPool(OpDef):
    """Adaptive average pooling: of a 2-d value to 1x1 (``global_avg_pool``), otherwise ``adaptive_avg_pool``."""

    names = ("global_avg_pool", "adaptive_avg_pool")
    modules = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)
    functions = (F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default, F.adaptive_avg_pool1d,
                 aten.adaptive_avg_pool1d.default)
    keeps_integers = True
    sign = "preserving"
    keeps_zero = True
    averages = True
    numerics_tests = _TESTS + POOL_TESTS + ("tests/test_tvm.py::test_torch_sum_order_reproduces_pytorch_mean",)

    def describe(self, gm, node, frozen):
        one_d = isinstance(gm.get_submodule(node.target), nn.AdaptiveAvgPool1d) if node.op == "call_module" else \
            node.target in (F.adaptive_avg_pool1d, aten.adaptive_avg_pool1d.default)
        attrs = adaptive_attrs(gm, node, 1 if one_d else 2)
        if not one_d and pair(attrs["output_size"]) == (1, 1):
            return IntNode(node.name, "global_avg_pool", [node.all_input_nodes[0].name])
        return IntNode(node.name, "adaptive_avg_pool", [node.all_input_nodes[0].name], attrs)

    # ----------------------------------------------------------------------------- reference
    def evaluate(self, program, node, env):
        x = env[node.inputs[0]]
        if node.op == "adaptive_avg_pool":
            return on_2d_view(integer_input(node, x), len(node.attrs["output_size"]) == 1,
                              lambda v: self._pooled(node, v))
        if isinstance(x, IntValue):
            check_uniform(node, x.scale, x.q.dim())
            window = x.q.shape[-1] * x.q.shape[-2]
            return IntValue(x.q.sum(dim=(-2, -1), keepdim=True), compact_scale(x.scale / window))
        return F.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def _pooled(node: IntNode, x: IntValue) -> IntValue:
        check_uniform(node, x.scale, x.q.dim())
        rows, cols = window_grid(node, *x.q.shape[-2:])
        return IntValue(integral_sums(x.q, rows, cols), compact_scale(x.scale / window_counts(rows, cols)))

    # ----------------------------------------------------------------------------- TVM
    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.targets.tvm import (_CHECKED_FLOAT_MEAN_WINDOW, NCHW, NHWC, _Float, _float_global_avg_pool_te, _Int,
                                      _shape, _sum_dtype)

        x = lowering.env[node.inputs[0]]
        if node.op == "adaptive_avg_pool":
            return relax_on_2d_view(lowering, integer_input(node, x), len(node.attrs["output_size"]) == 1,
                                    lambda v: self._relax_pooled(lowering, node, v))
        if isinstance(x, _Int):
            axes = [1, 2] if x.layout == NHWC else [-2, -1]
            check_uniform(node, x.scale, 4, tuple(axes))
            shape = _shape(x.expr)
            summed = lowering.emit(R.sum(R.astype(x.expr, _sum_dtype(x.expr)), axis=axes, keepdims=True))
            return _Int(summed, compact_scale(x.scale / (shape[axes[0]] * shape[axes[1]])), x.layout)
        x = lowering.in_layout(x, NCHW)
        shape = _shape(x.expr)
        window = shape[-1] * shape[-2]
        if window > _CHECKED_FLOAT_MEAN_WINDOW:
            lowering.inexact.append(f"{node.name}: fp32 mean over {window} elements (PyTorch's summation order is "
                                    f"reproduced and checked only up to {_CHECKED_FLOAT_MEAN_WINDOW})")
        return _Float(lowering.bb.emit_te(_float_global_avg_pool_te, x.expr, primfunc_name_hint="float_mean"))

    @staticmethod
    def _relax_pooled(lowering, node: IntNode, x):
        from mpqc.targets.tvm import NCHW, _Int, _shape, _sum_dtype

        x = lowering.in_layout(x, NCHW)
        check_uniform(node, x.scale, 4)
        rows, cols = window_specs(node, *_shape(x.expr)[-2:])
        summed = lowering.bb.emit_te(window_te, x.expr, rows, cols, _sum_dtype(x.expr), primfunc_name_hint="window_sum")
        return _Int(summed, compact_scale(x.scale / window_counts(*window_grid(node, *_shape(x.expr)[-2:]))))

    # ----------------------------------------------------------------------------- ONNX
    def onnx(self, builder, node):
        if node.op == "global_avg_pool":
            builder.add("GlobalAveragePool", [node.inputs[0]], [node.name], builder.label(node))
            builder.rank[node.name] = builder.rank.get(node.inputs[0])
            return
        label, spatial, uniform, grid = onnx_windows(builder, node)
        if uniform:
            kernel = [(b - a) for (a, b) in (g[0] for g in grid)]
            builder.add("AveragePool", [node.inputs[0]], [node.name], label, kernel_shape=kernel, strides=kernel)
        else:  # sum each dim with a 0/1 window matrix, then divide by the counts
            current = node.inputs[0]
            for axis, bounds in enumerate(grid):
                size = spatial[axis]
                matrix = np.zeros((size, len(bounds)), dtype=np.float32)
                for i, (a, b) in enumerate(bounds):
                    matrix[a:b, i] = 1
                last = axis == len(grid) - 1
                if last:  # x @ M sums the last dim
                    inputs = [current, constant(builder, f"{label}.windows{axis}", matrix)]
                else:  # M^T @ x sums the dim before it
                    inputs = [constant(builder, f"{label}.windows{axis}", matrix.T.copy()), current]
                builder.add("MatMul", inputs, [f"{label}.sum{axis}"], f"{label}/MatMul{axis}")
                current = f"{label}.sum{axis}"
            counts = np.ones([len(b) for b in grid], dtype=np.float32)
            for axis, bounds in enumerate(grid):
                shape = [1] * len(grid)
                shape[axis] = len(bounds)
                counts = counts * np.array([b - a for a, b in bounds], dtype=np.float32).reshape(shape)
            builder.add("Div", [current, constant(builder, f"{label}.counts", counts)], [node.name], label)
        builder.rank[node.name] = len(grid) + 2


def constant(builder, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper

    return builder.initializer(numpy_helper.from_array(array, name))


def onnx_windows(builder, node: IntNode) -> tuple[str, list[int], bool, list[list[tuple[int, int]]]]:
    """ONNX: the label, the input's spatial size, whether every window has the same size and stride (a plain
    pool), and each pooled dim's windows."""
    if "input_size" not in node.attrs:
        raise Unsupported(f"{node.op} without the traced input size")
    spatial = node.attrs["input_size"]
    grid = [adaptive_bounds(size, out or size) for size, out in zip(spatial, node.attrs["output_size"])]
    uniform = all(size % len(bounds) == 0 for size, bounds in zip(spatial, grid))
    return builder.label(node), spatial, uniform, grid


@register_op
class AdaptiveMaxPool(OpDef):
    """Adaptive max pooling (1-d, 2-d) without ``return_indices``."""

    names = ("adaptive_max_pool",)
    modules = (nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool1d)
    functions = (F.adaptive_max_pool2d, F.adaptive_max_pool1d)
    keeps_integers = True
    sign = "preserving"
    keeps_zero = True
    fuses_into_requantize = True
    numerics_tests = POOL_TESTS

    def describe(self, gm, node, frozen):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            one_d, indices = isinstance(module, nn.AdaptiveMaxPool1d), module.return_indices
        else:
            one_d, indices = node.target is F.adaptive_max_pool1d, arg(node, 2, "return_indices", False)
        if indices:
            raise Unsupported("adaptive max pooling with return_indices")
        return IntNode(node.name, "adaptive_max_pool", [node.all_input_nodes[0].name],
                       adaptive_attrs(gm, node, 1 if one_d else 2))

    @staticmethod
    def _max(node: IntNode, x):
        rows, cols = window_grid(node, *x.shape[-2:])
        return F.adaptive_max_pool2d(x, (len(rows), len(cols)))

    def evaluate(self, program, node, env):
        def pool(x):
            if isinstance(x, IntValue):
                check_uniform(node, x.scale, x.q.dim())
                return IntValue(torch.round(self._max(node, x.q.to(torch.float64))).to(torch.int64), x.scale)
            return self._max(node, x)

        return on_2d_view(env[node.inputs[0]], len(node.attrs["output_size"]) == 1, pool)

    def requantize_step(self, node, inputs, s_out):
        return on_2d_view(inputs[0], len(node.attrs["output_size"]) == 1, lambda x: self._max(node, x))

    def relax(self, lowering, node):
        return self._relax(lowering, node, lowering.env[node.inputs[0]])

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        return self._relax(lowering, node, inputs[0])

    def _relax(self, lowering, node, value):
        from mpqc.targets.tvm import NCHW, _dtype, _Float, _Int, _shape

        def pool(x):
            x = lowering.in_layout(x, NCHW)
            rows, cols = window_specs(node, *_shape(x.expr)[-2:])
            pooled = lowering.bb.emit_te(window_te, x.expr, rows, cols, _dtype(x.expr), "max",
                                         primfunc_name_hint="window_max")
            if isinstance(x, _Int):
                check_uniform(node, x.scale, 4)
                return _Int(pooled, x.scale)
            return _Float(pooled)

        return relax_on_2d_view(lowering, value, len(node.attrs["output_size"]) == 1, pool)

    def onnx(self, builder, node):
        label, spatial, uniform, grid = onnx_windows(builder, node)
        if uniform:
            kernel = [(b - a) for (a, b) in (g[0] for g in grid)]
            builder.add("MaxPool", [node.inputs[0]], [node.name], label, kernel_shape=kernel, strides=kernel)
        else:  # per dim: gather each window's elements (indices clamped to the window), then ReduceMax
            current = node.inputs[0]
            for k, bounds in enumerate(grid):
                axis = 2 + k
                width = max(b - a for a, b in bounds)
                index = np.array([[min(a + u, b - 1) for a, b in bounds] for u in range(width)], dtype=np.int64)
                gathered = f"{label}.gathered{k}"
                builder.add("Gather", [current, constant(builder, f"{label}.index{k}", index)], [gathered],
                            f"{label}/Gather{k}", axis=axis)
                output = node.name if k == len(grid) - 1 else f"{label}.max{k}"
                if builder.opset >= 18:
                    axes = constant(builder, f"{label}.axes{k}", np.array([axis], dtype=np.int64))
                    builder.add("ReduceMax", [gathered, axes], [output], f"{label}/ReduceMax{k}", keepdims=0)
                else:
                    builder.add("ReduceMax", [gathered], [output], f"{label}/ReduceMax{k}", axes=[axis], keepdims=0)
                current = output
        builder.rank[node.name] = len(grid) + 2
