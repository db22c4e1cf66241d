"""Exact integer building blocks, each in three backends of identical meaning (all int64):

* ``div_round_half_even(num, den)``: ``num / den`` rounded half to even, for ``den > 0`` and any sign of ``num``
  (the contract's rounding, applied to an exact rational instead of an fp32 product). Computed as
  ``q = floor(num / den)``, ``r = num - q * den`` in ``[0, den)``, plus one where ``2r > den`` or ``2r == den`` and
  ``q`` is odd. ONNX's integer ``Div`` truncates toward zero, so the ONNX form takes ``r = Mod(num, den)`` (fmod=0:
  the divisor's sign, i.e. Python's ``%``) and divides the exact multiple ``num - r``.
* ``isqrt(n)``: ``floor(sqrt(n))`` for ``0 <= n < 2**63``: ``x = floor(sqrt(float64(n)))`` (IEEE sqrt and the
  int64 -> float64 conversion are correctly rounded in every backend, so every backend gets the same ``x``, within
  one of the answer: the float64 relative error is below 2^-52, i.e. below 10^-6 absolute under 2^32), then one
  exact correction each way, ``x -= x > n // x`` and ``x += x + 1 <= n // (x + 1)`` (division rather than
  ``x * x``: no int64 overflow near 2^63). Tested against ``math.isqrt``. It replaced 40 unrolled Newton steps
  from ``2**32`` (I-BERT's), which made LayerNorm ~160 ops per use and its TVM build minutes long (issue 15).
  ``n = 0`` is computed as ``n = 1`` and returns 1 (callers want a nonzero divisor).
"""
from __future__ import annotations

import torch
from torch import Tensor



# --------------------------------------------------------------------------------------------- reference (torch)
def div_round_half_even(num: Tensor, den: Tensor) -> Tensor:
    """``round_half_even(num / den)`` exactly, int64, ``den > 0``."""
    q = torch.div(num, den, rounding_mode="floor")
    r = num - q * den
    up = (2 * r > den) | ((2 * r == den) & (q % 2 == 1))
    return q + up.to(torch.int64)


def isqrt(n: Tensor) -> Tensor:
    """``floor(sqrt(max(n, 1)))``, int64: a float64 estimate and one exact correction each way."""
    n = torch.clamp(n, min=1)
    x = torch.floor(torch.sqrt(n.to(torch.float64))).to(torch.int64)
    x = x - (x > torch.div(n, x, rounding_mode="floor")).to(torch.int64)
    return x + (x + 1 <= torch.div(n, x + 1, rounding_mode="floor")).to(torch.int64)


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
    x = bb.emit(op.astype(op.floor(op.sqrt(op.astype(n, "float64"))), "int64"))
    x = bb.emit(op.subtract(x, op.astype(op.greater(x, op.floor_divide(n, x)), "int64")))
    x1 = op.add(x, _c(1))
    return bb.emit(op.add(x, op.astype(op.less_equal(x1, op.floor_divide(n, x1)), "int64")))


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

    one = g.const(np.int64(1))
    n = g.node("Max", [n, one])
    estimate = g.node("Floor", [g.node("Sqrt", [g.node("Cast", [n], to=11)])])
    x = g.node("Cast", [estimate], to=7)
    x = g.node("Sub", [x, g.node("Cast", [g.node("Greater", [x, g.node("Div", [n, x])])], to=7)])
    x1 = g.node("Add", [x, one])
    return g.node("Add", [x, g.node("Cast", [g.node("LessOrEqual", [x1, g.node("Div", [n, x1])])], to=7)])
