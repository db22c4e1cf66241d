"""The TVM target (``mpqc.targets.tvm``): bit for bit equal to the integer reference, artifacts that run with the TVM
runtime alone, CUDA code that compiles, and the arithmetic traps it avoids (FMA contraction, rounding, sum order)."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM's pool starts one thread here otherwise (TVM_NOTES trap 2)

import json  # noqa: E402
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import example_models, freeze_at_random_bits, quantized_graph, randomize_batchnorm
from mpqc.errors import ConfigError, UnsupportedOpError
from mpqc.reference import IntegerProgram, IntNode, IntValue

tvm = pytest.importorskip("tvm")
from mpqc.targets import tvm as mtvm  # noqa: E402

MODELS = {
    "resnet20": (lambda: example_models.resnet20(), (4, 1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64)),
}
FMA = re.compile(r"\bvfn?m(?:add|sub)\w*")


def _program(name: str, seed: int = 1) -> tuple[IntegerProgram, torch.Tensor]:
    torch.manual_seed(0)
    build, shape = MODELS[name]
    x = torch.randn(shape)
    gm, _ = quantized_graph(randomize_batchnorm(build()), x)
    gm, chosen = freeze_at_random_bits(gm, seed=seed)
    assert len(set(chosen.values())) > 2, "the test needs really mixed bit-widths"
    return IntegerProgram.from_graph(gm), x


def _assert_bit_exact(program: IntegerProgram, lowered: mtvm.LoweredModule, x: torch.Tensor) -> None:
    assert torch.equal(lowered(x), program.run(x))
    env = program.run_all(x)
    codes = lowered.exposed(x)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    assert sorted(codes) == sorted(quantizers)
    for name in quantizers:
        ref: IntValue = env[name]
        ours = torch.from_numpy(codes[name])
        assert ours.dtype in (torch.int8, torch.uint8)
        assert torch.equal(ours.to(torch.int64), ref.q), f"{name}: 8-bit codes differ from the reference"


@pytest.fixture(scope="module")
def resnet20():
    program, x = _program("resnet20")
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    return program, x, mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers)


# --------------------------------------------------------------------------------------------- bit-exact
def test_resnet20_is_bit_exact_with_the_reference(resnet20):
    program, x, lowered = resnet20
    _assert_bit_exact(program, lowered, x)
    # another input, with values far outside the calibration range (clamps saturate)
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * 4
    assert torch.equal(lowered(x2), program.run(x2))


def test_no_fused_multiply_add_in_the_cpu_code(resnet20):
    """TVM's LLVM backend contracts a*b + c into one FMA (one rounding) unless the product is fenced. The whole
    module, residual requantisations included, must contain no FMA instruction (its conv sums are integer)."""
    _, _, lowered = resnet20
    asm = lowered.source("asm")
    assert "vpdpbusd" in asm or "vpmaddwd" in asm or "vpmulld" in asm  # integer dot products are there
    assert not FMA.findall(asm)


@pytest.mark.parametrize("name", [
    "mobilenet_v2",  # depthwise convs, ReLU6 clamps, residual adds between quantizers, fp32 global mean
    "resnet18",  # max pooling, strided 1x1 shortcuts, the 8-bit quantizer before the global pool
])
def test_torchvision_models_are_bit_exact(name):
    program, x = _program(name)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers)
    assert not lowered.inexact
    _assert_bit_exact(program, lowered, x)


class _LessCommonOps(torch.nn.Module):
    """Integer avg-pool (a sum), grouped conv, ReLU6, cat of dequantized values, ceil-mode max pool on floats."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.bn, self.relu, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2)
        self.c2, self.relu6 = nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU6()
        self.mp, self.c3, self.fc = nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(16, 4, 1), nn.Linear(100, 5)

    def forward(self, x):
        a = self.pool(self.relu(self.bn(self.c1(x))))
        b = self.relu6(self.c2(a))
        return self.fc(torch.flatten(self.c3(self.mp(torch.cat([a, b], 1))), 1))


class _Conv1d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.relu, self.fc = torch.nn.Conv1d(2, 6, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Linear(48, 3)

    def forward(self, x):
        return self.fc(self.relu(self.c(x)).flatten(1))


@pytest.mark.parametrize("model, shape", [(_LessCommonOps, (2, 3, 16, 16)), (_Conv1d, (2, 2, 16))],
                         ids=["pools-cat-groups", "conv1d"])
def test_less_common_ops_are_bit_exact(model, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    gm, _ = quantized_graph(randomize_batchnorm(model()), x)
    gm, _ = freeze_at_random_bits(gm, seed=2)
    program = IntegerProgram.from_graph(gm)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    _assert_bit_exact(program, mtvm.lower(program, input_shape=shape, expose=quantizers), x)


# --------------------------------------------------------------------------------------------- the traps
def test_exact_multiply_is_not_contracted_into_fma():
    """a*M1 + b*M2 over vectors, inlined and vectorized: a plain product is fused into FMAs by TVM's LLVM backend
    (results change); the fenced product of ``_exact_mul_te`` is not (equal to NumPy's fp32 arithmetic)."""
    from tvm import te

    n = 4096
    a, m1, b, m2 = (te.placeholder((n,), "float32", name=name) for name in ("a", "m1", "b", "m2"))
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    expected = values[0] * values[1] + values[2] * values[3]

    def build(mul):
        out = te.compute((n,), lambda i: mul(a, m1)[i] + mul(b, m2)[i], name="out")
        sch = tvm.s_tir.Schedule(te.create_prim_func([a, m1, b, m2, out]))
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint != "out":
                sch.compute_inline(block)
        _, inner = sch.split(sch.get_loops(sch.get_sblock("out"))[0], [None, 16])
        sch.vectorize(inner)
        lib = tvm.compile(sch.mod, target=tvm.target.Target(mtvm.host_target()))
        result = tvm.runtime.tensor(np.zeros(n, np.float32))
        lib["main"](*[tvm.runtime.tensor(v) for v in values], result)
        return result.numpy(), lib.mod.inspect_source("asm")

    fenced, fenced_asm = build(lambda x, y: mtvm._exact_mul_te(x, y, mode="llvm"))
    plain, plain_asm = build(lambda x, y: te.compute(x.shape, lambda i: x[i] * y[i], name="mul"))
    assert np.array_equal(fenced, expected) and not FMA.findall(fenced_asm)
    if FMA.findall(plain_asm):  # the trap exists on this machine (FMA hardware): it changes results
        assert (plain != expected).mean() > 0.05


def test_relax_round_is_half_to_even():
    from tvm import relax
    from tvm.relax import op as R

    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -127.5, 0.49999997, 2.5000002], np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(ties.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(R.astype(R.round(x), "int32"))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(mtvm.host_target())), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(ties)).numpy()
    assert np.array_equal(got, torch.round(torch.from_numpy(ties)).to(torch.int32).numpy())


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (4, 4), (7, 7), (8, 8), (14, 14), (20, 20), (31, 32)])
def test_torch_sum_order_reproduces_pytorch_mean(hw):
    """PyTorch's fp32 mean is not a sequential sum; ``torch_sum_order`` reproduces its order exactly."""
    x = (torch.randn((3, 5, *hw), generator=torch.Generator().manual_seed(hw[0])) * 7).float()
    rows = x.reshape(15, -1).numpy()
    ours = np.array([mtvm.torch_sum_order(list(row), lambda p, q: np.float32(p + q)) for row in rows], np.float32)
    ours = ours / np.float32(hw[0] * hw[1])
    assert np.array_equal(ours, F.adaptive_avg_pool2d(x, 1).reshape(-1).numpy())


# --------------------------------------------------------------------------------------------- artifacts
def test_artifact_runs_with_tvm_and_numpy_only(resnet20, tmp_path):
    program, x, _ = resnet20
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), out=tmp_path / "artifact")
    files = {p.name for p in (tmp_path / "artifact").iterdir()}
    assert {"model.so", "params.bin", "model.json", "loader.py"} <= files
    meta = json.loads((tmp_path / "artifact" / "model.json").read_text())
    assert meta["format"] == mtvm.ARTIFACT_FORMAT and meta["inputs"][0]["shape"] == list(x.shape)
    assert meta["inputs"][0]["quantizers"][0]["bits"] <= 8
    assert meta["layers"] == {m: {"weight_bits": w, "activation_bits": a} for m, (w, a) in program.layer_bits().items()}
    np.save(tmp_path / "x.npy", x.numpy())
    # A deployment machine has no torch and no mpqc. Here both are installed, and tvm_ffi 0.1.14 imports torch
    # eagerly when it can (a workaround in tvm_ffi/__init__.py, skipped on ImportError), so the child process
    # makes them unimportable, as on such a machine, and checks that nothing loaded them anyway.
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'mpqc', 'torchvision'):
            raise ImportError('not installed on a deployment machine: ' + name)
sys.meta_path.insert(0, NoTorch())
import numpy as np
sys.path.insert(0, {str(tmp_path / 'artifact')!r})
from loader import load
run = load({str(tmp_path / 'artifact')!r})
np.save({str(tmp_path / 'y.npy')!r}, run(np.load({str(tmp_path / 'x.npy')!r})))
leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mpqc', 'torchvision'))
assert not leaked, leaked
"""
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "y.npy")), program.run(x))
    assert torch.equal(lowered(x), program.run(x))


def test_unsupported_nodes_are_all_listed():
    nodes = [
        IntNode("x", "input", []),
        IntNode("q", "quantize", ["x"], {"bits": 12, "signed": True, "scale": 0.1, "module": "q"}),
        IntNode("soft", "softmax", ["q"]),
        IntNode("pool", "avg_pool2d", ["x"], {"kernel": [2, 2], "stride": [2, 2], "padding": [1, 1],
                                               "dilation": [1, 1], "ceil_mode": False}),
        IntNode("relu", "relu", ["x"]),
    ]
    with pytest.raises(UnsupportedOpError) as error:
        mtvm.lower(IntegerProgram(nodes, ["relu"]), input_shape=(1, 1, 4, 4))
    message = str(error.value)
    assert "3 node(s)" in message
    assert all(name in message for name in ("q (quantize)", "soft (softmax)", "pool (avg_pool2d)"))
    assert "relu (relu)" not in message


def test_input_shape_is_required_for_a_bare_program(resnet20):
    with pytest.raises(ConfigError, match="input_shape"):
        mtvm.lower(resnet20[0])


def test_host_target_comes_from_cpu_flags(monkeypatch):
    monkeypatch.setattr(mtvm, "_cpu_flags", lambda: {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c", "sse4_2",
                                                     "popcnt", "ssse3", "avx_vnni"})
    target = mtvm.host_target()
    assert target["mcpu"] == "x86-64-v3" and target["mattr"] == ["+avxvnni"]
    monkeypatch.setattr(mtvm, "_cpu_flags", lambda: set())
    assert "mcpu" not in mtvm.host_target()
    monkeypatch.undo()
    flags = mtvm._cpu_flags()
    if "avx512_vnni" in flags:
        assert "+avx512vnni" in mtvm.host_target()["mattr"]


# --------------------------------------------------------------------------------------------- tuning
def _small_cnn() -> tuple[IntegerProgram, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm, _ = quantized_graph(example_models.small_cnn(), x)
    gm, _ = freeze_at_random_bits(gm, seed=3)
    return IntegerProgram.from_graph(gm), x


def test_tuning_arguments_are_checked(tmp_path):
    program, x = _small_cnn()
    with pytest.raises(ConfigError, match="tuning_db"):
        mtvm.lower(program, input_shape=tuple(x.shape), trials=4)
    with pytest.raises(ConfigError, match="llvm only"):
        mtvm.lower(program, input_shape=tuple(x.shape), target="cuda", tuning_db=tmp_path)
    # an empty database applies nothing: every function gets the default schedule, still bit-exact
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), tuning_db=tmp_path / "db")
    assert lowered.schedules["from_database"] == 0 and lowered.schedules["default_rule"] > 0
    assert torch.equal(lowered(x), program.run(x))


@pytest.mark.slow  # MetaSchedule: minutes on 2 shared cores, even for 8 trials
def test_tuned_schedules_are_bit_exact_and_reused(tmp_path):
    program, x = _small_cnn()
    db = tmp_path / "db"
    tuned = mtvm.lower(program, input_shape=tuple(x.shape), trials=8, tuning_db=db)
    assert (db / "database_tuning_record.json").stat().st_size > 0
    assert tuned.schedules["from_database"] > 0
    assert torch.equal(tuned(x), program.run(x))
    reused = mtvm.lower(program, input_shape=tuple(x.shape), tuning_db=db)  # no trials: the records are reused
    assert reused.schedules["from_database"] == tuned.schedules["from_database"]
    assert reused.build_seconds < tuned.build_seconds / 5
    assert torch.equal(reused(x), program.run(x))


# --------------------------------------------------------------------------------------------- cuda
def _cuda_codegen_available() -> bool:
    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        return False
    from tvm.support import nvcc

    try:
        return bool(nvcc.find_cuda_path())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cuda_codegen_available(), reason="this TVM build has no CUDA codegen or no CUDA toolkit")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_compiles_with_integer_accumulation(resnet20, arch):
    program, x, _ = resnet20
    lowered = mtvm.lower(program, target=f"cuda:{arch}", input_shape=tuple(x.shape))
    assert lowered.kind == "cuda" and arch in str(lowered.target)
    source = lowered.source()
    assert re.search(r"\bint \w*conv2d\w*local\w*\[", source), "conv accumulators are int32 registers"
    assert re.search(r"signed char\* __restrict__ \w*weight", source), "weights are read as int8"
    assert "__fmul_rn" in source and "nearbyintf" in source  # uncontracted products, round half to even
    with pytest.raises(Exception, match="cannot run"):
        lowered(x)


# --------------------------------------------------------------------------------------------- cli
def test_cli_lower_writes_a_checked_artifact(tmp_path, capsys):
    from mpqc.cli import main
    from mpqc.report import REPORT_FORMAT

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm, _ = quantized_graph(example_models.small_cnn(), x)
    gm, _ = freeze_at_random_bits(gm, seed=3)
    run_dir = tmp_path / "run"
    IntegerProgram.from_graph(gm).save(run_dir)
    (run_dir / "report.json").write_text(json.dumps({"format": REPORT_FORMAT, "layers": []}))
    out = tmp_path / "artifact"
    assert main(["lower", str(run_dir), "--target", "llvm", "--out", str(out), "--input-shape", "1,1,8,8"]) == 0
    printed = capsys.readouterr().out
    assert "bit for bit" in printed and (out / "model.so").is_file()
    assert main(["lower", str(run_dir), "--out", str(out)]) == 2  # no input shape anywhere: one-line error
    assert "input" in capsys.readouterr().err
