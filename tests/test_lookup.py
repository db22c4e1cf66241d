"""Non-linear functions as integer lookup tables (``mpqc/ops/lookup.py``): every entry is the float64 function
rounded half to even, monotone functions stay monotone, and the reference, TVM and onnxruntime index the same
table (bit-exact at every quantizer, every input width 2..8)."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from conftest import freeze_at_random_bits, quantized_graph, set_bits  # noqa: E402
from mpqc.budgets import WeightMemory  # noqa: E402
from mpqc.passes.freeze import freeze  # noqa: E402
from mpqc.passes.insert_quantizers import quantized_activations  # noqa: E402
from mpqc.quantizers.base import BitRange  # noqa: E402
from mpqc import ops  # noqa: E402
from mpqc.errors import UnsupportedOpError  # noqa: E402
from mpqc.ops.lookup import FUNCTIONS, build_table, table_is_monotone  # noqa: E402
from mpqc.quantizers.base import integer_range  # noqa: E402
from mpqc.reference import IntegerProgram  # noqa: E402


# --------------------------------------------------------------------------------------------- the tables
def _softplus(x: float, beta: float, threshold: float) -> float:
    return x if beta * x > threshold else math.log1p(math.exp(beta * x)) / beta


#: the functions written out independently of PyTorch, in Python float64
EXPECTED = {
    "sigmoid": lambda x, p: 1 / (1 + math.exp(-x)),
    "hardsigmoid": lambda x, p: min(max(x / 6 + 0.5, 0.0), 1.0),
    "silu": lambda x, p: x / (1 + math.exp(-x)),
    "hardswish": lambda x, p: x * min(max(x + 3, 0.0), 6.0) / 6,
    "gelu": lambda x, p: (0.5 * x * (1 + math.erf(x / math.sqrt(2))) if p.get("approximate", "none") == "none" else
                          0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    "tanh": lambda x, p: math.tanh(x),
    "leaky_relu": lambda x, p: x if x >= 0 else p["negative_slope"] * x,
    "elu": lambda x, p: x if x > 0 else p["alpha"] * math.expm1(x),
    "softplus": lambda x, p: _softplus(x, p["beta"], p["threshold"]),
    "mish": lambda x, p: x * math.tanh(_softplus(x, 1.0, 20.0)),
}
PARAMS = {"leaky_relu": st.fixed_dictionaries({"negative_slope": st.sampled_from([0.01, 0.1, 0.2])}),
          "elu": st.fixed_dictionaries({"alpha": st.sampled_from([0.5, 1.0])}),
          "softplus": st.fixed_dictionaries({"beta": st.sampled_from([1.0, 2.0]), "threshold": st.sampled_from([5.0, 20.0])}),
          "gelu": st.fixed_dictionaries({"approximate": st.sampled_from(["none", "tanh"])})}


def test_every_function_is_tested():
    assert set(EXPECTED) == set(FUNCTIONS)


@st.composite
def _tables(draw):
    function = draw(st.sampled_from(sorted(FUNCTIONS)))
    params = draw(PARAMS.get(function, st.just({})))
    in_bits, bits = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    in_signed = draw(st.booleans())
    signed = not FUNCTIONS[function].nonnegative or draw(st.booleans())
    in_scale = draw(st.floats(1e-3, 1.0))
    scale = draw(st.floats(1e-3, 0.5))
    return function, params, in_bits, in_signed, in_scale, bits, signed, scale


@settings(max_examples=300, deadline=None)
@given(_tables())
def test_table_entries_are_the_float64_function_rounded_half_to_even(case):
    function, params, in_bits, in_signed, in_scale, bits, signed, scale = case
    table = build_table(function, params, in_bits, in_signed, in_scale, bits, signed, scale)
    qmin, qmax = integer_range(in_bits, in_signed)
    low, high = integer_range(bits, signed)
    assert table.dtype == torch.int64 and table.numel() == qmax - qmin + 1 == 2**in_bits - (1 if in_signed else 0)
    for i, q in enumerate(range(qmin, qmax + 1)):
        y = EXPECTED[function](q * in_scale, params) / scale
        expected = min(max(round(y), low), high)  # Python's round: half to even
        if abs(y - math.floor(y) - 0.5) > 1e-9:  # (at an exact tie the two float64 formulas may round apart)
            assert int(table[i]) == expected, (function, params, q, y)
    if FUNCTIONS[function].monotone:
        assert table_is_monotone(table)
    if FUNCTIONS[function].keeps_zero and qmin <= 0:
        assert int(table[-qmin]) == 0  # f(0) = 0: channel pruning may look through it


def test_a_table_of_a_wide_input_is_refused():
    with pytest.raises(ops.Unsupported, match="at most 8 bits, got 12"):
        build_table("silu", {}, 12, True, 0.01, 8, True, 0.01)


# --------------------------------------------------------------------------------------------- in a model
class _Net(nn.Module):
    """conv -> act (a module) -> conv -> silu (a function) -> mean -> linear: each lookup's input is a conv's
    int32 accumulator (a quantizer is inserted) and its output feeds a layer or a reduction."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.c1, self.act = nn.Conv2d(3, 8, 3, padding=1), act
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.silu(self.c2(self.act(self.c1(x)))).mean((2, 3)))


class _Methods(nn.Module):
    """``x.sigmoid()`` and ``torch.tanh`` of the codes a layer reads too (no quantizer of their own), F.gelu(tanh)
    of a sum."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = self.c2(a) + torch.tanh(a) + a.sigmoid()
        return self.fc(F.gelu(b, approximate="tanh").flatten(1))


ACTS = [nn.Sigmoid(), nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid(), nn.GELU(), nn.GELU("tanh"), nn.Tanh(),
        nn.LeakyReLU(0.1), nn.ELU(0.5), nn.Softplus(2.0, 5.0), nn.Mish()]


def _program(model: nn.Module, bits: int, seed: int) -> tuple[IntegerProgram, torch.Tensor, object]:
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 8, 8)
    gm, _ = quantized_graph(model, x)
    operands = {activation.name for activation in quantized_activations(gm)}  # the lookups' inputs
    rng = random.Random(seed)
    set_bits(gm, lambda name: bits if name in operands else rng.randint(2, 8))
    return IntegerProgram.from_graph(freeze(gm, WeightMemory(1e12))), x, gm


@pytest.mark.parametrize("act", ACTS, ids=lambda m: repr(m))
def test_lookup_tables_are_bit_exact_in_every_backend(act):
    """Reference vs TVM bit-exact at every quantizer, onnxruntime within the contract, fake-quant close; the
    lookups' own operand quantizers at 2..8 bits (one width per function, all widths over the list)."""
    pytest.importorskip("tvm")
    from mpqc.targets import tvm as mtvm
    from mpqc.targets.onnx import build_onnx
    from mpqc.targets.onnx_check import check_agreement, compare_with_reference

    bits = 2 + ACTS.index(act) % 7
    program, x, gm = _program(_Net(act), bits, seed=ACTS.index(act))
    lookups = [node for node in program.nodes if node.op == "lookup"]
    assert len(lookups) == 2 and {node.attrs["in_bits"] for node in lookups} <= set(range(2, 9))
    assert lookups[0].attrs["in_bits"] == bits
    with torch.no_grad():  # the fake-quant graph computes f in fp32: the same up to rounding ties
        fake, ours = gm(x), program.run(x)
    assert (fake - ours).abs().max() <= 0.1 * fake.abs().max() + 1e-6
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=x.shape, expose=quantizers)
    env = program.run_all(x)
    codes = lowered.exposed(x)
    for name in quantizers:
        assert torch.equal(torch.from_numpy(codes[name]).to(torch.int64), env[name].q), name
    assert torch.equal(lowered(x), ours)
    onnx_model, _ = build_onnx(program, input_shapes=[tuple(x.shape)])
    result = compare_with_reference(program, onnx_model, x)
    check_agreement(result)
    after_lookups = [node.name for node in program.nodes
                     if node.op == "quantize" and node.inputs[0] in {lookup.name for lookup in lookups}]
    assert len(after_lookups) == 2
    for name in after_lookups:  # a table lookup leaves no rounding to disagree on
        assert result["quantizers"][name]["exact"] == 1.0, name


def test_function_and_method_forms_and_codes_behind_a_relu():
    pytest.importorskip("tvm")
    from mpqc.targets import tvm as mtvm

    program, x, _ = _program(_Methods(), 5, seed=3)
    lookups = {node.name: node for node in program.nodes if node.op == "lookup"}
    assert sorted(node.attrs["function"] for node in lookups.values()) == ["gelu", "sigmoid", "tanh"]
    gelu = next(node for node in lookups.values() if node.attrs["function"] == "gelu")
    assert gelu.attrs["params"] == {"approximate": "tanh"}
    # tanh and sigmoid read the codes c2 reads: its input quantizer, none inserted for them
    readers = [node for node in lookups.values() if node.attrs["function"] in ("tanh", "sigmoid")]
    assert {node.inputs[0] for node in readers} == {"act_quantizers_c2"}
    assert all(node.attrs["in_signed"] is False for node in readers)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=x.shape, expose=quantizers)
    assert torch.equal(lowered(x), program.run(x))


def test_sign_and_pruning_facts_come_from_the_function():
    gm, _ = quantized_graph(_Net(nn.Sigmoid()), torch.randn(2, 3, 8, 8))
    nodes = {node.name: node for node in gm.graph.nodes}
    assert ops.is_nonnegative(gm, nodes["act"]) and not ops.keeps_zero(gm, nodes["act"])
    assert not ops.is_nonnegative(gm, nodes["silu"]) and ops.keeps_zero(gm, nodes["silu"])
    assert gm.act_quantizers.c2.signed is False  # a sigmoid's codes (c2 reads them) are unsigned


def test_program_with_tables_saves_and_loads(tmp_path):
    program, x, _ = _program(_Net(nn.Hardswish()), 8, seed=0)
    program.save(tmp_path)
    loaded = IntegerProgram.load(tmp_path)
    assert torch.equal(loaded.run(x), program.run(x))
    assert all(torch.equal(a.tensors["table"], b.tensors["table"])
               for a, b in zip(program.nodes, loaded.nodes) if a.op == "lookup")


def test_lookup_of_a_wide_input_is_a_clear_error():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    # The lookups' own input quantizers learn at most 8 bits; tanh here reads a layer's input codes, 12 bits wide.
    gm, _ = quantized_graph(_Methods(), x, activation_bits=BitRange(2, 12))
    set_bits(gm, lambda name: 12)
    gm = freeze(gm, WeightMemory(1e12))
    with pytest.raises(UnsupportedOpError, match=r"tanh.*at most 8 bits, got 12"):
        IntegerProgram.from_graph(gm)
