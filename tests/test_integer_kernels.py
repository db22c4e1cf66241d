"""Integer kernels of transformer ops (mpqc/integer_kernels): each reference against exact math and float, and
TVM (llvm) and onnxruntime (CPU, default options) against the reference bit for bit.

Backends compile once per spec (cached); Hypothesis draws the data run through them. Bits 2 and 8 run in the fast
suite, 3..7 under ``slow``."""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpqc.errors import ConfigError
from mpqc.integer_kernels import arith
from mpqc.integer_kernels.backends import onnx_callable, relax_callable
from mpqc.integer_kernels.lut import (IntegerEmbedding, IntegerTable, embedding_onnx, embedding_reference,
                                      embedding_relax, table_onnx, table_reference, table_relax)
from mpqc.integer_kernels.matmul import IntegerMatmul, matmul_onnx, matmul_reference, matmul_relax
from mpqc.integer_kernels.norm import IntegerL2Normalize, IntegerNorm, norm_onnx, norm_reference, norm_relax
from mpqc.integer_kernels.softmax import (IntegerSoftmax, keep_from_additive_mask, softmax_onnx,
                                          softmax_reference, softmax_relax)
from mpqc.quantizers.base import integer_range

BITS = [2, *(pytest.param(b, marks=pytest.mark.slow) for b in range(3, 8)), 8]
I64 = np.int64
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _backends(build_relax, build_onnx, signature):
    return relax_callable(build_relax, signature), onnx_callable(build_onnx, signature)


def _codes(bits: int, shape, signed: bool = True):
    lo, hi = integer_range(bits, signed)
    return hnp.arrays(I64, shape, elements=st.integers(lo, hi))


def _assert_backends_equal(ref: torch.Tensor, tvm_fn, onnx_fn, *arrays) -> None:
    expected = ref.numpy()
    tvm_out, onnx_out = tvm_fn(*arrays)[0], onnx_fn(*arrays)[0]
    np.testing.assert_array_equal(tvm_out, expected, err_msg="TVM differs from the reference")
    np.testing.assert_array_equal(onnx_out, expected, err_msg="onnxruntime differs from the reference")


# --------------------------------------------------------------------------------------------- arith
EDGE_N = np.array([0, 1, 2, 3, 4, 8, 15, 16, 24, 25, 2**31, 2**32 - 1, 2**32, 2**62 - 1, 2**62, 2**63 - 1,
                   3037000499**2, 3037000499**2 - 1, 10**18], dtype=I64)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 2**63 - 1))
def test_isqrt_reference_is_floor_sqrt(n):
    assert int(arith.isqrt(torch.tensor([n]))[0]) == math.isqrt(max(n, 1))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(-(2**50), 2**50), st.integers(1, 2**20))
@example(-3, 2)
@example(5, 2)
@example(7, 2)
def test_div_round_half_even_is_exact(num, den):
    expected = round(Fraction(num, den))   # Python rounds a Fraction half to even
    assert int(arith.div_round_half_even(torch.tensor([num]), torch.tensor([den]))[0]) == expected


@functools.lru_cache(maxsize=None)
def _arith_backends():
    sig = [((len(EDGE_N),), I64)]
    isq = _backends(arith.isqrt_relax, arith.isqrt_onnx, sig)
    div = _backends(arith.div_round_half_even_relax, arith.div_round_half_even_onnx, [((32,), I64), ((32,), I64)])
    return isq, div


@SETTINGS
@given(hnp.arrays(I64, (len(EDGE_N),), elements=st.integers(0, 2**63 - 1)))
@example(EDGE_N)
def test_isqrt_backends_bit_exact(n):
    _assert_backends_equal(arith.isqrt(torch.from_numpy(n)), *_arith_backends()[0], n)


@SETTINGS
@given(hnp.arrays(I64, (32,), elements=st.integers(-(2**50), 2**50)),
       hnp.arrays(I64, (32,), elements=st.integers(1, 2**12)))
def test_div_round_half_even_backends_bit_exact(num, den):
    num[:4] = [-3, -1, 1, 3]
    den[:4] = 2                                  # exact ties, both signs
    _assert_backends_equal(arith.div_round_half_even(torch.from_numpy(num), torch.from_numpy(den)),
                           *_arith_backends()[1], num, den)


# --------------------------------------------------------------------------------------------- softmax
SOFTMAX_SHAPE = (2, 3, 16)


@functools.lru_cache(maxsize=None)
def _softmax_backends(spec: IntegerSoftmax):
    sig = [(SOFTMAX_SHAPE, I64), ((2, 1, 16), np.bool_)]
    return _backends(lambda bb, q, k: softmax_relax(bb, q, spec, k), lambda g, q, k: softmax_onnx(g, q, spec, k), sig)


def _softmax_spec(bits: int) -> IntegerSoftmax:
    return IntegerSoftmax(in_bits=bits, in_scale=4.0 / 2**bits, out_bits=8)


@pytest.mark.parametrize("bits", BITS)
def test_softmax_backends_bit_exact(bits):
    spec = _softmax_spec(bits)
    tvm_fn, onnx_fn = _softmax_backends(spec)
    lo, hi = integer_range(bits, True)

    @SETTINGS
    @given(_codes(bits, SOFTMAX_SHAPE), hnp.arrays(np.bool_, (2, 1, 16)))
    def check(q, keep):
        q[0, 0] = hi                              # extremes: a row at the maximum code, one at the minimum,
        q[0, 1] = lo
        q[0, 2, :] = lo
        q[0, 2, 0] = hi                           # one entry far above the rest
        keep[1, 0, :] = False                     # a fully masked row
        _assert_backends_equal(softmax_reference(torch.from_numpy(q), spec, torch.from_numpy(keep)),
                               tvm_fn, onnx_fn, q, keep)

    check()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(2, 8), st.floats(1e-3, 2.0), st.integers(2, 8), st.data())
def test_softmax_reference_matches_float(bits, scale, out_bits, data):
    spec = IntegerSoftmax(in_bits=bits, in_scale=scale, out_bits=out_bits)
    q = torch.from_numpy(data.draw(_codes(bits, (3, 12))))
    keep = torch.from_numpy(data.draw(hnp.arrays(np.bool_, (3, 12))))
    keep[:, 0] = True
    out = softmax_reference(q, spec, keep)
    expected = torch.softmax((q * scale).double().masked_fill(~keep, -1e9), -1) / spec.output_scale
    assert (out - expected).abs().max() <= 0.5 + 2**-8 * spec.out_max   # rounding + the 2^-16 exp table
    assert torch.all(out[~keep] == 0)
    assert torch.all((out.sum(-1) - spec.out_max).abs() <= 12 // 2 + 1)


def test_softmax_masks_and_errors():
    mask = torch.tensor([[0.0, torch.finfo(torch.float32).min, -1e9, 0.0]])
    assert keep_from_additive_mask(mask).tolist() == [[True, False, False, True]]
    with pytest.raises(ConfigError, match="additive mask"):
        keep_from_additive_mask(torch.tensor([0.0, -3.0]))
    spec = IntegerSoftmax(in_bits=8, in_scale=0.1)
    out = softmax_reference(torch.tensor([[5, 5, 5, 5]]), spec, torch.tensor([[False, False, False, False]]))
    assert out.tolist() == [[0, 0, 0, 0]]
    assert softmax_reference(torch.tensor([[127, -127]]), spec).tolist() == [[255, 0]]
    with pytest.raises(ConfigError, match="bits"):
        IntegerSoftmax(in_bits=9, in_scale=0.1)


# --------------------------------------------------------------------------------------------- LayerNorm / RMSNorm
NORM_SIZE = 24


def _norm_spec(bits: int, center: bool) -> IntegerNorm:
    g = torch.Generator().manual_seed(bits)
    return IntegerNorm(size=NORM_SIZE, in_bits=bits, in_scale=2.0 / 2**bits, out_bits=8, out_scale=4.0 / 127,
                       weight=torch.randn(NORM_SIZE, generator=g) * 0.5 + 1, bias=torch.randn(NORM_SIZE, generator=g) * 0.3,
                       eps=1e-5, center=center)


@functools.lru_cache(maxsize=None)
def _norm_backends(bits: int, center: bool):
    spec = _norm_spec(bits, center)
    return spec, _backends(lambda bb, q: norm_relax(bb, q, spec), lambda g, q: norm_onnx(g, q, spec),
                           [((6, NORM_SIZE), I64)])


def _float_norm(q: torch.Tensor, spec: IntegerNorm) -> torch.Tensor:
    x = q.double() * spec.in_scale
    w, b = spec.weight.double(), spec.bias.double()
    if spec.center:
        y = torch.nn.functional.layer_norm(x, (spec.size,), w, b, spec.eps)
    else:
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + spec.eps) * w + b
    return y / spec.out_scale


@pytest.mark.parametrize("center", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("bits", BITS + [pytest.param(12, marks=pytest.mark.slow)])
def test_norm_backends_bit_exact_and_close_to_float(bits, center):
    spec, (tvm_fn, onnx_fn) = _norm_backends(bits, center)
    lo, hi = integer_range(bits, True)

    @SETTINGS
    @given(_codes(bits, (6, NORM_SIZE)))
    def check(q):
        q[0] = hi                                 # constant row: variance 0, the output is beta
        q[1] = 0
        q[2, ::2], q[2, 1::2] = lo, hi            # the largest variance
        q[3, :] = lo
        q[3, 0] = hi                              # one outlier
        ref = norm_reference(torch.from_numpy(q), spec)
        _assert_backends_equal(ref, tvm_fn, onnx_fn, q)
        omin, omax = spec.out_range
        expected = _float_norm(torch.from_numpy(q), spec).clamp(omin, omax)
        assert (ref - expected).abs().max() <= 0.5 + 0.02

    check()


def test_norm_refuses_overflow_and_bad_shapes():
    with pytest.raises(ConfigError, match="overflow"):
        IntegerNorm(size=4096, in_bits=16, in_scale=1.0, out_bits=8, out_scale=1e-3)
    with pytest.raises(ConfigError, match="weight"):
        IntegerNorm(size=8, in_bits=8, in_scale=1.0, out_bits=8, out_scale=1.0, weight=torch.ones(7))
    with pytest.raises(ConfigError, match="last axis"):
        norm_reference(torch.zeros(2, 7, dtype=torch.int64), _norm_spec(8, True))


# --------------------------------------------------------------------------------------------- L2-normalize
@functools.lru_cache(maxsize=None)
def _l2_backends(bits: int):
    spec = IntegerL2Normalize(size=NORM_SIZE, in_bits=bits, in_scale=3.0 / 2**bits, out_bits=8, out_scale=1.0 / 127)
    return spec, _backends(lambda bb, q: norm_relax(bb, q, spec), lambda g, q: norm_onnx(g, q, spec),
                           [((6, NORM_SIZE), I64)])


@pytest.mark.parametrize("bits", [pytest.param(2, marks=pytest.mark.slow), 8, pytest.param(16, marks=pytest.mark.slow)])
def test_l2_normalize_backends_bit_exact_and_close_to_float(bits):
    """``x / max(||x||, eps)``: TVM and onnxruntime equal the reference; the reference within 0.5 LSB (+ the 2^-16
    rounding of its constants) of float, zero rows and an outlier channel included."""
    spec, (tvm_fn, onnx_fn) = _l2_backends(bits)
    lo, hi = integer_range(bits, True)

    @SETTINGS
    @given(_codes(bits, (6, NORM_SIZE)))
    def check(q):
        q[0] = 0                                  # an all-zero row: zeros (float: 0 / eps)
        q[1, :] = 1
        q[1, 5] = hi                              # one outlier channel
        q[2] = lo                                 # the largest norm
        ref = norm_reference(torch.from_numpy(q), spec)
        _assert_backends_equal(ref, tvm_fn, onnx_fn, q)
        x = torch.from_numpy(q).double() * spec.in_scale
        expected = (torch.nn.functional.normalize(x, dim=-1, eps=spec.eps) / spec.out_scale).clamp(-128, 127)
        assert (ref - expected).abs().max() <= 0.5 + 1e-3
        assert ref[0].abs().sum() == 0 and (bits < 8 or int(ref[1, 5]) == 127)  # (2 bits: hi is 1, no outlier)

    check()


def test_l2_normalize_floors_the_denominator_at_eps_and_refuses_an_affine():
    # in_scale 1e-3, eps 0.1: the clamp is 100 codes; a row of norm 3 codes is divided by 100, not by 3
    spec = IntegerL2Normalize(size=4, in_bits=8, in_scale=1e-3, out_bits=8, out_scale=1.0 / 127, eps=0.1)
    out = norm_reference(torch.tensor([[3, 0, 0, 0], [100, 100, 100, 100]]), spec)
    assert out.tolist() == [[4, 0, 0, 0], [64, 64, 64, 64]]  # 127 * 3 / 100 = 3.81; 127 / 2 = 63.5 -> 64 (even)
    with pytest.raises(ConfigError, match="weight"):
        IntegerL2Normalize(size=4, in_bits=8, in_scale=1.0, out_bits=8, out_scale=1.0, weight=torch.ones(4))


# --------------------------------------------------------------------------------------------- matmul
@functools.lru_cache(maxsize=None)
def _matmul_backends(spec: IntegerMatmul):
    sig = [((2, 3, 5, spec.depth), I64), ((2, 3, spec.depth, 4), I64)]
    return _backends(lambda bb, a, b: matmul_relax(bb, a, b, spec), lambda g, a, b: matmul_onnx(g, a, b, spec), sig)


@pytest.mark.parametrize("signs", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["s*s", "u*s", "s*u", "u*u"])
@pytest.mark.parametrize("bits", [2, pytest.param(5, marks=pytest.mark.slow), 8])
def test_matmul_backends_bit_exact(bits, signs):
    spec = IntegerMatmul(bits, bits, 64, *signs)
    tvm_fn, onnx_fn = _matmul_backends(spec)
    (alo, ahi), (blo, bhi) = integer_range(bits, signs[0]), integer_range(bits, signs[1])

    @SETTINGS
    @given(_codes(bits, (2, 3, 5, 64), signs[0]), _codes(bits, (2, 3, 64, 4), signs[1]))
    def check(a, b):
        a[0, 0, :2], b[0, 0, :, :2] = ahi, bhi     # the largest products, both signs: where u8 x s8 saturates
        a[0, 0, 2:4], b[0, 0, :, 2:4] = alo, bhi
        _assert_backends_equal(matmul_reference(torch.from_numpy(a), torch.from_numpy(b), spec), tvm_fn, onnx_fn,
                               a, b)

    check()


def test_matmul_refuses_int32_overflow():
    IntegerMatmul(8, 8, 32768, False, True)       # 32768 * 255 * 127 < 2^31
    with pytest.raises(ConfigError, match="int32"):
        IntegerMatmul(8, 8, 40000, False, False)


# --------------------------------------------------------------------------------------------- lookup tables
@pytest.mark.parametrize("function", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("bits", BITS)
def test_gelu_table_backends_bit_exact_over_every_code(bits, function):
    spec = IntegerTable(function, bits, 6.0 / 2**bits, 8, 4.0 / 127)
    lo, hi = integer_range(bits, True)
    q = np.arange(lo, hi + 1, dtype=I64).reshape(1, -1)
    tvm_fn, onnx_fn = _backends(lambda bb, x: table_relax(bb, x, spec), lambda g, x: table_onnx(g, x, spec),
                                [(q.shape, I64)])
    _assert_backends_equal(table_reference(torch.from_numpy(q), spec), tvm_fn, onnx_fn, q)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.sampled_from(["gelu", "gelu_tanh"]), st.integers(2, 8), st.floats(1e-3, 1.0), st.integers(2, 8),
       st.floats(1e-3, 1.0))
def test_gelu_table_entries_are_rounded_function(function, bits, s_in, out_bits, s_out):
    spec = IntegerTable(function, bits, s_in, out_bits, s_out)
    lo, hi = integer_range(bits, True)
    olo, ohi = integer_range(out_bits, True)
    c = math.sqrt(2 / math.pi)
    for code, entry in zip(range(lo, hi + 1), spec.table().tolist()):
        x = code * s_in
        y = 0.5 * x * (1 + math.erf(x / math.sqrt(2))) if function == "gelu" else \
            0.5 * x * (1 + math.tanh(c * (x + 0.044715 * x**3)))
        assert abs(entry - min(max(y / s_out, olo), ohi)) <= 0.5 + 1e-9


def test_table_refuses_codes_outside_range():
    spec = IntegerTable("gelu", 4, 0.1, 8, 0.01)
    with pytest.raises(IndexError):
        table_reference(torch.tensor([8]), spec)
    with pytest.raises(ConfigError, match="unknown function"):
        IntegerTable("swish", 4, 0.1, 8, 0.01)


# --------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("bits", [2, 5, 8])
def test_embedding_backends_bit_exact(bits):
    weight = torch.randn(40, 12, generator=torch.Generator().manual_seed(bits))
    weight[3] = 0                                  # an all-zero row
    spec = IntegerEmbedding.quantize(weight, bits)
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = torch.tensor([0, 39, 3])
    sig = [(tuple(ids.shape), I64)]
    tvm_fn = relax_callable(lambda bb, x: embedding_relax(bb, x, spec), sig)
    onnx_fn = onnx_callable(lambda g, x: embedding_onnx(g, x, spec), sig)
    codes, scale = embedding_reference(ids, spec)
    for outs, name in ((tvm_fn(ids.numpy()), "TVM"), (onnx_fn(ids.numpy()), "onnxruntime")):
        np.testing.assert_array_equal(outs[0], codes.numpy(), err_msg=f"{name} codes")
        np.testing.assert_array_equal(outs[1], scale.numpy(), err_msg=f"{name} scales")
    hi = integer_range(bits, True)[1]
    assert torch.all((codes.double() * scale.double()[..., None] - weight[ids].double()).abs()
                     <= scale.double()[..., None] / 2 + 1e-6)
    assert int(codes.abs().max()) <= hi


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.integers(2, 8), st.integers(4, 8), st.floats(1e-3, 0.5))
def test_embedding_requantized_table_is_rounded_product(bits, out_bits, out_scale):
    spec = IntegerEmbedding.quantize(torch.randn(10, 6, generator=torch.Generator().manual_seed(bits)), bits)
    table = spec.requantized(out_bits, out_scale)
    exact = spec.codes.double() * spec.row_scale.double()[:, None] / out_scale
    lo, hi = integer_range(out_bits, True)
    assert torch.all((table - exact.clamp(lo, hi)).abs() <= 0.5 + 1e-9)


# --------------------------------------------------------------------------------------------- composed attention
def _quantize(x: torch.Tensor, bits: int, signed: bool = True) -> tuple[torch.Tensor, float]:
    hi = integer_range(bits, signed)[1]
    scale = float(x.abs().max()) / hi
    return torch.clamp(torch.round(x.double() / scale), *integer_range(bits, signed)).to(torch.int64), scale


def test_attention_composed_from_kernels_tracks_float_sdpa():
    """Q.K^T -> requantize -> softmax (1/sqrt(d) folded into its input scale, bool mask as keep) -> P.V, as
    torch.export's scaled_dot_product_attention would be decomposed: within a few percent of float SDPA."""
    g = torch.Generator().manual_seed(0)
    b, h, length, d = 2, 2, 12, 16
    q, k, v = (torch.randn(b, h, length, d, generator=g) for _ in range(3))
    keep = torch.ones(b, 1, length, length, dtype=torch.bool)
    keep[1, ..., 8:] = False                       # padding in the second sequence
    qq, sq = _quantize(q, 8)
    kq, sk = _quantize(k, 8)
    vq, sv = _quantize(v, 8)
    acc = matmul_reference(qq, kq.transpose(-1, -2), IntegerMatmul(8, 8, d))
    scores = acc.double() * (sq * sk / math.sqrt(d))
    codes, s_scores = _quantize(scores, 8)         # the contract's requantize step, here in float64
    soft = IntegerSoftmax(in_bits=8, in_scale=s_scores, out_bits=8)
    p = softmax_reference(codes, soft, keep)
    out = matmul_reference(p, vq, IntegerMatmul(8, 8, length, a_signed=False)).double() * (soft.output_scale * sv)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep)
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_group_norm_as_reshaped_norm(bits):
    g = torch.Generator().manual_seed(bits)
    batch, channels, groups, hw = 2, 6, 3, (3, 4)
    weight, bias = torch.randn(channels, generator=g) * 0.5 + 1, torch.randn(channels, generator=g) * 0.3
    spec = IntegerNorm.group_norm(groups, channels, 12, weight=weight, bias=bias, in_bits=bits,
                                  in_scale=2.0 / 2**bits, out_bits=8, out_scale=4.0 / 127, eps=1e-5)
    lo, hi = integer_range(bits, True)
    q = torch.randint(lo, hi + 1, (batch, channels, *hw), generator=g)
    q[0, :2] = hi                                  # a constant group
    grouped = q.reshape(batch, groups, -1)
    ref = norm_reference(grouped, spec)
    expected = torch.nn.functional.group_norm(q.double() * spec.in_scale, groups, weight.double(), bias.double(),
                                              1e-5) / spec.out_scale
    assert (ref.reshape(q.shape) - expected.clamp(*spec.out_range)).abs().max() <= 0.52
    tvm_fn, onnx_fn = _backends(lambda bb, x: norm_relax(bb, x, spec), lambda g_, x: norm_onnx(g_, x, spec),
                                [(tuple(grouped.shape), I64)])
    _assert_backends_equal(ref, tvm_fn, onnx_fn, grouped.numpy())


def test_softmax_from_qdq_storage_round_trips():
    """In an exported QDQ graph the kernel reads QuantizeLinear's uint8 storage and feeds DequantizeLinear."""
    from mpqc.integer_kernels.backends import codes_from_storage_onnx, run_onnx, storage_from_codes_onnx

    spec = _softmax_spec(8)
    q = torch.randint(-127, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    storage = (q + 128).to(torch.uint8).numpy()
    out = run_onnx(lambda g, s: storage_from_codes_onnx(
        g, softmax_onnx(g, codes_from_storage_onnx(g, s, 128), spec), 0), [storage])[0]
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out.astype(I64), softmax_reference(q, spec).numpy())
