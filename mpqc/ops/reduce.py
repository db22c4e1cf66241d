"""Reductions over dims: ``mean`` / ``sum`` (see the class docstring).
"""
from __future__ import annotations

import math

import torch

from mpqc.errors import MpqcError
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, register_op

aten = torch.ops.aten


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
