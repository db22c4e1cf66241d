"""Arithmetic ops (mpqc/ops/arith.py, mpqc/ops/batchnorm.py) and passes/functional_layers.py: products of two
activations, scalar multiplication/division, subtraction, adding a constant, BatchNorm that cannot be folded, conv
and linear called functionally. Each model runs at random mixed 2-8 bits: reference vs TVM bit-exact at every
quantize node, reference vs onnxruntime within 1 LSB, reference vs the fake-quant graph."""
from __future__ import annotations

import collections
import operator
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import onnx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch import fx, nn  # noqa: E402

from conftest import mixed_bit_program, quantized_graph, randomize_batchnorm  # noqa: E402
from mpqc import ops, pipeline  # noqa: E402
from mpqc.errors import MpqcError, UnsupportedOpError  # noqa: E402
from mpqc.ops import IntNode, IntValue  # noqa: E402
from mpqc.passes.capture import capture  # noqa: E402
from mpqc.passes.fold_batchnorm import fold_batchnorm  # noqa: E402
from mpqc.passes.functional_layers import functional_layers  # noqa: E402
from mpqc.passes.insert_quantizers import ACT_QUANTIZERS  # noqa: E402
from mpqc.passes.to_integer_program import fuse_requantize, integer_values  # noqa: E402
from mpqc.reference import IntegerProgram  # noqa: E402

aten = torch.ops.aten


# --------------------------------------------------------------------------------------------- models
class Products(nn.Module):
    """x * gate with an int32-accumulator gate broadcast over H, W (squeeze-excitation with a ReLU gate); a product of
    two quantized values (ONNX's exact int32 path); a quantized value times a float (ReLU6)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.se = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.c3, self.c4, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1), nn.Linear(4, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))  # quantized (unsigned): it feeds c2
        b = self.c2(a)  # quantized (signed): it feeds c3
        c = self.c3(b)
        y = a * torch.relu(self.se(F.adaptive_avg_pool2d(a, 1)))
        p = torch.mul(b, a) + F.relu6(c).mul(a) - y
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.c4(p), 1), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-excitation ``a * sigmoid(fc2(relu(fc1(pool(a)))))`` (the sigmoid a lookup table, the fcs 1x1 convs),
    then hardswish written by hand, ``h * F.relu6(h + 3) / 6``."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c2, self.c3, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1), nn.Linear(4, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        y = a * torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(a, 1)))))
        h = self.c2(y)
        h = h * F.relu6(h + 3) / 6
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.c3(h), 1), 1))


class Scalars(nn.Module):
    """Scalar multiplication and division of integers (negative factors too) and of floats, differences, constants
    added and subtracted, hardswish written by hand; fused into a requantisation and (through a cat) not; torch.export's
    ATen forms when ``export`` (shape-dependent control flow)."""

    def __init__(self, export: bool = False):
        super().__init__()
        self.export = export
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.c4, self.fc = nn.Conv2d(16, 4, 1), nn.Linear(64, 5)

    def forward(self, x):
        if self.export and x.shape[-1] > 4:  # torch.fx cannot trace this: capture takes torch.export's path
            x = x + 0
        a = torch.relu(self.c1(x))
        s = -0.5 * a
        t = self.c2(a) / 6 - 2 * s
        u = t * F.relu6(t + 3) / 6
        v = self.c3(u)
        z = torch.cat([(1 - torch.relu(v)) * 0.25, v.sub(u) + 0.5], 1)
        return self.fc(torch.flatten(F.avg_pool2d(self.c4(z - 1), 2), 1))


class AllArith(nn.Module):
    """Every arithmetic op in one small net (``tests/test_onnx.py`` runs it too, for its converter coverage)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 4, 1)
        self.bn, self.fc = nn.BatchNorm2d(16), nn.Linear(64, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))  # quantized: it feeds c2
        b = self.c2(a)
        h = torch.cat([a * torch.relu(b) / 4, (1.5 - b) - a], 1)
        return self.fc(torch.flatten(F.avg_pool2d(self.c3(torch.relu(self.bn(h))), 2), 1))


class Functional(nn.Module):
    """Conv and linear called functionally on parameters and a buffer; a BatchNorm after a functional conv (folds)
    and one after a cat (stays); torch.export's ATen forms when ``export`` (shape-dependent control flow)."""

    def __init__(self, export: bool = False):
        super().__init__()
        self.export = export
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(8) * 0.1)
        self.register_buffer("w2", torch.randn(8, 4, 3, 3) * 0.3)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(16)
        self.w3 = nn.Parameter(torch.randn(4, 16, 1, 1) * 0.3)
        self.w4, self.b4 = nn.Parameter(torch.randn(5, 64) * 0.2), nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, x):
        if self.export and x.shape[-1] > 4:  # torch.fx cannot trace this: capture takes torch.export's path
            x = x * 1.0
        a = torch.relu(self.bn1(F.conv2d(x, self.w1, self.b1, 1, 1)))
        b = F.conv2d(a, self.w2, None, stride=1, padding=2, dilation=2, groups=2)
        h = torch.relu(self.bn2(torch.cat([a, b * 0.5], 1)))
        z = F.avg_pool2d(F.conv2d(h, self.w3), 2)
        return F.linear(torch.flatten(z, 1), self.w4, self.b4)


class Norm1d(nn.Module):
    """BatchNorm1d after a cat, on rank-3 (conv1d) and rank-2 (linear) values."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(8, 4, 1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 6), nn.Linear(64, 6), nn.Linear(12, 3)
        self.bn1, self.bn2 = nn.BatchNorm1d(8), nn.BatchNorm1d(12)

    def forward(self, x):
        f = torch.flatten(self.c3(torch.relu(self.bn1(torch.cat([self.c1(x), self.c2(x)], 1)))), 1)
        return self.fc3(torch.relu(self.bn2(torch.cat([torch.relu(self.fc1(f)), self.fc2(f)], 1))))


def tiny_densenet() -> nn.Module:
    """torchvision's DenseNet: pre-activation BatchNorm after every concatenation and pooling."""
    return torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=5)


class Transitions(nn.Module):
    """DenseNet's transitions: conv accumulators average pooled (2x2 stride 2, as DenseNet does; 3x3 stride 2 with
    padding counted), concatenated with a conv's and normalized (BN -> ReLU) before the next quantizer."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 3, 1)
        self.c3 = nn.Conv2d(6, 2, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.c4 = nn.Conv2d(9, 5, 1)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        f = torch.cat([F.avg_pool2d(self.c1(h), 2), F.avg_pool2d(self.c2(h), 3, 2, 1), self.c3(h)], 1)
        return self.c4(torch.relu(self.bn(f)))


MODELS = {
    "products": (Products, (2, 3, 8, 8)),
    "squeeze_excite": (SqueezeExcite, (2, 3, 8, 8)),
    "scalars": (Scalars, (2, 3, 8, 8)),
    "scalars_export": (lambda: Scalars(export=True), (2, 3, 8, 8)),
    "functional": (Functional, (2, 3, 8, 8)),
    "functional_export": (lambda: Functional(export=True), (2, 3, 8, 8)),
    "densenet": (tiny_densenet, (2, 3, 32, 32)),
    "norm1d": (Norm1d, (2, 2, 16)),
    "all_arith": (AllArith, (4, 3, 8, 8)),
}


def _program(name: str, seed: int = 2):
    return mixed_bit_program(*{**MODELS, "transitions": (Transitions, (2, 3, 8, 8))}[name], seed)


# --------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", list(MODELS))
def test_arithmetic_is_bit_exact_on_tvm(name):
    pytest.importorskip("tvm")
    from mpqc.targets import tvm as mtvm

    _, program, x = _program(name)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers)
    assert not lowered.inexact
    for inputs in (x, 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))):
        assert torch.equal(lowered(inputs), program.run(inputs))
        env, codes = program.run_all(inputs), lowered.exposed(inputs)
        for node in quantizers:
            assert torch.equal(torch.from_numpy(codes[node]).to(torch.int64), env[node].q), node


@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_agrees_on_arithmetic(name, tmp_path):
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import AGREEMENT_FLOOR, compare_with_reference, contract_violations

    _, program, x = _program(name)
    exported = export_onnx(program, tmp_path / f"{name}.onnx", input_shapes=[tuple(x.shape)])
    agreement = compare_with_reference(program, exported.path, 1.5 * torch.randn(x.shape, generator=torch.Generator()
                                                                                  .manual_seed(7)))
    assert contract_violations(agreement) == [], agreement
    assert agreement["overall"]["exact"] >= AGREEMENT_FLOOR, agreement["overall"]


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_agrees_with_fake_quant(name):
    gm, program, x = _program(name)
    codes = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op == "call_module" and n.target.startswith(ACT_QUANTIZERS + "."):
                codes[n.name] = torch.round(value / self.module.get_submodule(n.target).scale.abs()).to(torch.int64)
            return value

    with torch.no_grad():
        fake = Recorder(gm).run(x)
    env = program.run_all(x)
    diffs = torch.cat([(env[node].q - fake_codes).abs().reshape(-1) for node, fake_codes in codes.items()])
    assert int(diffs.max()) <= 1 and float((diffs > 0).float().mean()) < 2e-3
    ref = program.run(x)
    assert (ref - fake).abs().max() <= 0.05 * fake.abs().max()


def test_products_of_integers_are_exact_integers():
    _, program, x = _program("products")
    env, integer = program.run_all(x), integer_values(program.nodes)
    products = [node for node in program.nodes if node.op == "mul"]
    assert len(products) == 3
    for node in products:
        a, b = (env[name] for name in node.inputs)
        exact = isinstance(a, IntValue) and isinstance(b, IntValue)
        assert isinstance(env[node.name], IntValue) == exact == (node.name in integer), node.name
        if exact:
            assert torch.equal(env[node.name].q, a.q * b.q) and torch.equal(env[node.name].scale, a.scale * b.scale)
    assert any(node.name in integer for node in products)


def test_only_products_of_two_tensors_ask_for_codes():
    class Net(nn.Module):
        def forward(self, x, y):
            return (x * y) + (0.5 * x) + torch.mul(y, 2) + x / 3

    gm = fx.symbolic_trace(Net())
    nodes = {node.name: node for node in gm.graph.nodes}
    wanted = {name: ops.op_of(gm, node).quantized_operands(gm, node) for name, node in nodes.items()
              if node.op == "call_function" and node.target in (operator.mul, torch.mul, operator.truediv)}
    assert wanted == {"mul": [nodes["x"], nodes["y"]], "mul_1": [], "mul_2": [], "truediv": []}


def test_the_export_path_gives_the_same_program_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    exported = capture(Scalars(export=True).eval(), (x,))
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert {aten.mul.Tensor, aten.div.Tensor, aten.sub.Tensor, aten.rsub.Scalar, aten.add.Tensor} <= targets
    counts = {name: collections.Counter(node.op for node in _program(name)[1].nodes if node.op != "quantize")
              for name in ("scalars", "scalars_export")}
    counts["scalars"]["add_const"] += 1  # the export path's x + 0
    assert counts["scalars_export"] == counts["scalars"]


def test_scalar_factors_change_the_scale_of_integers():
    _, program, x = _program("scalars")
    env = program.run_all(x)
    scaled = [node for node in program.nodes if node.op == "scale" and isinstance(env[node.inputs[0]], IntValue)]
    assert {node.attrs["factor"] for node in scaled} >= {-0.5, 1 / 6}
    for node in scaled:
        source, value = env[node.inputs[0]], env[node.name]
        factor = node.attrs["factor"]
        assert torch.equal(value.q, source.q if factor > 0 else -source.q)
        assert torch.equal(value.scale, source.scale * abs(factor))


def test_unfoldable_batchnorm_stays_and_is_exact():
    """BatchNorm after a cat or a pool stays in the graph (fold_batchnorm leaves it) and becomes a per-channel affine
    fused into the requantisation that follows; the one after a functional conv folds."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = fold_batchnorm(functional_layers(capture(randomize_batchnorm(Functional()), (x,))))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and "bn" in n.target] == ["bn2"]
    dense = fold_batchnorm(capture(randomize_batchnorm(tiny_densenet()), (torch.randn(2, 3, 32, 32),)))
    kept = [n.target for n in dense.graph.nodes if n.op == "call_module"
            and isinstance(dense.get_submodule(n.target), nn.BatchNorm2d)]
    assert kept == ["features.denseblock1.denselayer1.norm1", "features.denseblock1.denselayer2.norm1",
                    "features.transition1.norm", "features.denseblock2.denselayer1.norm1",
                    "features.denseblock2.denselayer2.norm1", "features.norm5"]
    _, program, _ = _program("densenet")
    norms = [node for node in program.nodes if node.op == "batch_norm"]
    assert len(norms) == 6
    fused = {step for node in program.nodes if node.op == "quantize" for step in node.attrs["region"]["steps"]}
    assert {node.name for node in norms} <= fused
    bn = dense.get_submodule("features.norm5")
    norm = next(node for node in norms if node.attrs["module"] == "features.norm5")
    expected = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    torch.testing.assert_close(norm.tensors["multiplier"], expected.detach(), rtol=1e-12, atol=0)


def test_batchnorm_after_a_concatenation_of_convs_is_exact_on_onnxruntime(tmp_path):
    """DenseNet's BN -> ReLU after a concatenation of conv accumulators: the region is exported in units of s_out
    (targets/onnx_regions.py), the concatenated accumulators replayed exactly (ConvInteger, MaxPool, Concat), so
    onnxruntime reproduces every code, stepwise and end to end."""
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import compare_with_reference

    _, program, x = _program("densenet")
    exported = export_onnx(program, tmp_path / "densenet.onnx", input_shapes=[tuple(x.shape)])
    kinds = [node.op_type for node in onnx.load(exported.path).graph.node]
    assert kinds.count("ConvInteger") >= 3 and "Concat" in kinds
    overall = compare_with_reference(program, exported.path, 1.5 * torch.randn(x.shape, generator=torch.Generator()
                                                                                .manual_seed(7)))["overall"]
    assert overall["exact"] == 1.0 and overall["end_to_end_exact"] == 1.0, overall


def test_average_pools_of_conv_accumulators_are_exact_on_onnxruntime(tmp_path):
    """DenseNet's transitions: a BatchNorm region whose leaf concatenates average pools of conv accumulators is
    written in units, each pool replayed as exact int32 window sums (strided Slices added, a Pad for the padded one)
    of the ConvInteger accumulators, so onnxruntime reproduces every code; no AveragePool of dequantized values."""
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import compare_with_reference

    _, program, x = _program("transitions")
    (region,) = [node.attrs["region"] for node in program.nodes if node.op == "quantize"
                 and any(program.node(step).op == "batch_norm" for step in node.attrs["region"]["steps"])]
    assert [program.node(leaf).op for leaf in region["leaves"]] == ["cat"]
    exported = export_onnx(program, tmp_path / "transitions.onnx", input_shapes=[tuple(x.shape)])
    kinds = collections.Counter(node.op_type for node in onnx.load(exported.path).graph.node)
    assert kinds["AveragePool"] == 0 and kinds["Slice"] == 4 + 9 and kinds["Pad"] == 1, kinds
    assert kinds["ConvInteger"] >= 3, kinds
    for seed in (7, 8):
        inputs = 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        overall = compare_with_reference(program, exported.path, inputs)["overall"]
        assert overall["exact"] == 1.0 and overall["end_to_end_exact"] == 1.0, overall


# --------------------------------------------------------------------------------------------- regions
Q = {"bits": 8, "signed": True, "scale": 0.1}
CONV = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "weight_bits": 4, "module": "c"}


def test_scale_keeps_integers_and_float_arithmetic_fuses():
    before = [IntNode("x", "input", []), IntNode("q0", "quantize", ["x"], dict(Q)),
              IntNode("c", "conv2d", ["q0"], dict(CONV)), IntNode("s", "scale", ["c"], {"factor": 0.5}),
              IntNode("p", "mul", ["q0", "s"]), IntNode("k", "clamp", ["c"], {"min": 0.0, "max": 6.0}),
              IntNode("f", "mul", ["q0", "k"]), IntNode("fs", "scale", ["f"], {"factor": -2.0}),
              IntNode("d", "sub", ["p", "fs"]), IntNode("a", "add_const", ["d"], {"constant": 3.0, "negate": True}),
              IntNode("q1", "quantize", ["a"], dict(Q))]
    assert integer_values(before) == {"q0", "c", "s", "p", "q1"}
    regions = {node.name: node.attrs["region"] for node in fuse_requantize(before) if node.op == "quantize"}
    assert regions["q1"] == {"steps": ["fs", "d", "a"], "leaves": ["p", "f"]}


def _hand_built_program() -> IntegerProgram:
    """Operands the models above (with quantizers on every product input) do not give: float and broadcast
    products (one side smaller, both sides), a negative scale of int8 codes and of an int32 accumulator, a
    difference of a rank-4 accumulator and a rank-2 value, BatchNorm, a constant and a scale outside a region, and
    every float step fused into one region."""
    generator = torch.Generator().manual_seed(3)
    conv = {"weight": torch.randint(-7, 8, (4, 4, 1, 1), generator=generator, dtype=torch.int8),
            "weight_scale": torch.rand(4, generator=generator) * 0.1 + 0.01,
            "bias": torch.randint(-50, 50, (4,), generator=generator, dtype=torch.int32)}
    bn = {"multiplier": torch.rand(4, generator=generator, dtype=torch.float64) + 0.5,
          "shift": torch.randn(4, generator=generator, dtype=torch.float64)}

    def node(name, op, inputs, attrs=None, tensors=None):
        return IntNode(name, op, inputs, dict(attrs or {}), dict(tensors or {}))

    clamp = {"min": 0.0, "max": 0.3}
    nodes = [
        node("x", "input", []), node("q0", "quantize", ["x"], {"bits": 6, "signed": True, "scale": 0.05}),
        node("c", "conv2d", ["q0"], {**CONV, "weight_bits": 4}, conv),
        node("k", "clamp", ["q0"], clamp), node("g", "global_avg_pool", ["q0"]),
        node("f", "mul", ["k", "g"]), node("h", "mul", ["g", "k"]),
        node("r2", "sum", ["q0"], {"dims": [2], "keepdim": True}),
        node("r3", "sum", ["q0"], {"dims": [3], "keepdim": True}),
        node("m", "mul", ["r2", "r3"]), node("k2", "clamp", ["r2"], clamp), node("k3", "clamp", ["r3"], clamp),
        node("e", "mul", ["k2", "k3"]), node("s", "scale", ["c"], {"factor": -0.25}),
        node("u", "scale", ["q0"], {"factor": -2.0}), node("r", "sum", ["q0"], {"dims": [1, 2], "keepdim": False}),
        node("d", "sub", ["c", "r"]), node("n", "batch_norm", ["k"], {"module": "bn"}, bn),
        node("a", "add_const", ["g"], {"constant": 1.5, "negate": False}), node("p", "mul", ["a", "k"]),
        node("fs", "scale", ["k"], {"factor": 0.5}),
        node("cat", "cat", ["f", "h", "m", "e", "s", "u", "d", "n", "p", "fs"], {"dim": 1}),
        node("q1", "quantize", ["cat"], {"bits": 8, "signed": True, "scale": 1.0}),
        node("w", "scale", ["k"], {"factor": 3.0}), node("v", "add_const", ["w"], {"constant": -0.1, "negate": True}),
        node("b2", "batch_norm", ["v"], {"module": "bn2"}, bn), node("q2", "quantize", ["b2"],
                                                                       {"bits": 5, "signed": True, "scale": 0.05}),
    ]
    for name in ("q0", "q1", "q2"):
        next(n for n in nodes if n.name == name).attrs["module"] = name
    return IntegerProgram(nodes, ["q1", "q2", "s"])


def test_float_and_broadcast_operands_on_a_hand_built_program(tmp_path):
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import compare_with_reference, contract_violations

    program, x = _hand_built_program(), torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    cat = program.run_all(x)["cat"]
    program.node("q1").attrs["scale"] = float(cat.abs().max()) / 100  # a few values clamp
    assert program.node("q2").attrs["region"] == {"steps": ["k", "w", "v", "b2"], "leaves": ["q0"]}
    # a cat of float and integer values is a step of the region (data movement fuses), its float inputs too
    assert program.node("q1").attrs["region"] == {"steps": ["k", "d", "n", "fs", "cat"],
                                                  "leaves": ["q0", "c", "f", "h", "m", "e", "s", "u", "r", "p"]}
    env = program.run_all(x)
    assert {name for name in ("m", "s", "u") if isinstance(env[name], IntValue)} == {"m", "s", "u"}
    assert torch.equal(env["u"].q, -env["q0"].q) and torch.equal(env["s"].q, -env["c"].q)

    exported = export_onnx(program, tmp_path / "hand.onnx", input_shapes=[tuple(x.shape)])
    assert contract_violations(compare_with_reference(program, exported.path, x)) == []
    pytest.importorskip("tvm")
    from mpqc.targets import tvm as mtvm

    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=["q1", "q2"])
    for ours, ref in zip(lowered(x), program.run(x)):
        assert torch.equal(ours, ref)
    codes = lowered.exposed(x)
    for name in ("q1", "q2"):
        assert torch.equal(torch.from_numpy(codes[name]).to(torch.int64), env[name].q), name


# --------------------------------------------------------------------------------------------- functional layers
def test_functional_layers_become_modules_with_the_same_numerics():
    torch.manual_seed(0)
    model, x = Functional().eval(), torch.randn(2, 3, 8, 8)
    before = capture(model, (x,))
    expected = before(x)
    assert {n.target for n in before.graph.nodes if n.op == "call_function"} >= {torch.conv2d, F.linear}
    after = functional_layers(before)
    calls = {n.target: type(after.get_submodule(n.target)) for n in after.graph.nodes if n.op == "call_module"}
    assert calls == {"conv2d": nn.Conv2d, "bn1": nn.BatchNorm2d, "conv2d_1": nn.Conv2d, "bn2": nn.BatchNorm2d,
                     "conv2d_2": nn.Conv2d, "linear": nn.Linear}
    assert not any(n.op == "get_attr" for n in after.graph.nodes)
    assert not any(n.op == "call_function" and n.target in (torch.conv2d, F.linear) for n in after.graph.nodes)
    dilated = after.get_submodule("conv2d_1")
    assert (dilated.padding, dilated.dilation, dilated.groups, dilated.bias) == ((2, 2), (2, 2), 2, None)
    assert not dilated.weight.requires_grad  # it was a buffer
    assert after.get_submodule("conv2d").weight.requires_grad
    assert not hasattr(after, "w1") and not hasattr(after, "w2")  # moved into the modules
    assert torch.equal(after(x), expected)


def test_functional_layers_on_the_export_path():
    torch.manual_seed(0)
    model, x = Functional(export=True).eval(), torch.randn(2, 3, 8, 8)
    before = capture(model, (x,))
    expected = before(x)
    targets = {n.target for n in before.graph.nodes if n.op == "call_function"}
    assert {aten.conv2d.default, aten.linear.default, aten.mul.Tensor} <= targets
    after = functional_layers(before)
    layers = [n.target for n in after.graph.nodes if n.op == "call_module"
              and isinstance(after.get_submodule(n.target), (nn.Conv2d, nn.Linear))]
    assert len(layers) == 4
    assert torch.equal(after(x), expected)
    assert pipeline.STAGES[:4] == ("capture", "canonicalize", "functional_layers", "fold_batchnorm")


def test_aten_convolution_becomes_a_conv():
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    gm.register_parameter("w", nn.Parameter(torch.randn(4, 2, 3)))
    graph = gm.graph
    x, w = graph.placeholder("x"), graph.get_attr("w")
    y = graph.call_function(aten.convolution.default, (x, w, None, [2], [1], [1], False, [0], 1))
    graph.output(y)
    gm.recompile()
    inputs = torch.randn(2, 2, 9)
    expected = gm(inputs)
    functional_layers(gm)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    conv = gm.get_submodule(node.target)
    assert isinstance(conv, nn.Conv1d) and (conv.stride, conv.padding) == ((2,), (1,))
    assert torch.equal(gm(inputs), expected)


# --------------------------------------------------------------------------------------------- clear errors
class _ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.w * 2)


class _SharedWeight(_ComputedWeight):
    def forward(self, x):
        return F.conv2d(F.conv2d(x, self.w, padding=1)[:, :3], self.w)


def test_functional_layers_refuse_weights_computed_at_run_time_or_shared():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(MpqcError, match=r"conv2d.*weight is computed at run time.*not a parameter or buffer"):
        pipeline.trace(_ComputedWeight(), (x,))
    with pytest.raises(MpqcError, match=r"weight 'w' is shared with another layer call"):
        pipeline.trace(_SharedWeight(), (x,))


class _Refused(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.register_buffer("gain", torch.ones(1, 4, 1, 1))

    def forward(self, x):
        y = self.c(x)
        return (y * self.gain) + y / torch.relu(y)


def test_tensor_divisors_are_refused_clearly_and_constant_factors_get_no_codes():
    x = torch.randn(1, 3, 8, 8)
    gm, _ = quantized_graph(_Refused(), x)
    with pytest.raises(UnsupportedOpError) as error:
        IntegerProgram.check_supported(gm)
    lines = str(error.value).splitlines()[1:]
    assert len(lines) == 1 and "truediv" in lines[0] and "division by a tensor (only by a Python number)" in lines[0]
    gain = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "gain")
    assert [u.target for u in gain.users] == [operator.mul]  # a float operand of the product, not quantized


def test_a_product_beyond_int32_is_refused_with_the_node_name():
    """Two int32 accumulators multiplied (a program insert_quantizers would not make: it quantizes the factors)."""
    conv = {"weight": torch.full((4, 4, 1, 1), 7, dtype=torch.int8), "weight_scale": torch.full((4,), 0.01),
            "bias": torch.full((4,), 100_000, dtype=torch.int32)}
    program = IntegerProgram([IntNode("x", "input", []),
                              IntNode("q", "quantize", ["x"], {"bits": 8, "signed": True, "scale": 0.1}),
                              IntNode("c", "conv2d", ["q"], dict(CONV), conv), IntNode("p", "mul", ["c", "c"])], ["p"])
    with pytest.raises(MpqcError, match=r"node 'p': the product of two integer values reached \d+, beyond the "
                                         r"int32 range"):
        program.run(torch.randn(1, 4, 2, 2))


def test_batchnorm_in_training_mode_is_refused():
    gm, _ = quantized_graph(tiny_densenet(), torch.randn(2, 3, 32, 32))
    gm.get_submodule("features.norm5").train()
    with pytest.raises(UnsupportedOpError, match=r"BatchNorm 'features.norm5' in training mode"):
        IntegerProgram.check_supported(gm)
