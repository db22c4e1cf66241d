"""Tensor-expression kernels whose arithmetic the reference fixes bit for bit: exact fp32 multiplies, round-half-even
requantisation, and sums in PyTorch's own order.

Each is a plain TE function used through ``BlockBuilder.emit_te`` by the lowering core (``lowering.py``) and the op
converters (``mpqc/ops/*``); why each is spelled as it is (FMA contraction, ``roundeven``, ATen's ``cascade_sum``)
is in its docstring and in the package docstring.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

# Windows up to this many elements were checked equal to PyTorch's float mean (tests and package docstring).
_CHECKED_FLOAT_MEAN_WINDOW = 1000


def _exact_mul_te(a, b, *, mode: str):
    """``a * b`` (b broadcast NumPy-style) rounded once to fp32 and never fused into an FMA with what follows."""
    from tvm import te, tirx

    rank_a, rank_b = len(a.shape), len(b.shape)

    def body(*index):
        b_index = [0 if int(b.shape[d]) == 1 else index[rank_a - rank_b + d] for d in range(rank_b)]
        x, y = a[index], b[tuple(b_index)] if rank_b else b[()]
        if mode == "cuda":
            return tirx.call_pure_extern("float32", "__fmul_rn", x, y)
        return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", x * y)

    return te.compute(a.shape, body, name="exact_mul")


def _round_clip_te(y, qmin: int, qmax: int, storage: str):
    """``clamp(round_half_even(y), qmin, qmax)`` as ``storage``. ``llvm.roundeven`` rather than Relax ``round``:
    that lowers to ``nearbyint``, which TVM's loop vectorizer cannot vectorize (it scalarised every requantisation
    loop); ``roundeven`` is the same rounding (half to even, independent of the FP environment) and vectorizes
    to ``vrndscaleps $8``."""
    from tvm import te, tirx

    low, high = tirx.const(float(qmin), "float32"), tirx.const(float(qmax), "float32")

    def body(*index):
        rounded = tirx.call_llvm_pure_intrin("float32", "llvm.roundeven", y[index])
        return tirx.min(tirx.max(rounded, low), high).astype(storage)

    return te.compute(y.shape, body, name="requantize")


def torch_sum_order(values: Sequence[Any], add: Callable[[Any, Any], Any]) -> Any:
    """Sum ``values`` in the order PyTorch's CPU ``sum``/``mean`` does for one contiguous reduced row.

    ATen's ``cascade_sum``: rows of >= 8 elements are summed as 8-lane vectors (``vectorized_inner_sum``), each lane
    with ``row_sum``'s 4-way ILP accumulators (``multi_row_sum``, cascading every 16 rows), then the scalar tail and
    the lanes are added in order; shorter rows use ``row_sum`` on scalars. ``add`` builds one fp32 addition.
    """
    vec = 8

    def plus(a, b):
        return b if a is None else a if b is None else add(a, b)

    def multi_row_sum(rows: list[list[Any]]) -> list[Any]:
        size, levels, nrows = len(rows), 4, 4
        level_power = max(4, (math.ceil(math.log2(size)) if size > 1 else 0) // levels)
        step, mask = 1 << level_power, (1 << level_power) - 1
        acc: list[list[Any]] = [[None] * nrows for _ in range(levels)]
        i = 0
        while i + step <= size:
            for j in range(step):
                for k in range(nrows):
                    acc[0][k] = plus(acc[0][k], rows[i + j][k])
            for j in range(1, levels):
                for k in range(nrows):
                    acc[j][k], acc[j - 1][k] = plus(acc[j][k], acc[j - 1][k]), None
                if i & (mask << (j * level_power)):
                    break
            i += step
        for r in range(i, size):
            for k in range(nrows):
                acc[0][k] = plus(acc[0][k], rows[r][k])
        for j in range(1, levels):
            for k in range(nrows):
                acc[0][k] = plus(acc[0][k], acc[j][k])
        return acc[0]

    def row_sum(row: Sequence[Any]) -> Any:
        ilp = len(row) // 4
        partial = multi_row_sum([[row[r * 4 + k] for k in range(4)] for r in range(ilp)])
        for i in range(ilp * 4, len(row)):
            partial[0] = plus(partial[0], row[i])
        for k in range(1, 4):
            partial[0] = plus(partial[0], partial[k])
        return partial[0]

    n = len(values)
    if n < vec:
        return row_sum(values)
    rows = n // vec
    lanes = [row_sum([values[r * vec + lane] for r in range(rows)]) for lane in range(vec)]
    total = None
    for k in range(rows * vec, n):
        total = plus(total, values[k])
    for lane in lanes:
        total = plus(total, lane)
    return total


def _float_global_avg_pool_te(x):
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in x.shape)

    def body(b, ch, i, j):
        values = [x[b, ch, k // w, k % w] for k in range(h * w)]
        return torch_sum_order(values, lambda p, q: p + q) / tirx.const(float(h * w), "float32")

    return te.compute((n, c, 1, 1), body, name="float_global_avg_pool")


def _window_sum_te(x, kernel, stride, out_dtype: str, divide: bool):
    """Sum of each ``kernel`` window (no padding), in row-major order; ``divide``: then / window (fp32 avg pool)."""
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in x.shape)
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1

    def body(b, ch, i, j):
        total = None
        for u in range(kh):
            for v in range(kw):
                value = x[b, ch, i * sh + u, j * sw + v].astype(out_dtype)
                total = value if total is None else total + value
        return total / tirx.const(float(kh * kw), "float32") if divide else total

    return te.compute((n, c, oh, ow), body, name="window_avg" if divide else "window_sum")
