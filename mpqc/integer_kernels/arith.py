"""Exact integer building blocks, each in three backends of identical meaning (all int64):

* ``div_round_half_even(num, den)``: ``num / den`` rounded half to even, for ``den > 0`` and any sign of ``num``
  (the contract's rounding, applied to an exact rational instead of an fp32 product). Computed as
  ``q = floor(num / den)``, ``r = num - q * den`` in ``[0, den)``, plus one where ``2r > den`` or ``2r == den`` and
  ``q`` is odd. ONNX's integer ``Div`` truncates toward zero, so the ONNX form takes ``r = Mod(num, den)`` (fmod=0:
  the divisor's sign, i.e. Python's ``%``) and divides the exact multiple ``num - r``.
* ``isqrt(n)``: ``floor(sqrt(n))`` for ``0 <= n < 2**63``, by :data:`ISQRT_STEPS` unrolled Newton steps
  ``x <- min(x, (x + n // x) // 2)`` from ``x = 2**32`` (I-BERT's integer square root, with a fixed start so that
  no backend needs a bit-length op). From above, floor-Newton decreases to ``floor(sqrt(n))`` and the ``min``
  keeps it there; the worst case (``n = 1``: the step only halves) needs 32 steps, ``n`` near ``2**63`` needs
  about 37 (tested against ``math.isqrt``). ``n = 0`` is computed as ``n = 1`` and returns 1 (callers want a
  nonzero divisor).
"""
from __future__ import annotations

import torch
from torch import Tensor

ISQRT_START = 2**32
ISQRT_STEPS = 40


# --------------------------------------------------------------------------------------------- reference (torch)
def div_round_half_even(num: Tensor, den: Tensor) -> Tensor:
    """``round_half_even(num / den)`` exactly, int64, ``den > 0``."""
    q = torch.div(num, den, rounding_mode="floor")
    r = num - q * den
    up = (2 * r > den) | ((2 * r == den) & (q % 2 == 1))
    return q + up.to(torch.int64)


def isqrt(n: Tensor) -> Tensor:
    """``floor(sqrt(max(n, 1)))`` by unrolled Newton steps, int64."""
    n = torch.clamp(n, min=1)
    x = torch.full_like(n, ISQRT_START)
    for _ in range(ISQRT_STEPS):
        x = torch.minimum(x, torch.div(x + torch.div(n, x, rounding_mode="floor"), 2, rounding_mode="floor"))
    return x


# --------------------------------------------------------------------------------------------- TVM (relax)
def _c(value: int):
    from tvm import relax

    return relax.const(value, "int64")


def div_round_half_even_relax(bb, num, den):
    from tvm import relax

    op = relax.op
    q = bb.emit(op.floor_divide(num, den))
    r = bb.emit(op.subtract(num, op.multiply(q, den)))
    two_r = bb.emit(op.multiply(r, _c(2)))
    odd = op.equal(op.floor_mod(q, _c(2)), _c(1))
    up = op.logical_or(op.greater(two_r, den), op.logical_and(op.equal(two_r, den), odd))
    return bb.emit(op.add(q, op.astype(up, "int64")))


def isqrt_relax(bb, n):
    from tvm import relax

    op = relax.op
    n = bb.emit(op.maximum(n, _c(1)))
    x = bb.emit(op.full_like(n, _c(ISQRT_START)))
    for _ in range(ISQRT_STEPS):
        x = bb.emit(op.minimum(x, op.floor_divide(op.add(x, op.floor_divide(n, x)), _c(2))))
    return x


# --------------------------------------------------------------------------------------------- ONNX
def div_round_half_even_onnx(g, num: str, den: str) -> str:
    import numpy as np

    r = g.node("Mod", [num, den], fmod=0)
    q = g.node("Div", [g.node("Sub", [num, r]), den])
    two = g.const(np.int64(2))
    two_r = g.node("Mul", [r, two])
    odd = g.node("Equal", [g.node("Mod", [q, two], fmod=0), g.const(np.int64(1))])
    up = g.node("Or", [g.node("Greater", [two_r, den]), g.node("And", [g.node("Equal", [two_r, den]), odd])])
    return g.node("Add", [q, g.node("Cast", [up], to=7)])


def isqrt_onnx(g, n: str) -> str:
    import numpy as np

    n = g.node("Max", [n, g.const(np.int64(1))])
    x = g.node("Expand", [g.const(np.int64(ISQRT_START)), g.node("Shape", [n])])
    two = g.const(np.int64(2))
    for _ in range(ISQRT_STEPS):
        x = g.node("Min", [x, g.node("Div", [g.node("Add", [x, g.node("Div", [n, x])]), two])])
    return x
