"""The generic kernel: TVM's own int8 operators, for every layer no ISA kernel takes (grouped and depthwise convs,
``conv1d``, linear layers on >2-D inputs, CUDA targets, CPUs without AVX2).

*Rewrites to*: ``conv1d`` / ``conv2d`` / ``matmul`` on the 8-bit codes (NCHW) and the int8 weights (``oihw``, or a
transposed ``io`` linear weight) with ``out_dtype="int32"``, plus the int32 bias: the exact accumulator, which
TVM's schedules only reorder. A grouped conv2d (a MobileNet's depthwise convs) of a channels-last value (what the
ISA kernels' layers leave) stays channels-last: NHWC codes, ``hwio`` weights, the loops over channels innermost,
where the default schedule vectorizes them; no transposes to NCHW and back around it.
"""
from __future__ import annotations

import numpy as np
import torch

from mpqc.reference import IntNode
from mpqc.targets.tvm.values import NCHW, NHWC, _Int, _shape


def convert(lowering, node: IntNode, x: _Int, bias: np.ndarray, scale: torch.Tensor) -> _Int:
    """``node`` (conv1d/conv2d/linear) on TVM's operators: its int32 accumulator with the bias added, in NCHW."""
    from tvm.relax import op as R

    a = node.attrs
    if node.op == "linear":
        w = lowering.weight(node, "io")  # [in, out]
        acc = lowering.emit(R.matmul(x.expr, w, out_dtype="int32"))
        bias_shape = [1] * (len(_shape(acc)) - 1) + [-1]
    elif node.op == "conv2d" and a["groups"] > 1 and x.layout == NHWC:
        w = lowering.weight(node, "hwio")
        acc = lowering.emit(R.nn.conv2d(x.expr, w, a["stride"], a["padding"], a["dilation"], a["groups"],
                                        data_layout="NHWC", kernel_layout="HWIO", out_dtype="int32"))
        b = lowering.param(f"{node.name}.bias", bias.reshape(1, 1, 1, -1))
        return _Int(lowering.emit(R.add(acc, b)), scale.reshape(1, 1, 1, -1), NHWC)
    else:
        x = lowering.in_layout(x, NCHW)
        w = lowering.weight(node, "oihw")
        conv = R.nn.conv2d if node.op == "conv2d" else R.nn.conv1d
        acc = lowering.emit(conv(x.expr, w, a["stride"], a["padding"], a["dilation"], a["groups"],
                                 out_dtype="int32"))
        bias_shape = [1, -1] + [1] * (len(_shape(acc)) - 2)
    b = lowering.param(f"{node.name}.bias", bias.reshape(bias_shape))
    acc = lowering.emit(R.add(acc, b))
    return _Int(acc, scale.reshape(bias_shape))  # channels last for linear (any rank), at dim 1 for convs
