"""The values the lowering passes between converters, and small Relax helpers on them.

An integer value is :class:`_Int` (``q * scale``, ``q`` a Relax tensor, ``scale`` the reference's own float64
tensor), a float one :class:`_Float`; both carry their layout (``NCHW``, the program's own, or channels-last
``NHWC``, where the implicit-GEMM kernels leave their results). The op converters of ``mpqc/ops/*`` build and read
these through ``_Lowering`` (``lowering.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

NCHW, NHWC = "NCHW", "NHWC"  # a value's layout: the program's own (channels at dim 1), or channels-last (4-D only)


@dataclass
class _Int:
    """An integer value ``q * scale``: ``q`` a Relax tensor (int8/uint8/int32/int64), ``scale`` the float64 torch
    tensor the reference computes for it (same expressions, so the multipliers derived from it are the same),
    shaped to broadcast against ``q`` in ``layout``."""

    expr: Any
    scale: torch.Tensor
    layout: str = NCHW


@dataclass
class _Float:
    expr: Any
    layout: str = NCHW


_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _dtype(expr) -> str:
    return str(expr.ty.dtype)




def _sum_dtype(expr) -> str:
    return "int32" if _dtype(expr) in ("int8", "uint8") else "int64"




def _max_pool(expr, a: dict, layout: str = NCHW):
    from tvm.relax import op as R

    return R.nn.max_pool2d(expr, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                           layout=layout)


def _flatten(expr, start: int):
    from tvm.relax import op as R

    shape = _shape(expr)
    start = start % len(shape) if shape else 0
    return R.reshape(expr, shape[:start] + [math.prod(shape[start:])])
