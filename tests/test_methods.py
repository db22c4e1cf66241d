"""The search methods beyond DQ (SDQ, FracBits, CSQ): quantizer math, then end to end on digits.

Quantizer math is checked against the integer quantizers freezing produces (``to_fixed``), bit for bit where the
method's definition makes them equal (interpolation endpoints, the two stochastic choices, CSQ's binary gates at
the end of the search). End to end, every method is compiled on the digits ``small_cnn``: a tight budget lowers
the searched bits and a loose one does not, the frozen result meets the budget, the integer reference agrees
with the fake-quant graph, and an interrupted search resumes to the same state as an uninterrupted one.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpqc
from conftest import FAST, ROOT, example_models, quantized_graph, randomize_batchnorm
from conftest import example_batch as _example
from mpqc.cli import _parser
from mpqc.passes.freeze import freeze
from mpqc.passes.insert_quantizers import current_bits, quantized_layers
from mpqc.quantizers import METHODS, FixedQuantizer, get_method
from mpqc.budgets import BitOps, LayerBits, WeightMemory
from mpqc.layers import LayerInfo
from mpqc.quantizers.base import BitRange, integer_range
from mpqc.quantizers.csq import (FINAL_TEMPERATURE, START_TEMPERATURE, CSQActivationQuantizer,
                                 CSQWeightQuantizer)
from mpqc.quantizers.fracbits import FracBitsActivationQuantizer, FracBitsWeightQuantizer
from mpqc.quantizers.sdq import (SDQActivationQuantizer, SDQFixedQuantizer, SDQWeightQuantizer,
                                 entropy_aware_bin_regularization)
from mpqc.search import search

PROPS = settings(max_examples=30, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)

#: Every method this file covers end to end.
NEW_METHODS = ["sdq", "fracbits", "fracbits-kernel", "csq"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _set(param, value) -> None:
    with torch.no_grad():
        param.fill_(value)


def _assert_matches_fixed(out: torch.Tensor, fixed: FixedQuantizer, x: torch.Tensor) -> None:
    """``out`` is what the fixed quantizer gives: the same codes, values up to the rounding of the scale that
    ``FixedQuantizer`` stores (as a logarithm)."""
    torch.testing.assert_close(out, fixed(x), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fixed.frozen().quantize(out), fixed.frozen().quantize(fixed(x)), rtol=0, atol=0)


def _weight(seed: int = 0, shape=(5, 3, 3, 3)) -> torch.Tensor:
    gen = _gen(seed)
    return torch.randn(shape, generator=gen) * (torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen) + 0.1)


# ---------------------------------------------------------------------------------------------------------------
# registry and per-method defaults
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_METHODS)
def test_methods_are_registered_and_offered_by_the_cli(name):
    method = get_method(name)
    assert method.name == name and method.paper
    compile_parser = _parser()._subparsers._group_actions[0].choices["compile"]
    method_choices = next(a.choices for a in compile_parser._actions if a.dest == "method")
    assert name in method_choices


def test_sdq_turns_distillation_on_for_fine_tuning_unless_the_config_says_otherwise():
    assert METHODS["sdq"].configure(mpqc.CompileConfig()).finetune.distill is True
    assert METHODS["sdq"].configure(mpqc.CompileConfig()).search.distill is False
    assert METHODS["dq"].configure(mpqc.CompileConfig()).finetune.distill is False
    explicit = mpqc.CompileConfig(finetune=mpqc.TrainConfig(epochs=1, distill=False))
    assert METHODS["sdq"].configure(explicit).finetune.distill is False
    args = _parser().parse_args(["compile", "--model", "m.py:f", "--data", "digits", "--budget", "avg-bits=4",
                                 "--out", "x"])
    assert args.distill is None  # the CLI leaves it to the method
    args = _parser().parse_args(["compile", "--model", "m.py:f", "--data", "digits", "--budget", "avg-bits=4",
                                 "--out", "x", "--no-distill"])
    assert args.distill is False


# ---------------------------------------------------------------------------------------------------------------
# SDQ
# ---------------------------------------------------------------------------------------------------------------


def _sdq(kind: str, init_bits: int = 8, bit_range: BitRange = BitRange(2, 8), signed: bool = False, seed: int = 0):
    if kind == "weight":
        return SDQWeightQuantizer(_weight(seed), init_bits, bit_range)
    return SDQActivationQuantizer(signed, 3.0, init_bits, bit_range)


def _input(q, seed: int = 0) -> torch.Tensor:
    if q.per_channel:
        return _weight(seed)
    return torch.randn(4, 3, 5, 5, generator=_gen(seed)) * 2.5


@pytest.mark.parametrize(("init_bits", "bit_range", "lower", "dbp"), [
    (8, BitRange(2, 8), 7, 1.0), (4, BitRange(2, 8), 3, 1.0), (2, BitRange(2, 8), 2, 0.0),
    (9, BitRange(2, 8), 7, 1.0), (1, BitRange(3, 6), 3, 0.0), (5, BitRange(5, 5), 5, 0.0),
])
@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_sdq_starts_at_init_bits_on_an_adjacent_pair(kind, init_bits, bit_range, lower, dbp):
    q = _sdq(kind, init_bits, bit_range)
    assert (int(q.lower), q.dbp.item()) == (lower, dbp)
    assert q.bits().item() == min(max(init_bits, bit_range.min_bits), bit_range.max_bits)


@given(bits=st.integers(min_value=2, max_value=7), signed=st.booleans(), weight=st.booleans(), seed=seeds)
@PROPS
def test_sdq_choices_are_exactly_the_integer_quantizers_freezing_produces(bits, signed, weight, seed):
    q = _sdq("weight" if weight else "activation", signed=signed, seed=seed)
    x = _input(q, seed)
    _set(q.log_range, -0.2 if weight else 0.7)
    q.lower.fill_(bits)
    for dbp, chosen in ((0.0, bits), (1.0, bits + 1)):
        _set(q.dbp, dbp)
        fixed = q.to_fixed(chosen, x if weight else None)
        assert isinstance(fixed, FixedQuantizer) and fixed.fixed_bits == chosen
        for training in (True, False):
            q.train(training)
            assert torch.equal(q(x), q.quantize_at(x, chosen))
            _assert_matches_fixed(q(x), fixed, x)
        assert q.bits().item() == chosen


def test_sdq_stochastic_choice_has_the_dbp_as_its_probability():
    torch.manual_seed(1234)
    q = _sdq("activation", signed=True)
    x = _input(q)
    q.lower.fill_(3)
    beta = 0.3
    _set(q.dbp, beta)
    q_lower, q_upper = q.quantize_at(x, 3).detach(), q.quantize_at(x, 4).detach()
    draws, uppers, total = 4000, 0, torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(draws):
            out = q(x)
            upper = torch.equal(out, q_upper)
            assert upper or torch.equal(out, q_lower)
            uppers += upper
            total += out
    # binomial: 4 standard deviations of the fraction
    assert abs(uppers / draws - beta) < 4 * math.sqrt(beta * (1 - beta) / draws)
    expected = (1 - beta) * q_lower + beta * q_upper
    spread = (q_upper - q_lower).abs().max()
    assert (total / draws - expected).abs().max() <= 4 * math.sqrt(beta * (1 - beta) / draws) * spread + 1e-6
    assert q.bits().item() == pytest.approx(3 + beta)


@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_sdq_dbp_gets_the_gradient_of_the_expected_output(kind):
    torch.manual_seed(0)
    q = _sdq(kind, signed=True)
    x = _input(q).requires_grad_()
    q.lower.fill_(3)
    _set(q.dbp, 0.5)
    upstream = torch.randn(x.shape, generator=_gen(7))
    q_lower = q.to_fixed(3, x.detach() if q.per_channel else None)(x.detach())
    q_upper = q.to_fixed(4, x.detach() if q.per_channel else None)(x.detach())
    for _ in range(6):  # whichever bit-width is drawn, the DBP's gradient is the same
        q.zero_grad()
        x.grad = None
        (q(x) * upstream).sum().backward()
        torch.testing.assert_close(q.dbp.grad, ((q_upper - q_lower) * upstream).sum())
        assert torch.isfinite(x.grad).all() and q.log_range.grad is not None
    # the budget reads the expected bit-width: d bits / d beta = 1
    q.zero_grad()
    q.bits().backward()
    assert q.dbp.grad.item() == 1.0


def test_sdq_dbp_gradient_is_not_stuck_at_a_bound():
    q = _sdq("activation")  # init 8 bits: pair (7, 8), beta = 1
    q.bits().backward()
    assert q.dbp.grad.item() == 1.0


@pytest.mark.parametrize(("beta", "expected"), [(0.2, 3), (0.7, 4), (0.0, 3), (1.0, 4)])
def test_sdq_eval_is_deterministic_at_the_more_probable_bit_width(beta, expected):
    q = _sdq("activation").eval()
    x = _input(q)
    q.lower.fill_(3)
    _set(q.dbp, beta)
    torch.manual_seed(0)
    outs = [q(x) for _ in range(5)]
    assert all(torch.equal(o, q.quantize_at(x, expected)) for o in outs)
    _assert_matches_fixed(outs[0], q.to_fixed(expected), x)


@pytest.mark.parametrize(("lower", "dbp", "new_lower", "new_dbp"), [
    (5, 0.4, 5, 0.4),      # inside [0, 1]: unchanged
    (5, -0.25, 4, 0.75),   # below: the pair moves down, the excess carried over
    (5, 1.25, 6, 0.25),    # above: up
    (5, -2.5, 2, 0.5),     # several bits at once
    (2, -0.5, 2, 0.0),     # at the bottom of the range
    (7, 1.5, 7, 1.0),      # at the top
])
def test_sdq_project_moves_the_pair_and_keeps_the_expected_bits(lower, dbp, new_lower, new_dbp):
    q = _sdq("weight")
    q.lower.fill_(lower)
    _set(q.dbp, dbp)
    q.project_()
    assert int(q.lower) == new_lower and q.dbp.item() == pytest.approx(new_dbp)
    assert q.bits().item() == pytest.approx(min(max(lower + dbp, 2), 8))


@given(dbp=st.floats(min_value=-20, max_value=20), lower=st.integers(min_value=2, max_value=7),
       low=st.integers(min_value=2, max_value=6), span=st.integers(min_value=0, max_value=4))
@PROPS
def test_sdq_bits_stay_in_the_bit_range_after_projection(dbp, lower, low, span):
    bit_range = BitRange(low, low + span)
    q = _sdq("activation", bit_range=bit_range)
    q.lower.fill_(min(max(lower, low), max(low, low + span - 1)))
    _set(q.dbp, dbp)
    q.project_()
    assert bit_range.min_bits <= q.bits().item() <= bit_range.max_bits
    assert 0.0 <= q.dbp.item() <= 1.0


def test_ebr_is_zero_on_the_levels_and_pulls_weights_onto_them():
    scale = torch.tensor([0.5, 0.25])
    on_levels = torch.tensor([[0.5, -0.5, 0.0, 1.5], [0.25, 0.0, -0.75, 0.5]])
    assert entropy_aware_bin_regularization(on_levels, scale, -3, 3, per_channel=True).item() == 0.0
    w = (on_levels + torch.randn(on_levels.shape, generator=_gen(0)) * 0.05).requires_grad_()
    before = entropy_aware_bin_regularization(w, scale, -3, 3, per_channel=True)
    assert before.item() > 0
    before.backward()
    with torch.no_grad():
        stepped = w - 0.5 * w.grad / w.grad.abs().max() * 0.01
    after = entropy_aware_bin_regularization(stepped, scale, -3, 3, per_channel=True)
    assert after.item() < before.item()
    distance = lambda t: (t / scale[:, None] - (t / scale[:, None]).round()).abs().sum()  # noqa: E731
    assert distance(stepped) < distance(w.detach())


def test_ebr_weights_bins_by_their_share_of_the_entropy():
    # 30 weights in bin 0, 30 in bin 1, one outlier alone in bin 3 (qmax 3), 0.4 off its level. Each bin's term
    # is weighted by -p log p / H: the outlier's nearly empty bin carries little information and weighs little.
    gen = _gen(0)
    body = torch.cat([torch.rand(30, generator=gen) * 0.6 - 0.3, 1 + torch.rand(30, generator=gen) * 0.6 - 0.3])
    w = torch.cat([body, torch.tensor([3.4])])
    p = torch.tensor([30 / 61, 30 / 61, 1 / 61])
    h = -p * p.log()
    share = h / h.sum()
    per_bin = []
    for members, level in ((w[:30], 0.0), (w[30:60], 1.0), (w[60:], 3.0)):
        per_bin.append((members.mean() - level) ** 2 + members.var(unbiased=False))
    expected = sum(s_ * t for s_, t in zip(share, per_bin)) / 3**2  # in units of the dynamic range (qmax steps)
    loss = entropy_aware_bin_regularization(w, torch.tensor([1.0]), -3, 3, per_channel=False)
    torch.testing.assert_close(loss, expected)
    assert share[2] < 0.1 < 0.45 < share[0] == share[1]
    # equally occupied bins weigh the same: the plain mean of the per-bin terms
    balanced = torch.tensor([-1.1, -0.9, 0.1, -0.1, 1.2, 0.8])
    expected = ((0.1**2) + (0.1**2) + (0.2**2)) / 3
    torch.testing.assert_close(entropy_aware_bin_regularization(balanced, torch.tensor([1.0]), -1, 1, False),
                               torch.tensor(expected))


def test_sdq_fixed_quantizer_regularises_its_last_training_input_once():
    w = _weight()
    q = SDQWeightQuantizer(w, 3, ebr_weight=1.0)
    fixed = q.to_fixed(3, w)
    assert isinstance(fixed, SDQFixedQuantizer) and fixed.ebr_weight == 1.0
    assert torch.equal(fixed(w), q.fixed(3, w)(w))
    expected = entropy_aware_bin_regularization(w, fixed.scale, -3, 3, True)
    torch.testing.assert_close(fixed.extra_loss(), expected)
    assert fixed.extra_loss() is None  # consumed
    fixed.eval()
    fixed(w)
    assert fixed.extra_loss() is None  # nothing to regularise in eval mode
    assert isinstance(fixed.to_fixed(4), SDQFixedQuantizer)
    # activations use a plain fixed quantizer
    assert type(_sdq("activation").to_fixed(4)) is FixedQuantizer


# ---------------------------------------------------------------------------------------------------------------
# FracBits
# ---------------------------------------------------------------------------------------------------------------


def _fracbits(kind: str, init_bits: int = 8, bit_range: BitRange = BitRange(2, 8), signed: bool = False,
              seed: int = 0):
    if kind == "weight":
        return FracBitsWeightQuantizer(_weight(seed), init_bits, bit_range)
    if kind == "kernel":
        return FracBitsWeightQuantizer(_weight(seed), init_bits, bit_range, kernel_wise=True)
    return FracBitsActivationQuantizer(signed, 3.0, init_bits, bit_range)


@given(bits=st.integers(min_value=2, max_value=8), kind=st.sampled_from(["weight", "kernel", "activation"]),
       signed=st.booleans(), seed=seeds)
@PROPS
def test_fracbits_at_an_integer_bit_width_is_exactly_the_integer_quantizer(bits, kind, signed, seed):
    q = _fracbits(kind, signed=signed, seed=seed)
    x = _input(q, seed)
    _set(q.frac_bits, bits)
    _set(q.log_range, -0.3 if q.per_channel else 0.5)
    fixed = q.to_fixed(bits, x if q.per_channel else None)
    assert isinstance(fixed, FixedQuantizer) and fixed.fixed_bits == bits
    assert torch.equal(q(x), q.quantize_at(x, bits))
    _assert_matches_fixed(q(x), fixed, x)
    assert q.bits().item() == bits


@given(low=st.integers(min_value=2, max_value=7), frac=st.floats(min_value=0.0, max_value=1.0),
       kind=st.sampled_from(["weight", "kernel", "activation"]), seed=seeds)
@PROPS
def test_fracbits_interpolates_the_neighbouring_integer_quantizers(low, frac, kind, seed):
    q = _fracbits(kind, signed=True, seed=seed)
    x = _input(q, seed).requires_grad_()
    b = low + frac
    _set(q.frac_bits, b)
    lower = min(math.floor(b), 7)
    f = b - lower
    weight = x.detach() if q.per_channel else None
    q_lower, q_upper = q.to_fixed(lower, weight)(x.detach()), q.to_fixed(lower + 1, weight)(x.detach())
    out = q(x)
    torch.testing.assert_close(out, (1 - f) * q_lower + f * q_upper)
    assert q.bits().item() == pytest.approx(b)
    upstream = torch.randn(x.shape, generator=_gen(seed + 1))
    (out * upstream).sum().backward()
    grad = q.frac_bits.grad
    difference = (q_upper - q_lower) * upstream
    tolerance = 1e-5 * (difference.abs().sum().item() + 1)  # sums in another order, with cancellation
    if q.kernel_wise:  # each channel's bit-width gets its own channel's share
        torch.testing.assert_close(grad, difference.reshape(difference.shape[0], -1).sum(1), rtol=0,
                                   atol=tolerance)
    else:
        torch.testing.assert_close(grad, difference.sum(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_fracbits_has_a_bit_gradient_at_integers_and_at_the_top_of_the_range(kind):
    q = _fracbits(kind)  # starts at exactly 8 bits, the top of the range
    x = _input(q)
    q(x).abs().sum().backward()
    assert q.frac_bits.grad.abs().item() > 0
    q.zero_grad()
    _set(q.frac_bits, 5.0)
    q(x).abs().sum().backward()
    assert q.frac_bits.grad.abs().item() > 0


@pytest.mark.parametrize("kind", ["weight", "kernel", "activation"])
def test_fracbits_output_is_continuous_in_the_bit_width(kind):
    q = _fracbits(kind, signed=True)
    x = _input(q)
    with torch.no_grad():
        for k in range(3, 8):
            _set(q.frac_bits, k - 1e-5)
            below = q(x)
            _set(q.frac_bits, k)
            assert (q(x) - below).abs().max().item() < 1e-3 * x.abs().max().item()


def test_fracbits_kernel_wise_quantizes_each_channel_at_its_own_bit_width():
    w = _weight(3)
    q = FracBitsWeightQuantizer(w, 8, BitRange(2, 8), kernel_wise=True)
    channel_bits = torch.tensor([2.0, 5.0, 8.0, 3.0, 6.0])
    with torch.no_grad():
        q.frac_bits.copy_(channel_bits)
    out = q(w)
    for c, bits in enumerate(channel_bits.long().tolist()):
        assert torch.equal(out[c], q.quantize_at(w, bits)[c]), c
        torch.testing.assert_close(out[c], q.to_fixed(bits, w)(w)[c], rtol=1e-5, atol=1e-7)
    assert q.bits().item() == pytest.approx(channel_bits.mean().item())
    # budgets read the mean, which is the params-weighted mean: costs equal the per-channel sums exactly
    info = LayerInfo(name="l", op="conv2d", weight_shape=tuple(w.shape), params=w.numel(), bias_params=0,
                     out_channels=5, macs=w.numel() * 16, input_shape=(3, 4, 4), output_shape=(5, 4, 4),
                     input_elements=3 * 16, output_elements=5 * 16)
    per_channel_params = w.numel() // w.shape[0]
    bits = {"l": LayerBits(q.bits(), torch.tensor(4.0))}
    torch.testing.assert_close(WeightMemory(1).cost([info], bits), (channel_bits * per_channel_params).sum() / 8)
    torch.testing.assert_close(BitOps(1).cost([info], bits), (channel_bits * per_channel_params * 16 * 4).sum())
    # frozen per layer (the integer contract has one weight bit-width per layer): round(mean) = round(4.8) = 5
    fixed = q.to_fixed(round(q.bits().item()), w)
    assert fixed.fixed_bits == 5 and fixed.scale.shape == (5,)


@given(value=st.floats(min_value=-50, max_value=50), kind=st.sampled_from(["weight", "kernel", "activation"]),
       low=st.integers(min_value=2, max_value=6), span=st.integers(min_value=0, max_value=4))
@PROPS
def test_fracbits_bits_stay_in_the_bit_range(value, kind, low, span):
    bit_range = BitRange(low, low + span)
    q = _fracbits(kind, bit_range=bit_range)
    _set(q.frac_bits, value)
    x = _input(q)
    assert bit_range.min_bits <= q.bits().item() <= bit_range.max_bits
    assert torch.isfinite(q(x)).all()
    q.project_()
    assert bit_range.min_bits <= q.frac_bits.min().item() <= q.frac_bits.max().item() <= bit_range.max_bits


# ---------------------------------------------------------------------------------------------------------------
# CSQ
# ---------------------------------------------------------------------------------------------------------------


def _csq(kind: str, init_bits: int = 8, bit_range: BitRange = BitRange(2, 8), signed: bool = False, seed: int = 0):
    if kind == "weight":
        return CSQWeightQuantizer(_weight(seed), init_bits, bit_range)
    return CSQActivationQuantizer(signed, 3.0, init_bits, bit_range)


def _scramble(q, seed: int) -> None:
    """Random logits: bit values anywhere, gates anywhere (unordered too)."""
    gen = _gen(seed)
    with torch.no_grad():
        for name, param in q.named_parameters():
            if name.endswith("logits"):
                param.copy_(torch.randn(param.shape, generator=gen))


def test_csq_temperature_is_annealed_exponentially_over_training():
    q = _csq("weight")
    temperatures = []
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        q.set_progress(fraction)
        temperatures.append(q.temperature())
    assert temperatures[0] == pytest.approx(START_TEMPERATURE) and temperatures[-1] == pytest.approx(FINAL_TEMPERATURE)
    assert temperatures[2] == pytest.approx(math.sqrt(START_TEMPERATURE * FINAL_TEMPERATURE))
    assert all(a < b for a, b in zip(temperatures, temperatures[1:]))
    assert FINAL_TEMPERATURE / START_TEMPERATURE == pytest.approx(200.0)  # the paper's factor
    assert "progress" in q.state_dict()  # a checkpoint carries where the schedule stands


@given(kind=st.sampled_from(["weight", "activation"]), seed=seeds, low=st.integers(min_value=2, max_value=5),
       span=st.integers(min_value=0, max_value=4))
@PROPS
def test_csq_gates_are_exactly_binary_and_bits_an_integer_at_the_end(kind, seed, low, span):
    q = _csq(kind, bit_range=BitRange(low, low + span), seed=seed)
    _scramble(q, seed)
    q.set_progress(0.0)
    soft = q.gates()
    assert ((soft > 0) & (soft < 1)).all()  # |logit| < 5 at the start temperature: strictly between 0 and 1
    q.set_progress(1.0)
    gates = q.gates()
    assert set(gates.tolist()) <= {0.0, 1.0}
    assert all(a >= b for a, b in zip(gates.tolist(), gates.tolist()[1:]))  # ordered: the selected bits are the top
    bits = q.bits().item()
    assert bits == low + gates.sum().item() and low <= bits <= low + span
    if kind == "weight":
        values = torch.sigmoid(q.pos_logits * q.temperature())
        hard = (q.pos_logits > 0).float() + (values - values.detach())
        assert torch.equal(hard, (q.pos_logits > 0).float())


@given(seed=seeds, low=st.integers(min_value=2, max_value=4), span=st.integers(min_value=0, max_value=4))
@PROPS
def test_csq_weight_at_the_end_is_exactly_the_integer_quantizer_of_its_encoded_weight(seed, low, span):
    bit_range = BitRange(low, low + span)
    w = _weight(seed)
    q = CSQWeightQuantizer(w, 8, bit_range)
    _scramble(q, seed)
    q.set_progress(1.0)
    bits = int(q.bits().item())
    encoded = q.encoded_weight(w)
    out = q(w)
    assert torch.equal(out, encoded)
    fixed = q.to_fixed(bits, w)
    assert isinstance(fixed, FixedQuantizer) and fixed.fixed_bits == bits
    torch.testing.assert_close(fixed(encoded), encoded, rtol=1e-5, atol=0)  # on the grid: nothing rounds away
    codes = fixed.frozen().quantize(encoded)
    torch.testing.assert_close(codes.float() * fixed.scale.detach().reshape(-1, 1, 1, 1), encoded, rtol=1e-5, atol=0)
    qmin, qmax = integer_range(bits, True)
    assert codes.min().item() >= qmin and codes.max().item() <= qmax


def test_csq_starts_from_the_pretrained_weight_at_the_largest_precision():
    w = _weight(5)
    q = CSQWeightQuantizer(w, 8, BitRange(2, 8))
    step = w.abs().reshape(5, -1).amax(1).reshape(-1, 1, 1, 1) / 127
    assert ((q.encoded_weight(w) - w).abs() <= 0.51 * step).all()
    q.set_progress(0.0)
    assert q.bits().item() == pytest.approx(2 + 6 * torch.sigmoid(torch.tensor(START_TEMPERATURE)).item())
    assert ((q(w) - w).abs() <= 0.1 * w.abs().amax()).all()  # soft gates at the start: close, not exact
    q4 = CSQWeightQuantizer(w, 4, BitRange(2, 8))
    q4.set_progress(1.0)
    assert q4.bits().item() == 4.0


def _terms_csq(q, x):
    return sum(pi * q.quantize_at(x, k) for k, pi in zip(range(2, 9), q.bit_probabilities()))


def _terms_fracbits(q, x):
    b = q.channel_bits()
    lower = int(torch.floor(b.detach()).clamp(2, 7))
    return (1 - (b - lower)) * q.quantize_at(x, lower) + (b - lower) * q.quantize_at(x, lower + 1)


def _terms_sdq(q, x):
    lower, upper = q._pair()
    beta = q.probability()
    pick_upper = bool(torch.rand(()) < beta.detach())
    q_lower, q_upper = q.quantize_at(x, lower), q.quantize_at(x, upper)
    return (q_upper if pick_upper else q_lower) + (beta - beta.detach()) * (q_upper - q_lower)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("method", ["csq", "fracbits", "sdq"])
def test_activation_mixtures_are_one_node_with_the_gradients_of_their_terms(method, signed):
    """The activation quantizers that mix integer quantizers (CSQ: all bit-widths, FracBits: a pair, SDQ: the drawn
    one of a pair, the pair's expectation in gradient) run as one fused node (mpqc.quantizers.mixture): against the
    same outputs written term by term through autograd, values and the gradients of the input, the range and the
    bit-width parameters, with inputs on the range's bounds and beyond it (zeros after a ReLU, exactly alpha)."""
    if method == "csq":
        q, terms, bit_params = _csq("activation", signed=signed), _terms_csq, "gate_logits"
        _scramble(q, 5)
        q.set_progress(0.3)
    elif method == "fracbits":
        q, terms, bit_params = _fracbits("activation", signed=signed), _terms_fracbits, "frac_bits"
        _set(q.frac_bits, 4.3)
    else:
        q, terms, bit_params = _sdq("activation", init_bits=4, signed=signed), _terms_sdq, "dbp"
        _set(q.dbp, 0.6)
    alpha = q.log_range.exp().item()
    x = _input(q, seed=2)
    if not signed:
        x = x.relu()
    x.view(-1)[:4] = torch.tensor([alpha, -alpha, 3 * alpha, -3 * alpha])
    x.requires_grad_()
    grad = torch.randn(x.shape, generator=_gen(7))

    def run(forward):
        torch.manual_seed(3)  # SDQ draws its bit-width: the same draw for both
        output = forward(q, x)
        output.backward(grad)
        param = getattr(q, bit_params)
        grads = [x.grad.clone(), q.log_range.grad.clone(), param.grad.clone()]
        x.grad, q.log_range.grad, param.grad = None, None, None
        return output, grads

    expected, expected_grads = run(terms)
    fused, fused_grads = run(lambda q, x: q(x))
    assert fused.grad_fn.name() == "_BitMixtureBackward"
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    for name, got, want in zip(["x", "range", bit_params], fused_grads, expected_grads):
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


def test_bit_mixture_refuses_a_mismatched_mixture():
    from mpqc.quantizers.mixture import bit_mixture
    with pytest.raises(ValueError, match="3 bit-widths but pi has shape"):
        bit_mixture(torch.ones(4), torch.tensor(1.0), torch.ones(2) / 2, [2, 3, 4], signed=False)


def test_csq_activation_mixes_the_integer_quantizers_and_is_exactly_one_at_the_end():
    q = _csq("activation", signed=True)
    x = _input(q).requires_grad_()
    _scramble(q, 3)
    q.set_progress(0.2)
    pi = q.bit_probabilities()
    assert (pi >= 0).all() and pi.sum().item() == pytest.approx(1.0)
    assert (pi * torch.arange(2, 9)).sum().item() == pytest.approx(q.bits().item(), abs=1e-5)
    mixture = sum(p * q.to_fixed(k)(x.detach()) for k, p in zip(range(2, 9), pi.detach()))
    torch.testing.assert_close(q(x), mixture)
    q(x).abs().sum().backward()
    assert (q.gate_logits.grad != 0).all()  # every gate learns while the gates are soft
    q.set_progress(1.0)
    bits = int(q.bits().item())
    assert torch.equal(q(x), q.quantize_at(x, bits))
    _assert_matches_fixed(q(x), q.to_fixed(bits), x)


def test_csq_every_gate_gets_the_budget_gradient():
    for q in (_csq("weight"), _csq("activation")):
        q.set_progress(0.1)
        q.bits().backward()
        assert (q.gate_logits.grad > 0).all()


def test_freezing_csq_at_the_end_of_the_search_keeps_the_outputs():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.resnet20()), x, method="csq")
    gen = _gen(0)
    for module in gm.modules():
        if isinstance(module, (CSQWeightQuantizer, CSQActivationQuantizer)):
            with torch.no_grad():
                module.gate_logits.copy_(torch.randn(module.gate_logits.shape, generator=gen))
            module.set_progress(1.0)
    gm.eval()
    with torch.no_grad():
        before = gm(x)
    searched = {name: (b.weight.item(), b.activation.item()) for name, b in current_bits(quantized_layers(gm)).items()}
    freeze(gm, mpqc.WeightMemory(1e12))
    frozen = {name: (b.weight.item(), b.activation.item()) for name, b in current_bits(quantized_layers(gm)).items()}
    assert frozen == searched and len(set(frozen.values())) > 1
    for layer in quantized_layers(gm):
        del layer.module.input_quantizer  # compare without the bias rounding freezing adds (tested in test_freeze)
    with torch.no_grad():
        after = gm(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# end to end on digits, every method
# ---------------------------------------------------------------------------------------------------------------



@pytest.mark.parametrize("method", NEW_METHODS)
def test_tight_budget_lowers_bits_loose_does_not_and_the_frozen_model_meets_it(method, trained_small_cnn,
                                                                               digits_loaders, tmp_path):
    example = _example(digits_loaders)
    tight = mpqc.compile(trained_small_cnn, example, budget="avg-bits=3", data=digits_loaders, method=method,
                         config=FAST, out=tmp_path / "tight")
    loose = mpqc.compile(trained_small_cnn, example, budget="avg-bits=8", data=digits_loaders, method=method,
                         config=FAST)
    assert tight.report["budget"]["met"] and tight.report["totals"]["average_weight_bits"] <= 3.0
    assert loose.report["totals"]["average_weight_bits"] >= 7.0
    searched_tight = [layer["weight_bits_search"] for layer in tight.report["layers"]]
    searched_loose = [layer["weight_bits_search"] for layer in loose.report["layers"]]
    assert all(t < l for t, l in zip(searched_tight, searched_loose)), (searched_tight, searched_loose)
    assert all(2 <= layer["weight_bits"] <= 8 and 2 <= layer["activation_bits"] <= 8
               for layer in tight.report["layers"])
    for result in (tight, loose):
        # the integer reference agrees with the frozen fake-quant graph
        for layer in quantized_layers(result.graph):
            assert isinstance(layer.weight_quantizer, FixedQuantizer)
            assert isinstance(layer.input_quantizer, FixedQuantizer)
        accuracy = result.report["accuracy"]
        assert abs(accuracy["integer_reference"] - accuracy["quantized"]) < 2.0, accuracy
        images = next(iter(digits_loaders[1]))[0]
        with torch.no_grad():
            agree = (result.graph(images).argmax(1) == result(images).argmax(1)).float().mean().item()
        assert agree > 0.97
    assert loose.report["accuracy"]["quantized"] > 60, loose.report["accuracy"]
    run = json.loads((tmp_path / "tight" / "run.json").read_text())["identity"]
    assert run["method"] == method
    assert run["config"]["finetune"]["distill"] is METHODS[method].defaults.finetune_distill


@pytest.mark.parametrize("method", NEW_METHODS)
def test_an_interrupted_search_resumes_to_the_uninterrupted_state(method, trained_small_cnn, digits_loaders,
                                                                  tmp_path):
    example = _example(digits_loaders)
    train_loader = digits_loaders[0]
    config = mpqc.TrainConfig(epochs=2, max_steps_per_epoch=6, quantizer_lr=0.05, checkpoint_every=4)
    budget = mpqc.AverageBits(3.0)

    def fresh():
        torch.manual_seed(0)
        return quantized_graph(trained_small_cnn, example, method=method)

    gm, layers = fresh()
    search(gm, budget, layers, train_loader, config, checkpoint=tmp_path / "a.pt", seed=3, progress=False)
    interrupted, layers = fresh()
    search(interrupted, budget, layers, train_loader, config, checkpoint=tmp_path / "b.pt", seed=3, progress=False,
           stop_after_steps=5)  # mid-epoch: the RNG state (SDQ's draws) is restored from the checkpoint
    resumed, layers = fresh()
    search(resumed, budget, layers, train_loader, config, checkpoint=tmp_path / "b.pt", seed=3, progress=False)
    expected, actual = gm.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert any(not torch.equal(v, interrupted.state_dict()[k]) for k, v in expected.items())
    # A run interrupted after its search (in fine-tuning) reloads the finished search: the same bits, CSQ's
    # schedule at its end (the progress is a buffer) included.
    reloaded, layers = fresh()
    search(reloaded, budget, layers, train_loader, config, checkpoint=tmp_path / "a.pt", seed=3, progress=False)
    assert {k: (b.weight.item(), b.activation.item()) for k, b in current_bits(quantized_layers(reloaded)).items()} \
        == {k: (b.weight.item(), b.activation.item()) for k, b in current_bits(quantized_layers(gm)).items()}


@pytest.mark.parametrize("method", NEW_METHODS)
def test_cli_compiles_with_every_method(method, tmp_path, capsys):
    from mpqc.cli import main

    out = tmp_path / "run"
    code = main(["compile", "--model", f"{ROOT}/examples/models.py:small_cnn", "--data", "digits",
                 "--budget", "avg-bits=4", "--method", method, "--search-epochs", "1", "--finetune-epochs", "1",
                 "--steps-per-epoch", "4", "--batch-size", "32", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["budget"]["met"]
    run = json.loads((out / "run.json").read_text())["identity"]
    assert run["config"]["finetune"]["distill"] is METHODS[method].defaults.finetune_distill


def _budget_between(kind: str, layers, fraction: float):
    """A budget of ``kind`` at ``fraction`` of the way from the all-2-bit cost to the all-8-bit cost."""
    from mpqc.budgets import ActivationMemory, AverageBits, TargetCost

    make = {"weight-memory": WeightMemory, "activation-memory": ActivationMemory, "bitops": BitOps,
            "avg-bits": AverageBits, "bitfusion": lambda limit: TargetCost("bitfusion", limit),
            "bitserial": lambda limit: TargetCost("bitserial", limit)}[kind]

    def at(bits: float) -> float:
        uniform = {layer.name: LayerBits(torch.tensor(bits), torch.tensor(bits)) for layer in layers}
        return float(make(1.0).cost(layers, uniform))

    return make(at(2) + fraction * (at(8) - at(2)))


@pytest.mark.parametrize("kind", ["weight-memory", "activation-memory", "bitops", "avg-bits", "bitfusion",
                                  "bitserial"])
@pytest.mark.parametrize("method", ["dq", *NEW_METHODS])
def test_every_method_meets_every_budget_kind_after_freezing_or_refuses_it_up_front(method, kind, trained_small_cnn,
                                                                                   digits_loaders):
    example = _example(digits_loaders)
    layers = mpqc.passes.analyze_layers.analyze_layers(
        mpqc.passes.fold_batchnorm.fold_batchnorm(mpqc.passes.capture.capture(trained_small_cnn, (example,))),
        (example,))
    config = mpqc.CompileConfig(search=mpqc.TrainConfig(epochs=1, max_steps_per_epoch=8, quantizer_lr=0.05),
                                finetune=mpqc.TrainConfig(epochs=1, max_steps_per_epoch=2), progress=False)
    budget = _budget_between(kind, layers, 0.3)
    result = mpqc.compile(trained_small_cnn, example, budget=budget, data=digits_loaders, method=method,
                          config=config)
    assert result.report["budget"]["met"], result.report["budget"]
    assert budget.met(float(budget.cost(layers, {
        layer["name"]: LayerBits(torch.tensor(float(layer["weight_bits"])), torch.tensor(float(layer["activation_bits"])))
        for layer in result.report["layers"]})))  # recomputed from the frozen bits, not taken from the report
    below_floor = type(budget)(budget.limit * 1e-3) if kind not in ("bitfusion", "bitserial") \
        else type(budget)(kind, budget.limit * 1e-3)
    with pytest.raises(mpqc.errors.InfeasibleBudgetError, match="smallest achievable"):
        mpqc.compile(trained_small_cnn, example, budget=below_floor, data=digits_loaders, method=method,
                     config=config)
