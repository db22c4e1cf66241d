"""Quantizer math: integer ranges, the fixed-bit quantizer, DQ (U3 parametrisation) and the method registry.

Numerical checks use bit-exact ``torch.equal`` where the contract is exact (integer codes, fixed-quantizer
forward) and ``torch.testing.assert_close`` where two float paths compute the same real number; properties
(ranges, monotonic bits, freeze round-trips) run under Hypothesis.
"""
from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpqc.quantizers as quantizers
from mpqc.errors import ConfigError
from mpqc.quantizers import METHODS, QuantMethod, get_method, register_method
from mpqc.quantizers import base as base_module
from mpqc.quantizers import dq as dq_module
from mpqc.quantizers.base import BitRange, FixedQuantizer, FrozenQuant, integer_range, positive_levels
from mpqc.quantizers.dq import DQActivationQuantizer, DQWeightQuantizer

PROPS = settings(max_examples=50, deadline=None)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
bit_widths = st.integers(min_value=2, max_value=8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _levels(bits: int, signed: bool) -> int:
    """Largest integer code at ``bits`` (written out, not taken from the code under test)."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def _codes_off_ties(gen: torch.Generator, shape, lo: int, hi: int) -> torch.Tensor:
    """Real-valued codes ``k + u``, k integer in [lo, hi], |u| <= 0.4: never within 0.1 of a rounding tie."""
    k = torch.randint(lo, hi + 1, shape, generator=gen).float()
    u = (torch.rand(shape, generator=gen) - 0.5) * 0.8
    return k + u


# ---------------------------------------------------------------------------------------------------------------
# integer_range, positive_levels, BitRange
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "signed", "expected"),
    [
        (2, True, (-1, 1)),
        (3, True, (-3, 3)),
        (4, True, (-7, 7)),
        (8, True, (-127, 127)),
        (16, True, (-32767, 32767)),
        (1, False, (0, 1)),
        (2, False, (0, 3)),
        (4, False, (0, 15)),
        (8, False, (0, 255)),
        (16, False, (0, 65535)),
    ],
)
def test_integer_range_values(bits, signed, expected):
    assert integer_range(bits, signed) == expected


@given(bits=st.integers(min_value=2, max_value=16), signed=st.booleans())
@PROPS
def test_integer_range_fits_in_bits_and_matches_positive_levels(bits, signed):
    qmin, qmax = integer_range(bits, signed)
    # every code fits in `bits` bits (two's complement when signed) and the range is symmetric / starts at 0
    if signed:
        assert qmin == -qmax and -(2 ** (bits - 1)) < qmin and qmax < 2 ** (bits - 1)
        assert qmax - qmin + 1 == 2**bits - 1  # symmetric: one code of the 2**bits left unused
    else:
        assert qmin == 0 and qmax - qmin + 1 == 2**bits
    assert positive_levels(bits, signed) == qmax


@pytest.mark.parametrize(("bits", "signed"), [(1, True), (0, True), (-3, True), (0, False), (-1, False)])
def test_integer_range_rejects_too_few_bits(bits, signed):
    with pytest.raises(ConfigError, match=f"got {bits}"):
        integer_range(bits, signed)


@pytest.mark.parametrize(("lo", "hi"), [(1, 1), (2, 8), (16, 16), (1, 16)])
def test_bit_range_accepts_valid(lo, hi):
    r = BitRange(lo, hi)
    assert (r.min_bits, r.max_bits) == (lo, hi)


@pytest.mark.parametrize(("lo", "hi"), [(5, 4), (0, 4), (-1, 2), (2, 17), (17, 17), (0, 0)])
def test_bit_range_rejects_invalid(lo, hi):
    with pytest.raises(ConfigError, match=f"min_bits={lo}, max_bits={hi}"):
        BitRange(lo, hi)


# ---------------------------------------------------------------------------------------------------------------
# FrozenQuant and FixedQuantizer
# ---------------------------------------------------------------------------------------------------------------


def test_frozen_quantize_rounds_half_to_even_and_clamps():
    fq = FrozenQuant(bits=4, signed=True, scale=torch.tensor([1.0]))
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 6.6, 100.0, -100.0])
    q = fq.quantize(x)
    assert q.dtype == torch.int32
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 0, 7, 7, -7]
    assert (fq.qmin, fq.qmax) == (-7, 7)

    unsigned = FrozenQuant(bits=3, signed=False, scale=torch.tensor([0.5]))
    assert unsigned.quantize(torch.tensor([-3.0, 0.25, 0.75, 1.25, 3.7, 9.0])).tolist() == [0, 0, 2, 2, 7, 7]


def test_frozen_quantize_per_channel_along_channel_dim():
    fq = FrozenQuant(bits=4, signed=True, scale=torch.tensor([1.0, 2.0]))
    x = torch.tensor([[3.0, 3.0, 20.0], [3.0, 5.0, -20.0]])
    assert fq.quantize(x).tolist() == [[3, 3, 7], [2, 2, -7]]  # 3/2 = 1.5 -> 2, 5/2 = 2.5 -> 2
    # the same scales along dim 1
    assert fq.quantize(x.t().contiguous(), channel_dim=1).tolist() == [[3, 2], [3, 2], [7, -7]]


@given(
    bits=bit_widths,
    signed=st.booleans(),
    channels=st.integers(min_value=1, max_value=4),
    channel_dim=st.integers(min_value=0, max_value=2),
    seed=seeds,
)
@PROPS
def test_frozen_quantize_matches_numpy_reference(bits, signed, channels, channel_dim, seed):
    gen = _gen(seed)
    shape = [3, 5, 2]
    shape[channel_dim] = channels
    scale = torch.rand(channels, generator=gen) * 2 + 0.01
    x = torch.randn(shape, generator=gen) * 3 * float(scale.max()) * (2 ** (bits - 2))
    fq = FrozenQuant(bits, signed, scale)
    bshape = [1, 1, 1]
    bshape[channel_dim] = channels
    ratio = x.numpy().astype(np.float32) / scale.numpy().astype(np.float32).reshape(bshape)
    qmax = _levels(bits, signed)
    expected = np.clip(np.rint(ratio), -qmax if signed else 0, qmax).astype(np.int32)
    np.testing.assert_array_equal(fq.quantize(x, channel_dim=channel_dim).numpy(), expected)


@given(bits=bit_widths, signed=st.booleans(), per_channel=st.booleans(), seed=seeds)
@PROPS
def test_fixed_forward_equals_frozen_integer_times_scale(bits, signed, per_channel, seed):
    gen = _gen(seed)
    channels = 4
    scale = torch.rand(channels if per_channel else 1, generator=gen) + 0.05
    x = torch.randn(channels, 3, 2, 2, generator=gen) * float(scale.max()) * _levels(bits, signed) * 0.8
    q = FixedQuantizer(bits, signed, scale, per_channel=per_channel)
    fq = q.frozen()
    assert (fq.bits, fq.signed) == (bits, signed)
    torch.testing.assert_close(fq.scale, scale)
    ints = fq.quantize(x)
    expected = ints.float() * (fq.scale.reshape(-1, 1, 1, 1) if per_channel else fq.scale)
    out = q(x)
    assert torch.equal(out, expected)
    qmin, qmax = integer_range(bits, signed)
    assert int(ints.min()) >= qmin and int(ints.max()) <= qmax
    # the input spans beyond the range, so clamping must actually have happened somewhere
    assert int(ints.max()) == qmax


def test_fixed_doc_example_values():
    q = FixedQuantizer(bits=4, signed=True, scale=torch.tensor([0.5]))
    out = q(torch.tensor([0.2, 0.3, 10.0, -10.0, 1.25, 1.75]))
    assert out.tolist() == [0.0, 0.5, 3.5, -3.5, 1.0, 2.0]  # 2.5 -> 2, 3.5 -> 4 (half to even)
    assert q.bits().item() == 4.0 and not q.learnable_bits


@given(bits=bit_widths, signed=st.booleans(), per_channel=st.booleans(), seed=seeds)
@PROPS
def test_fixed_input_gradient_is_straight_through_inside_and_zero_outside(bits, signed, per_channel, seed):
    gen = _gen(seed)
    channels = 3
    scale = torch.rand(channels if per_channel else 1, generator=gen) + 0.1
    bscale = scale.reshape(-1, 1) if per_channel else scale
    qmin, qmax = integer_range(bits, signed)
    # codes strictly inside the range, off the top/bottom half-bin (the outermost half-bin has its own test below)
    inside = _codes_off_ties(gen, (channels, 6), qmin + 1, qmax - 1)
    inside = inside.clamp(qmin + 0.55, qmax - 0.55)
    below = qmin - 1.0 - torch.rand(channels, 3, generator=gen) * 5  # past the clamp by more than half a step
    above = qmax + 1.0 + torch.rand(channels, 3, generator=gen) * 5
    x = (torch.cat([inside, below, above], dim=1) * bscale).requires_grad_()
    q = FixedQuantizer(bits, signed, scale, per_channel=per_channel)
    q(x).sum().backward()
    expected = torch.cat([torch.ones(channels, 6), torch.zeros(channels, 6)], dim=1)
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize(("bits", "signed"), [(2, True), (4, True), (4, False)])
def test_fixed_input_gradient_is_straight_through_on_the_outermost_half_bin(bits, signed):
    qmin, qmax = integer_range(bits, signed)
    scale = 0.5
    codes = torch.tensor([qmax - 0.3, qmax - 0.1] + ([qmin + 0.3, qmin + 0.1] if signed else []))
    x = (codes * scale).requires_grad_()
    FixedQuantizer(bits, signed, torch.tensor([scale]))(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fixed_gradient_reaches_scale_with_lsq_values():
    # per tensor: d/ds [clamp(round(x/s)) * s] = round(x/s) - x/s inside the range, qmax / qmin outside
    q = FixedQuantizer(4, True, torch.tensor([0.5]))
    x = torch.tensor([1.15, 20.0, -20.0])  # x/s = 2.3 (inside), +40, -40
    q(x).sum().backward()
    assert q.log_scale.grad is not None
    expected = (2.0 - 2.3) + 7 + (-7)
    # The parameter is log(s): d/dlog(s) = s * d/ds.
    assert q.log_scale.grad.item() == pytest.approx(0.5 * expected, abs=1e-5)

    # per channel: each channel's scale gets its own channel's gradient
    q = FixedQuantizer(4, True, torch.tensor([0.5, 1.0]), per_channel=True)
    x = torch.tensor([[1.15, 20.0], [2.3, 0.2]])  # channel 0: 2.3, 40 ; channel 1: 2.3, 0.2
    q(x).sum().backward()
    torch.testing.assert_close(q.log_scale.grad,
                               torch.tensor([0.5 * ((2 - 2.3) + 7), 1.0 * ((2 - 2.3) + (0 - 0.2))]))


@given(
    bits=bit_widths,
    new_bits=st.integers(min_value=2, max_value=16),
    signed=st.booleans(),
    per_channel=st.booleans(),
    seed=seeds,
)
@PROPS
def test_fixed_to_fixed_keeps_dynamic_range(bits, new_bits, signed, per_channel, seed):
    scale = torch.rand(3 if per_channel else 1, generator=_gen(seed)) + 0.01
    q = FixedQuantizer(bits, signed, scale, per_channel=per_channel)
    q2 = q.to_fixed(new_bits)
    if new_bits == bits:
        assert q2 is q
        return
    assert q2.fixed_bits == new_bits and q2.signed == signed and q2.per_channel == per_channel
    assert q2.qmax == _levels(new_bits, signed)
    torch.testing.assert_close(q2.qmax * q2.scale.detach(), _levels(bits, signed) * scale)
    # the largest representable value is unchanged: both saturate to it
    big = torch.full((3, 2), 1e6)
    torch.testing.assert_close(q2(big), q(big))


def test_fixed_rejects_signed_one_bit():
    with pytest.raises(ConfigError):
        FixedQuantizer(1, True, torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------------------------
# DQ
# ---------------------------------------------------------------------------------------------------------------


def _set(param: torch.nn.Parameter, value: float) -> None:
    with torch.no_grad():
        param.fill_(value)


@pytest.mark.parametrize("init_bits", [2, 3, 4, 5, 6, 8])
def test_dq_bits_equal_init_bits(init_bits):
    w = torch.randn(4, 3, 3, 3, generator=_gen(init_bits))
    wq = DQWeightQuantizer(w, init_bits=init_bits, bit_range=BitRange(2, 8))
    assert wq.bits().item() == pytest.approx(init_bits, abs=1e-4)
    for dynamic_range in (0.5, 6.0, 37.0):
        aq = DQActivationQuantizer(signed=False, dynamic_range=dynamic_range, init_bits=init_bits)
        assert aq.bits().item() == pytest.approx(init_bits, abs=1e-4)
        sq = DQActivationQuantizer(signed=True, dynamic_range=dynamic_range, init_bits=init_bits)
        assert sq.bits().item() == pytest.approx(init_bits, abs=1e-4)


def test_dq_init_bits_are_clipped_into_the_bit_range():
    aq = DQActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=8, bit_range=BitRange(2, 4))
    assert aq.bits().item() == pytest.approx(4.0, abs=1e-4)
    wq = DQWeightQuantizer(torch.randn(2, 3), init_bits=1, bit_range=BitRange(3, 6))
    assert wq.bits().item() == pytest.approx(3.0, abs=1e-4)


@given(
    log_step_frac=st.floats(min_value=0.0, max_value=1.0),
    log_range=st.floats(min_value=-1.0, max_value=0.0),
    seed=seeds,
)
@PROPS
def test_dq_weight_outputs_on_per_channel_lattice(log_step_frac, log_range, seed):
    gen = _gen(seed)
    w = torch.randn(5, 3, 2, 2, generator=gen) * (torch.rand(5, 1, 1, 1, generator=gen) * 3 + 0.01)
    q = DQWeightQuantizer(w, init_bits=8, bit_range=BitRange(2, 8))
    q_max = math.exp(log_range)
    lo, hi = math.log(q_max / _levels(8, True)), math.log(q_max / _levels(2, True))
    _set(q.log_range, log_range)
    _set(q.log_step, lo + log_step_frac * (hi - lo))
    out = q(w).detach()
    step = q.log_step.exp().item()
    gamma = w.abs().reshape(5, -1).amax(dim=1).reshape(5, 1, 1, 1)
    k = out / (gamma * step)
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-3)
    assert k.round().abs().max().item() <= round(q_max / step)
    assert (out.abs() <= gamma * (q_max + step / 2) * (1 + 1e-5)).all()
    # the outputs track the weights to within half a step (+ the clipped part beyond q_max)
    clipped = torch.clamp(w, -gamma * q_max, gamma * q_max)
    assert ((out - clipped).abs() <= gamma * step / 2 * (1 + 1e-4) + 1e-6).all()


@given(bits=bit_widths, signed=st.booleans(), dynamic_range=st.floats(min_value=0.05, max_value=50.0), seed=seeds)
@PROPS
def test_dq_outputs_on_lattice_with_integer_levels(bits, signed, dynamic_range, seed):
    """With d = q_max / levels(b), every output is d * k with |k| <= levels(b) (k >= 0 when unsigned)."""
    gen = _gen(seed)
    q = DQActivationQuantizer(signed=signed, dynamic_range=dynamic_range, init_bits=8)
    levels = _levels(bits, signed)
    _set(q.log_step, math.log(dynamic_range / levels))
    x = torch.randn(64, generator=gen) * dynamic_range * 1.5
    out = q(x).detach()
    k = out / (dynamic_range / levels)
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-3)
    k = k.round()
    assert k.max().item() <= levels
    assert k.min().item() >= (-levels if signed else 0)
    assert q.bits().item() == pytest.approx(bits, abs=1e-4)


def test_dq_weight_lattice_uses_each_channels_own_scale():
    w = torch.tensor([[1.0, 0.5, -0.26], [4.0, 2.0, -1.04]])  # channel 1 is channel 0 times 4
    q = DQWeightQuantizer(w, init_bits=3, bit_range=BitRange(2, 8))  # levels 3, d = 1/3
    out = q(w).detach()
    torch.testing.assert_close(out[0], torch.tensor([1.0, 2 / 3, -1 / 3]))
    torch.testing.assert_close(out[1], 4 * torch.tensor([1.0, 2 / 3, -1 / 3]))


@given(
    log_step=st.floats(min_value=-1000.0, max_value=5.0),
    log_range=st.floats(min_value=-3.0, max_value=3.0),
    min_bits=st.integers(min_value=2, max_value=8),
    span=st.integers(min_value=0, max_value=6),
    signed=st.booleans(),
    weight=st.booleans(),
)
@PROPS
def test_dq_bits_stay_in_bit_range_for_any_raw_parameters(log_step, log_range, min_bits, span, signed, weight):
    bit_range = BitRange(min_bits, min(min_bits + span, 16))
    if weight:
        q = DQWeightQuantizer(torch.randn(3, 4, generator=_gen(0)), init_bits=8, bit_range=bit_range)
    else:
        q = DQActivationQuantizer(signed=signed, dynamic_range=3.0, init_bits=8, bit_range=bit_range)
    _set(q.log_range, log_range)
    # raw log_step relative to the bound, from far below the smallest step to 5 (e-folds) above the largest
    largest = math.exp(log_range) / positive_levels(bit_range.min_bits, q.signed)
    _set(q.log_step, min(log_step, math.log(largest) + 5.0))
    b = q.bits().item()
    assert bit_range.min_bits - 1e-3 <= b <= bit_range.max_bits + 1e-3
    out = q(torch.randn(3, 4, generator=_gen(1)))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("log_step", [20.0, 50.0, 100.0])
@pytest.mark.parametrize("weight", [True, False])
def test_dq_bits_stay_in_bit_range_for_huge_log_step(log_step, weight):
    if weight:
        q = DQWeightQuantizer(torch.randn(3, 4, generator=_gen(0)), init_bits=8)
    else:
        q = DQActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=8)
    _set(q.log_step, log_step)
    assert 2 - 1e-3 <= q.bits().item() <= 2 + 1e-3  # clipped to the smallest bit-width
    q.project_()
    assert math.isfinite(q.log_step.item())
    assert q.bits().item() == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("offset", [-5.0, -0.5, 0.5, 5.0])
def test_dq_project_moves_log_step_back_into_range(weight, offset):
    bit_range = BitRange(3, 6)
    if weight:
        q = DQWeightQuantizer(torch.randn(3, 4, generator=_gen(0)), init_bits=5, bit_range=bit_range)
    else:
        q = DQActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=5, bit_range=bit_range)
    q_max = q.log_range.exp().item()
    smallest = q_max / positive_levels(6, q.signed)
    largest = q_max / positive_levels(3, q.signed)
    _set(q.log_step, (math.log(smallest) if offset < 0 else math.log(largest)) + offset)
    q.project_()
    step = q.log_step.exp().item()
    assert step == pytest.approx(smallest if offset < 0 else largest, rel=1e-5)
    assert q.bits().item() == pytest.approx(6.0 if offset < 0 else 3.0, abs=1e-4)


@given(frac=st.floats(min_value=0.0, max_value=1.0), signed=st.booleans(), weight=st.booleans())
@PROPS
def test_dq_project_leaves_in_range_parameters_unchanged(frac, signed, weight):
    bit_range = BitRange(2, 8)
    if weight:
        q = DQWeightQuantizer(torch.randn(3, 4, generator=_gen(0)), init_bits=5, bit_range=bit_range)
        _set(q.log_range, -0.3)
    else:
        q = DQActivationQuantizer(signed=signed, dynamic_range=6.0, init_bits=5, bit_range=bit_range)
    q_max = q.log_range.exp().item()
    lo = math.log(q_max / positive_levels(8, q.signed))
    hi = math.log(q_max / positive_levels(2, q.signed))
    _set(q.log_step, lo + frac * (hi - lo))
    before = (q.log_step.detach().clone(), q.log_range.detach().clone())
    q.project_()
    torch.testing.assert_close(q.log_step.detach(), before[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(q.log_range.detach(), before[1])


def test_dq_weight_project_clamps_range_to_one():
    q = DQWeightQuantizer(torch.randn(3, 4), init_bits=4)
    _set(q.log_range, 0.7)
    q.project_()
    assert q.log_range.item() == 0.0
    # activations have no range cap
    a = DQActivationQuantizer(signed=False, dynamic_range=6.0)
    _set(a.log_range, 5.0)
    a.project_()
    assert a.log_range.item() == 5.0


@given(
    a=st.floats(min_value=0.0, max_value=1.0),
    b=st.floats(min_value=0.0, max_value=1.0),
    signed=st.booleans(),
)
@PROPS
def test_dq_larger_step_gives_fewer_bits(a, b, signed):
    q = DQActivationQuantizer(signed=signed, dynamic_range=4.0, init_bits=8, bit_range=BitRange(2, 8))
    lo = math.log(4.0 / positive_levels(8, signed)) - 1.0  # run past both bounds
    hi = math.log(4.0 / positive_levels(2, signed)) + 1.0
    s1, s2 = sorted((lo + a * (hi - lo), lo + b * (hi - lo)))
    _set(q.log_step, s1)
    bits1 = q.bits().item()
    _set(q.log_step, s2)
    bits2 = q.bits().item()
    assert bits2 <= bits1 + 1e-5
    inner_lo, inner_hi = lo + 1.0, hi - 1.0
    if inner_lo < s1 and s2 < inner_hi and s2 - s1 > 1e-3:
        assert bits2 < bits1  # strictly decreasing inside the range


@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_dq_bits_gradient_alive_at_max_bits(weight, signed):
    """Regression: at init at the max bit-width the step sits exactly on its lower clip bound; bits() must still
    have a gradient (the search could never lower a layer's precision otherwise)."""
    if weight:
        q = DQWeightQuantizer(torch.randn(4, 3, generator=_gen(0)), init_bits=8, bit_range=BitRange(2, 8))
    else:
        q = DQActivationQuantizer(signed=signed, dynamic_range=6.0, init_bits=8, bit_range=BitRange(2, 8))
    q.bits().backward()
    g = q.log_step.grad
    assert g is not None and torch.isfinite(g)
    # analytic: b = log2(q_max/d + 1) (+1): db/dlog d = -(q_max/d) / ((q_max/d + 1) ln 2)
    levels = positive_levels(8, q.signed)
    assert g.item() == pytest.approx(-levels / ((levels + 1) * math.log(2)), rel=1e-4)
    # and the forward pass passes a gradient to the step too
    q.zero_grad()
    q(torch.randn(4, 3, generator=_gen(1)) * 2).pow(2).sum().backward()
    assert q.log_step.grad is not None and q.log_step.grad.abs().item() > 0


@pytest.mark.parametrize("weight", [True, False])
def test_dq_bits_gradient_alive_at_min_bits(weight):
    if weight:
        q = DQWeightQuantizer(torch.randn(4, 3, generator=_gen(0)), init_bits=2, bit_range=BitRange(2, 8))
    else:
        q = DQActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=2, bit_range=BitRange(2, 8))
    q.bits().backward()
    assert q.log_step.grad is not None and q.log_step.grad.item() < 0


@given(
    bits=bit_widths,
    signed=st.booleans(),
    dynamic_range=st.floats(min_value=0.05, max_value=50.0),
    log_range_shift=st.floats(min_value=-1.0, max_value=1.0),
    seed=seeds,
)
@PROPS
def test_dq_activation_to_fixed_at_current_integer_bits_keeps_outputs(
    bits, signed, dynamic_range, log_range_shift, seed
):
    gen = _gen(seed)
    q = DQActivationQuantizer(signed=signed, dynamic_range=dynamic_range, init_bits=8, bit_range=BitRange(2, 8))
    q_max = dynamic_range * math.exp(log_range_shift)  # a learned range different from the initial one
    _set(q.log_range, math.log(q_max))
    levels = _levels(bits, signed)
    step = q_max / levels
    _set(q.log_step, math.log(step))
    assert q.bits().item() == pytest.approx(bits, abs=1e-4)
    fixed = q.to_fixed(bits)
    assert isinstance(fixed, FixedQuantizer)
    assert (fixed.fixed_bits, fixed.signed, fixed.per_channel) == (bits, signed, False)
    x = _codes_off_ties(gen, (200,), -levels - 3, levels + 3) * step
    ref = q(x).detach()
    out = fixed(x).detach()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * q_max)
    # bit-exact on the integer codes
    codes = fixed.frozen().quantize(x)
    assert torch.equal(codes, torch.round(ref / step).to(torch.int32))


@given(
    bits=bit_widths,
    rho=st.floats(min_value=0.3, max_value=1.0),
    seed=seeds,
)
@PROPS
def test_dq_weight_to_fixed_at_current_integer_bits_keeps_outputs(bits, rho, seed):
    gen = _gen(seed)
    channels = 4
    levels = _levels(bits, True)
    step = rho / levels
    # normalised weights: codes off rounding ties, clipped to [-1, 1]; one entry per channel is exactly +-1
    n = torch.clamp(_codes_off_ties(gen, (channels, 9), -levels - 2, levels + 2) * step, -1.0, 1.0)
    n[:, 0] = torch.where(torch.rand(channels, generator=gen) < 0.5, -1.0, 1.0)
    gamma = torch.rand(channels, 1, generator=gen) * 3 + 0.01
    w = (n * gamma).reshape(channels, 1, 3, 3)

    q = DQWeightQuantizer(w, init_bits=8, bit_range=BitRange(2, 8))
    _set(q.log_range, math.log(rho))
    _set(q.log_step, math.log(step))
    assert q.bits().item() == pytest.approx(bits, abs=1e-4)
    fixed = q.to_fixed(bits, w)
    assert (fixed.fixed_bits, fixed.signed, fixed.per_channel) == (bits, True, True)
    torch.testing.assert_close(fixed.scale.detach(), gamma.reshape(-1) * step)
    ref = q(w).detach()
    out = fixed(w).detach()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    codes = fixed.frozen().quantize(w)
    assert torch.equal(codes, torch.round(ref / (gamma.reshape(-1, 1, 1, 1) * step)).to(torch.int32))
    assert int(codes.abs().max()) <= levels


@given(
    bits=bit_widths,
    frac=st.floats(min_value=0.0, max_value=1.0),
    signed=st.booleans(),
    log_range=st.floats(min_value=-2.0, max_value=0.0),
    seed=seeds,
)
@PROPS
def test_dq_to_fixed_at_other_bits_keeps_learned_range(bits, frac, signed, log_range, seed):
    """Freezing at any integer bit-width keeps the learned q_max, whatever the current (fractional) step."""
    q_max = math.exp(log_range)
    a = DQActivationQuantizer(signed=signed, dynamic_range=1.0, init_bits=8, bit_range=BitRange(2, 8))
    w = torch.randn(3, 5, generator=_gen(seed))
    wq = DQWeightQuantizer(w, init_bits=8, bit_range=BitRange(2, 8))
    for q in (a, wq):
        _set(q.log_range, log_range)
        lo = math.log(q_max / positive_levels(8, q.signed))
        hi = math.log(q_max / positive_levels(2, q.signed))
        _set(q.log_step, lo + frac * (hi - lo))
    fa = a.to_fixed(bits)
    assert fa.qmax * fa.scale.item() == pytest.approx(q_max, rel=1e-5)
    fw = wq.to_fixed(bits, w)
    gamma = w.abs().amax(dim=1)
    torch.testing.assert_close(fw.qmax * fw.scale.detach(), gamma * q_max)


def test_dq_weight_to_fixed_needs_weight():
    q = DQWeightQuantizer(torch.randn(3, 4), init_bits=4)
    with pytest.raises(TypeError, match="weight"):
        q.to_fixed(4)


def test_dq_unsigned_activation_maps_negatives_to_zero():
    q = DQActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=4)
    x = torch.tensor([-100.0, -3.0, -0.01, -1e-7, 0.0])
    assert torch.equal(q(x).detach(), torch.zeros(5))
    # while a signed one keeps them
    s = DQActivationQuantizer(signed=True, dynamic_range=6.0, init_bits=4)
    assert s(torch.tensor([-3.0])).item() < 0
    assert s(torch.tensor([-100.0])).item() == pytest.approx(-6.0)


@pytest.mark.parametrize("module", [base_module, dq_module], ids=["base", "dq"])
def test_module_doctests_pass(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


# ---------------------------------------------------------------------------------------------------------------
# The method registry
# ---------------------------------------------------------------------------------------------------------------


def test_get_method_dq_builds_dq_quantizers():
    method = get_method("dq")
    assert method.name == "dq" and "Uhlich" in method.paper
    wq = method.weight_quantizer(torch.randn(4, 3), 5, BitRange(2, 8))
    assert isinstance(wq, DQWeightQuantizer) and wq.bits().item() == pytest.approx(5.0, abs=1e-4)
    aq = method.activation_quantizer(False, 6.0, 3, BitRange(2, 8))
    assert isinstance(aq, DQActivationQuantizer) and not aq.signed
    assert aq.bits().item() == pytest.approx(3.0, abs=1e-4)
    assert aq.log_range.exp().item() == pytest.approx(6.0, rel=1e-6)


def test_get_method_unknown_lists_known_names():
    with pytest.raises(ConfigError) as info:
        get_method("no-such-method")
    message = str(info.value)
    assert "'no-such-method'" in message
    for name in METHODS:
        assert name in message


def test_register_method_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(quantizers, "METHODS", dict(METHODS))
    dq = get_method("dq")
    with pytest.raises(ConfigError, match="'dq'"):
        register_method(dq)
    assert quantizers.METHODS["dq"] is dq

    fake = QuantMethod(name="test-fake", paper="none", weight_quantizer=dq.weight_quantizer,
                       activation_quantizer=dq.activation_quantizer)
    assert register_method(fake) is fake
    assert get_method("test-fake") is fake
    with pytest.raises(ConfigError, match="already registered"):
        register_method(fake)
    assert "test-fake" in str(pytest.raises(ConfigError, get_method, "x").value)
