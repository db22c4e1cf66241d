"""passes/shift_activations.py: a bounded-below activation read only by linears (or unpadded 1x1 convs) becomes
``f(x) + c >= 0`` with unsigned codes, the shift folded into the readers' biases: the fp32 graph computes what it
computed, the integer program (bias folded from the integer weight) agrees with fake-quant within 1 LSB, TVM bit for
bit, onnxruntime within the contract; anything else is left alone."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from conftest import set_bits  # noqa: E402
from test_reference import _fake_quant_codes  # noqa: E402
from mpqc import ops, pipeline  # noqa: E402
from mpqc.budgets import WeightMemory  # noqa: E402
from mpqc.config import QuantizerConfig  # noqa: E402
from mpqc.ops.lookup import FUNCTIONS, ShiftedActivation, shifted_lower_bound  # noqa: E402
from mpqc.passes.freeze import freeze  # noqa: E402
from mpqc.passes.shift_activations import shift_activations  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402
from mpqc.reference import IntegerProgram  # noqa: E402

ACTS = [nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Mish(), nn.ELU(0.5), nn.Hardswish()]
SHIFTS = [0.17, 0.1701, 0.2785, 0.3089, 0.5, 0.375]  # minus each one's lower bound


class _MLP(nn.Module):
    """linear -> act -> linear -> SiLU (a function) -> unpadded 1x1 conv -> mean -> linear: both activations
    shiftable."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(12, 24), act, nn.Linear(24, 16)
        self.conv, self.head = nn.Conv1d(16, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        h = self.fc2(self.act(self.fc1(x))).transpose(1, 2)  # [N, 16, L]
        return self.head(self.conv(F.silu(h)).mean(2))


class _LeftAlone(nn.Module):
    """GELU into a linear and a residual add; SiLU into a padded conv; GELU into a 1x1 conv with padding; a linear
    reading a GELU's output twice (one module called twice)."""

    def __init__(self):
        super().__init__()
        self.fc, self.c3, self.c1 = nn.Linear(8, 8), nn.Conv1d(8, 8, 3, padding=1), nn.Conv1d(8, 8, 1, padding=1)
        self.shared = nn.Linear(8, 8)

    def forward(self, x):
        g = F.gelu(x)
        r = self.fc(g) + g
        s = self.c3(F.silu(r).transpose(1, 2))
        t = self.c1(F.gelu(s)).transpose(1, 2)
        return self.shared(F.gelu(t[:, :10])) + self.shared(t[:, :10])


def _inputs(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(6, 10, 12) * 2


@pytest.mark.parametrize("act", ACTS, ids=repr)
def test_shifted_graph_computes_what_it_computed_in_fp32(act):
    torch.manual_seed(0)
    x = _inputs()
    gm, _ = pipeline.trace(_MLP(act).eval(), (x,))
    with torch.no_grad():
        before = gm(x)
    gm = shift_activations(gm)
    shifted = [node for node in gm.graph.nodes
               if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ShiftedActivation)]
    assert len(shifted) == 2 and all(ops.is_nonnegative(gm, node) and not ops.keeps_zero(gm, node) for node in shifted)
    assert gm.fc2.input_shift == SHIFTS[ACTS.index(act)]
    assert gm.conv.input_shift == pytest.approx(0.2785) and not hasattr(gm.head, "input_shift")
    with torch.no_grad():
        after = gm(x)
        wide = torch.linspace(-30, 30, 200001)
        for node in shifted:  # c covers the function's minimum: nonnegative in fp32 too
            assert float(gm.get_submodule(node.target)(wide).min()) >= 0
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_lower_bounds_are_below_every_value():
    x = torch.linspace(-40, 40, 400001, dtype=torch.float64)
    for name, params in [("gelu", {}), ("gelu", {"approximate": "tanh"}), ("silu", {}), ("mish", {}),
                         ("hardswish", {}), ("elu", {"alpha": 0.5})]:
        bound = shifted_lower_bound(name, params)
        y = FUNCTIONS[name].evaluate(x, **params)
        assert bound <= float(y.min()) < bound + 1e-4, name  # below the minimum, and tight


def test_activations_with_other_readers_are_left_alone():
    x = torch.randn(2, 12, 8)
    gm, _ = pipeline.trace(_LeftAlone().eval(), (x,))
    code = gm.code
    assert shift_activations(gm).code == code
    assert not hasattr(gm.fc, "input_shift") and not hasattr(gm, "shifted_activations")


def _frozen(act: nn.Module, shift: bool, bits, seed: int = 0):
    x = _inputs(seed)
    gm, _ = pipeline.trace(_MLP(act).eval(), (x,))
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(shift_activations=shift), (x,))
    set_bits(gm, bits)
    return freeze(gm, WeightMemory(1e12)), x


def test_shifted_mlp_through_freeze_in_every_backend(tmp_path):
    """Reference within 1 LSB of fake-quant at every quantizer (the bias from the integer weight), TVM bit-exact,
    onnxruntime within the contract, at 3-bit weights (where ``c * (W - W_q).sum`` is many LSBs)."""
    rng = random.Random(0)
    gm, x = _frozen(nn.GELU(), True, lambda name: 3 if name.endswith(".weight") else rng.randint(5, 8))
    assert gm.act_quantizers.fc2.signed is False and gm.act_quantizers.conv.signed is False
    assert gm.act_quantizers.fc1_out.signed is True  # the lookup's input stays signed
    _inputs(0)
    original = _MLP(nn.GELU()).eval()  # the weights _frozen drew
    with torch.no_grad():  # the frozen layer is W_q (u - c) + b, its bias rounded to the accumulator step
        u = torch.rand(4, 24) * 3
        expected = F.linear(u - 0.17, gm.fc2.quantized_weight(), original.fc2.bias)
        step = gm.fc2.input_quantizer.scale * gm.fc2.weight_quantizer.scale
        assert bool(((gm.fc2(u) - expected).abs() <= step / 2 + 1e-5).all())
    program = IntegerProgram.from_graph(gm)
    lookups = [node for node in program.nodes if node.op == "lookup"]
    assert [(node.attrs["function"], node.attrs["signed"]) for node in lookups] == [("gelu", False), ("silu", False)]
    codes, fake = _fake_quant_codes(gm, x)
    env = program.run_all(x)
    flips = total = 0
    for name, fake_codes in codes.items():
        diff = (env[name].q - fake_codes).abs()
        assert int(diff.max()) <= 1, name
        flips, total = flips + int((diff > 0).sum()), total + diff.numel()
    assert flips <= 2e-3 * total
    ours = program.run(x)
    assert (ours - fake).abs().max() <= 0.02 * fake.abs().max()
    program.save(tmp_path)  # the shift is a table parameter like any other
    assert torch.equal(IntegerProgram.load(tmp_path).run(x), ours)

    pytest.importorskip("tvm")
    from mpqc.targets import tvm as mtvm
    from mpqc.targets.onnx import build_onnx
    from mpqc.targets.onnx_check import check_agreement, compare_with_reference

    assert torch.equal(mtvm.lower(program, input_shape=x.shape)(x), ours)
    onnx_model, _ = build_onnx(program, input_shapes=[tuple(x.shape)])
    check_agreement(compare_with_reference(program, onnx_model, x))


def test_the_shift_halves_the_gelu_output_step_at_8_bits():
    """W8A8: the GELU output's codes are unsigned with about half the step, and closer to fp32's GELU."""
    x = _inputs()
    model = _MLP(nn.GELU()).eval()  # the weights _frozen draws after the same inputs
    steps, errors = {}, {}
    with torch.no_grad():
        fp32 = model.act(model.fc1(x))
        for shift in (False, True):
            gm, _ = _frozen(nn.GELU(), shift, lambda name: 8)
            quantizer, seen = gm.act_quantizers.fc2, []
            hook = quantizer.register_forward_hook(lambda module, args, output: seen.append(output))
            gm(x)
            hook.remove()
            steps[shift] = float(quantizer.scale)
            errors[shift] = float((seen[0] - (0.17 if shift else 0.0) - fp32).pow(2).mean())
    assert 0.45 < steps[True] / steps[False] < 0.55, steps
    assert errors[True] < 0.8 * errors[False], errors
