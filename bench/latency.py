"""Latency of mpqc's TVM target (VNNI int8 kernels, tuned register tiles) against PyTorch fp32 and PyTorch int8.

    OMP_WAIT_POLICY=PASSIVE TVM_NUM_THREADS=2 python3 bench/latency.py          # all cases -> results/latency.json
    TVM_NUM_THREADS=2 python3 bench/latency.py --cases resnet20:1 --no-tvm-fp32 --json /tmp/r20.json

Cases (``--cases MODEL:BATCH ...``): torchvision ResNet-18 at 224x224 (batch 1 and 8) and the Fashion-MNIST ResNet-20
(``examples/models.py``, 1x28x28, batch 1 and 64) by default; also ``mobilenet_v2``, ``mobilenet_v3_small``
(224x224) and ``mobilenet_se`` (the MobileNetV3-style Fashion-MNIST net: hardswish, squeeze-excitation), each frozen at random mixed 2-8 bits (seeded; random weights, as
latency does not depend on their values). For each case, median (and min) latency over ``--repeat`` runs after a
warm-up, every engine on the same number of threads (``TVM_NUM_THREADS``, default 2; ``torch.set_num_threads``),
each engine in a fresh process of its own, one after the other (TVM's spinning worker threads, PyTorch's OpenMP
pool and inductor's compile workers never share a process):

* ``mpqc_tvm``: ``mpqc.targets.tvm.lower`` on this host's target, with the tuning database ``--tuning-db``
  (default ``bench/tuning``: the VNNI register tiles measured per convolution geometry, ``vnni_tiles.json``;
  the first run measures missing geometries, about 15 s for ResNet-18), checked bit-exact against the reference;
* ``torch_fp32``: PyTorch eager fp32 (``torch.no_grad``);
* ``torch_int8_fx``: ``torch.ao.quantization`` FX graph mode, ``get_default_qconfig_mapping("x86")``, x86 engine
  (8-bit activations and weights everywhere); on a CPU with AMX its convolutions run on AMX tiles (oneDNN);
* ``torch_int8_fx_vnni`` (CPUs with AMX only): the same with oneDNN held to AVX-512 VNNI (``ONEDNN_MAX_CPU_ISA``),
  PyTorch int8 on the ISA of mpqc's best kernel;
* ``torch_int8_pt2e``: PT2E ``X86InductorQuantizer`` + ``torch.compile`` (inductor, ``freezing=True``), when the
  ``torchao`` package is importable (PT2E moved there from ``torch.ao``; not an mpqc dependency);
* ``tvm_fp32_untuned``: the fp32 model through ``relax.frontend.torch.from_exported_program`` and TVM's default
  CPU pipeline, no schedules (``--no-tvm-fp32`` skips it; it is skipped for batches above 1 of ResNet-18, where
  one run takes tens of seconds).

Reported per case: latencies, ratios to mpqc_tvm, the int8 GOP/s of the whole network (2 x MACs / latency) and of
its convolution layers (the kernel functions, fused requantisation included, timed one by one with the VM's
instrument hook, minimum over ``--repeat`` runs), and their fraction of the kernel ISA's peak
(:data:`OPS_PER_CYCLE` int8 ops per cycle per core x threads x clock: AMX 2048, one 16x64x16 ``tdpbusd`` per 16
cycles; AVX-512 VNNI 256, two 512-bit ``vpdpbusd`` per cycle; AVX-VNNI 128, two 256-bit ones; AVX2 64). The clock is measured with a dependent chain of integer adds
(one per cycle) compiled with the C compiler when there is one (``/proc/cpuinfo`` MHz otherwise; both are
recorded), as is one core's measured throughput of the kernel ISA's multiply (:data:`PROBES`; only where
/proc/cpuinfo shows the ISA's flags: the probe never runs an instruction the CPU lacks). ``--isa`` forces the
kernels (``avx2`` or ``avxvnni`` on an AVX-512 host: built without AVX-512); one the CPU lacks is refused. The load
average before and after each case is recorded: other processes on a shared machine make every number here slower and
noisier, and favour TVM, whose thread pool spins between parallel regions while PyTorch's OpenMP threads sleep under
``OMP_WAIT_POLICY=PASSIVE`` (set ``OMP_WAIT_POLICY=ACTIVE`` on a quiet machine for the fair comparison: it applies to
the PyTorch engines, the TVM engines' processes always get ``PASSIVE``, or torch's spinning OpenMP threads would
compete with TVM's; the environment is recorded). ``--rounds N`` measures each case N times, every engine once per
round, and reports the round with the median ratio (every round kept under ``rounds``): on a VM whose timings move
by a third between minutes, one round's ratio is one draw.
Delete ``bench/tuning`` to re-measure the register tiles on another machine.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "2")  # before TVM's runtime starts (TVM_NOTES trap 2)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from mpqc import pipeline  # noqa: E402
from mpqc.budgets import WeightMemory  # noqa: E402
from mpqc.config import QuantizerConfig  # noqa: E402
from mpqc.cpu import ISA_CHOICES, cpu_flags  # noqa: E402
from mpqc.passes.freeze import freeze  # noqa: E402
from mpqc.passes.insert_quantizers import searched_quantizers  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402
from mpqc.reference import IntegerProgram  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VNNI_OPS_PER_CYCLE = 256  # per core: two 512-bit vpdpbusd (64 u8 x s8 products each) per cycle
#: int8 ops per cycle per core of each kernel ISA (targets/tvm/kernels/registry.py): AVX-512 VNNI two 512-bit vpdpbusd;
#: AVX-VNNI two 256-bit {vex} vpdpbusd (32 products each) per cycle: 128 (LLVM's scheduling model, `llvm-mca-14
#: -mcpu=alderlake` and sapphirerapids: reciprocal throughput 0.5 cycles, latency 5; the probe on a Xeon with AVX-VNNI,
#: family 6 model 207, ran 1.56 per cycle, 100 ops: ``latency_xeon_avxvnni.json``); AVX2 with int32 accumulation two 256-bit vpmaddubsw (32 products) whose vpmaddwd/vpaddd
#: share the ports: 32 MACs; "generic" (TVM's own operators) is held to the AVX2 figure.
#: AMX: one ``tdpbusd`` multiplies a 16x64 u8 tile by a 64x16 s8 one (16,384 MACs) every 16 cycles (Intel's
#: optimization manual: 1024 int8 MACs per cycle per core), 2048 ops; the layers AMX does not take run on AVX-512 VNNI.
OPS_PER_CYCLE = {"amx": 2048, "avx512vnni": VNNI_OPS_PER_CYCLE, "avxvnni": 128, "avx2": 64, "generic": 64}


def _examples():
    spec = importlib.util.spec_from_file_location("mpqc_bench_models", ROOT / "examples" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODELS = {
    "resnet20": (lambda: _examples().resnet20(num_classes=10, in_channels=1), (1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=1000), (3, 224, 224)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=1000), (3, 224, 224)),
    # the MobileNetV3-style Fashion-MNIST net (hardswish lookup tables, squeeze-excitation products, depthwise)
    "mobilenet_se": (lambda: _examples().mobilenet_se(num_classes=10, in_channels=1), (1, 28, 28)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=1000), (3, 224, 224)),
}
DEFAULT_CASES = ["resnet18:1", "resnet18:8", "resnet20:1", "resnet20:64"]


# --------------------------------------------------------------------------------------------- the programs
def frozen_program(model: torch.nn.Module, x: torch.Tensor | dict[str, torch.Tensor], seed: int = 0
                   ) -> IntegerProgram:
    """``pipeline.trace`` -> quantizers (calibrated on ``x``: a tensor or keyword inputs) -> random integer bits in
    [2, 8] -> freeze."""
    inputs = x if isinstance(x, dict) else (x,)
    gm, _ = pipeline.trace(model.eval(), inputs)
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), pipeline.positional_inputs(gm, inputs))
    rng = random.Random(seed)
    for _, q in searched_quantizers(gm):
        if q.learnable_bits:
            q.set_bits(rng.randint(2, 8))
    return IntegerProgram.from_graph(freeze(gm, WeightMemory(1e12)))


def layer_macs(program: IntegerProgram, x: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each conv/linear layer for input ``x`` (from the reference's accumulator shapes)."""
    env = program.run_all(x)
    macs = {}
    for node in program.layers():
        out = env[node.name].q
        weight = node.tensors["weight"]
        macs[node.name] = out.numel() * (weight[0].numel())
    return macs


# --------------------------------------------------------------------------------------------- timing
def timed(fn, repeat: int) -> dict[str, float]:
    """Median and minimum wall time of ``fn()`` in ms, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": repeat}


def function_times(lowered, x: np.ndarray | list[np.ndarray], repeat: int) -> dict[str, float]:
    """Each packed function of the VM's ``main`` on input ``x`` (or the list of a model's inputs): its minimum time
    (ms) per model run over ``repeat`` runs, measured with ``VirtualMachine.set_instrument``."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(lowered.executable, tvm.cpu())
    lowered._machine()
    inputs = x if isinstance(x, list) else [x]
    args = [tvm.runtime.tensor(array) for array in inputs] + list(lowered._param_tensors)
    best: dict[str, float] = {}
    current: dict[str, float] = {}
    started: dict[str, float] = {}

    def instrument(func, name, before, ret, *arguments):  # noqa: ARG001 - the VM's instrument signature
        if before:
            started[name] = time.perf_counter()
        else:
            current[name] = current.get(name, 0.0) + time.perf_counter() - started[name]
        return 0

    vm.set_instrument(instrument)
    for _ in range(repeat):
        current.clear()
        vm["main"](*args)
        for name, seconds in current.items():
            best[name] = min(best.get(name, math.inf), seconds)
    return {name: seconds * 1e3 for name, seconds in best.items()}


# --------------------------------------------------------------------------------------------- the machine
_CLOCK_C = r"""
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
  long n = 20000000, x = 1, y = 3; double best = 1e9, bestv = 1e9;
  for (int r = 0; r < 40; r++) {  /* short runs, many: on a shared machine one of them runs uncontended */
    double t0 = now();
    for (long i = 0; i < n; i += 8)
      __asm__ volatile("add %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\t"
                       "add %1,%0" : "+r"(x) : "r"(y));
    double t = now() - t0; if (t < best) best = t;
  }
  long m = 20000000;
#if defined(PROBE_VNNI)  /* AVX-512 VNNI: 12 independent 512-bit vpdpbusd per iteration */
  for (int r = 0; r < 3; r++) {
    double t0 = now();
    for (long i = 0; i < m; i++)
      __asm__ volatile(
        "vpdpbusd %%zmm30,%%zmm31,%%zmm0\n\tvpdpbusd %%zmm30,%%zmm31,%%zmm1\n\tvpdpbusd %%zmm30,%%zmm31,%%zmm2\n\t"
        "vpdpbusd %%zmm30,%%zmm31,%%zmm3\n\tvpdpbusd %%zmm30,%%zmm31,%%zmm4\n\tvpdpbusd %%zmm30,%%zmm31,%%zmm5\n\t"
        "vpdpbusd %%zmm30,%%zmm31,%%zmm6\n\tvpdpbusd %%zmm30,%%zmm31,%%zmm7\n\tvpdpbusd %%zmm30,%%zmm31,%%zmm8\n\t"
        "vpdpbusd %%zmm30,%%zmm31,%%zmm9\n\tvpdpbusd %%zmm30,%%zmm31,%%zmm10\n\tvpdpbusd %%zmm30,%%zmm31,%%zmm11\n\t"
        ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11");
    double t = now() - t0; if (t < bestv) bestv = t;
  }
#elif defined(PROBE_AVXVNNI) || defined(PROBE_AVX2)  /* 12 independent 256-bit multiplies per iteration */
  m = m / 4;  /* 5M iterations (~50 ms at 0.5/cycle), best of 10 */
  for (int r = 0; r < 10; r++) {
    double t0 = now();
    for (long i = 0; i < m; i++)
      __asm__ volatile(
#if defined(PROBE_AVXVNNI)  /* AVX-VNNI: the VEX-encoded vpdpbusd */
        "%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm0\n\t%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm1\n\t"
        "%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm2\n\t%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm3\n\t"
        "%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm4\n\t%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm5\n\t"
        "%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm6\n\t%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm7\n\t"
        "%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm8\n\t%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm9\n\t"
        "%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm10\n\t%{vex%} vpdpbusd %%ymm14,%%ymm15,%%ymm11\n\t"
#else  /* AVX2 */
        "vpmaddubsw %%ymm14,%%ymm15,%%ymm0\n\tvpmaddubsw %%ymm14,%%ymm15,%%ymm1\n\tvpmaddubsw %%ymm14,%%ymm15,%%ymm2\n\t"
        "vpmaddubsw %%ymm14,%%ymm15,%%ymm3\n\tvpmaddubsw %%ymm14,%%ymm15,%%ymm4\n\tvpmaddubsw %%ymm14,%%ymm15,%%ymm5\n\t"
        "vpmaddubsw %%ymm14,%%ymm15,%%ymm6\n\tvpmaddubsw %%ymm14,%%ymm15,%%ymm7\n\tvpmaddubsw %%ymm14,%%ymm15,%%ymm8\n\t"
        "vpmaddubsw %%ymm14,%%ymm15,%%ymm9\n\tvpmaddubsw %%ymm14,%%ymm15,%%ymm10\n\tvpmaddubsw %%ymm14,%%ymm15,%%ymm11\n\t"
#endif
        ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11");
    double t = now() - t0; if (t < bestv) bestv = t;
  }
#else  /* no multiply probe */
  m = 0;
#endif
  printf("%.6f %.6f\n", n / best / 1e9, 12.0 * m / bestv / 1e9);
  return 0;
}
"""


#: The multiply probe of each kernel ISA: (compiler flags, the instruction, int8 ops per instruction).
PROBES = {
    "avx512vnni": (["-mavx512f", "-mavx512vnni", "-DPROBE_VNNI"], "vpdpbusd zmm", 128),  # 64 u8 x s8 products
    "avxvnni": (["-mavx2", "-mavxvnni", "-DPROBE_AVXVNNI"], "{vex} vpdpbusd ymm", 64),  # 32 products into int32
    "avx2": (["-mavx2", "-DPROBE_AVX2"], "vpmaddubsw ymm", 64),  # 32 products, summed in int16 pairs
}


def measure_clock(isa: str) -> dict[str, object]:
    """The core clock (GHz) from a dependent add chain, one core's rate of ``isa``'s multiply instruction
    (:data:`PROBES`) where /proc/cpuinfo shows every flag that ISA needs (never an instruction the CPU lacks: no
    probe for ``generic``, or where the flags cannot be read), /proc/cpuinfo's MHz."""
    from mpqc.cpu import cpu_flags, isa_flags

    info: dict[str, object] = {}
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
        info["cpuinfo_mhz"] = statistics.mean(mhz) if mhz else None
        model = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        info["cpu"] = model[0] if model else None
    except OSError:
        info["cpuinfo_mhz"] = None
    flags = cpu_flags()
    probe = PROBES.get(isa) if flags and set(isa_flags(isa)) <= flags else None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler:
        with tempfile.TemporaryDirectory() as work:
            source, binary = Path(work) / "clock.c", Path(work) / "clock"
            source.write_text(_CLOCK_C)
            built = subprocess.run([compiler, "-O2", *(probe[0] if probe else []), "-o", str(binary), str(source)],
                                   capture_output=True, text=True)
            if built.returncode == 0:
                ghz, dots = map(float, subprocess.run([str(binary)], capture_output=True, text=True,
                                                      check=True).stdout.split())
                info.update(clock_ghz=ghz, clock_method="dependent integer add chain (1 add/cycle), best of 40 runs of 7 ms")
                if probe:
                    info.update(probe_instruction=probe[1], probe_per_ns_one_core=dots,
                                probe_gops_one_core_measured=dots * probe[2])
                return info
    if info.get("cpuinfo_mhz"):
        info.update(clock_ghz=info["cpuinfo_mhz"] / 1e3, clock_method="/proc/cpuinfo cpu MHz (nominal)")
    return info


# --------------------------------------------------------------------------------------------- engines
def torch_int8_fx(model: torch.nn.Module, x: torch.Tensor):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        prepared(x)
        return convert_fx(prepared)


def _distinct_relus(model: torch.nn.Module) -> torch.nn.Module:
    """torchvision's BasicBlock calls one ReLU module twice, which the X86InductorQuantizer's pattern matching
    refuses ("Input partition has more than one output node"); give each call its own module."""
    import types

    from torchvision.models.resnet import BasicBlock

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu_out(out + identity)

    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.relu_out = torch.nn.ReLU()
            block.forward = types.MethodType(forward, block)
    return model


def torch_int8_pt2e(model: torch.nn.Module, x: torch.Tensor):
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    exported = torch.export.export(_distinct_relus(copy.deepcopy(model).eval()), (x,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(x)
        converted = convert_pt2e(prepared)
    inductor_config.freezing = True  # the int8 path: weights constant-folded into onednn quantized convs
    compiled = torch.compile(converted)
    with torch.no_grad():
        compiled(x)
    return compiled


def tvm_fp32_untuned(model: torch.nn.Module, x: torch.Tensor, target):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        exported = torch.export.export(copy.deepcopy(model).eval(), (x,))
    mod = from_exported_program(exported, keep_params_as_input=False)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    data = tvm.runtime.tensor(x.numpy())
    return lambda: vm["main"](data)


# --------------------------------------------------------------------------------------------- one engine
ENGINES = ("mpqc_tvm", "torch_fp32", "torch_int8_fx", "torch_int8_fx_vnni", "torch_int8_pt2e", "tvm_fp32_untuned")
#: On a CPU with AMX (Sapphire Rapids and later) oneDNN runs PyTorch's int8 convolutions on AMX tiles (brgconv
#: ``avx10_1_512_amx``), an ISA mpqc has no kernel for: ``torch_int8_fx_vnni`` is the same FX model with oneDNN held to
#: AVX-512 VNNI, the comparison at the same ISA. Skipped on CPUs without AMX (there it would be torch_int8_fx again).
SAME_ISA_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}
#: Engines whose work runs on TVM's thread pool (their processes get ``OMP_WAIT_POLICY=PASSIVE`` whatever it is set to).
TVM_ENGINES = ("mpqc_tvm", "tvm_fp32_untuned")


def run_engine(engine: str, name: str, batch: int, args) -> dict:
    """Time one engine on one case (in its own process: thread pools of different engines do not meet)."""
    from mpqc.targets.tvm import lower, resolve_target

    threads = int(os.environ["TVM_NUM_THREADS"])
    torch.set_num_threads(threads)
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(batch, *shape)
    if engine == "mpqc_tvm":
        program = frozen_program(model, x)
        macs = layer_macs(program, x)
        started = time.perf_counter()
        lowered = lower(program, input_shape=tuple(x.shape), tuning_db=args.tuning_db, isa=args.isa)
        kernel_layers = lowered.meta["kernel_layers"]  # layer node -> micro-kernel block
        row = {"build_and_tune_s": time.perf_counter() - started, "schedules": lowered.schedules,
               "isa": lowered.meta["isa"], "target": lowered.meta["target"],
               "vnni_layers": len(lowered.meta["vnni_layers"]), "kernel_layers": len(kernel_layers),
               "layers": len(program.layers()),
               "weight_bits": sorted(w for w, _ in program.layer_bits().values()),
               "layer_bits": {lowered.meta["layer_nodes"][m]: list(b) for m, b in program.layer_bits().items()},
               "gmacs": sum(macs.values()) / 1e9,
               "conv_gmacs": sum(macs[layer] for layer in kernel_layers) / 1e9}
        row["bit_exact"] = bool(torch.equal(lowered(x), program.run(x)))
        xs = x.numpy()
        row.update(timed(lambda: lowered(xs), args.repeat))
        functions = function_times(lowered, xs, args.repeat)
        blocks = sorted(set(kernel_layers.values()))
        row["conv_layers_ms"] = sum(ms for fn, ms in functions.items() if any(b in fn for b in blocks))
        # per micro-kernel class (e.g. AVX2 narrow / wide): its layers' MACs and its functions' time
        row["kernel_classes"] = {
            block: {"layers": sum(v == block for v in kernel_layers.values()),
                    "gmacs": sum(macs[layer] for layer, v in kernel_layers.items() if v == block) / 1e9,
                    "ms": sum(ms for fn, ms in functions.items()
                              if block in fn and not any(o != block and o in fn and len(o) > len(block)
                                                         for o in blocks))}
            for block in blocks}
        row["functions_ms"] = dict(sorted(functions.items(), key=lambda item: -item[1])[:12])
        return row
    if engine == "tvm_fp32_untuned":
        return timed(tvm_fp32_untuned(model, x, resolve_target("llvm")), 3)
    with torch.no_grad():
        if engine == "torch_fp32":
            return timed(lambda: model(x), args.repeat)
        if engine in ("torch_int8_fx", "torch_int8_fx_vnni"):
            fx = torch_int8_fx(model, x)
            return timed(lambda: fx(x), args.repeat)
        try:
            pt2e = torch_int8_pt2e(model, x)
        except ImportError as error:
            return {"skipped": f"torchao is not installed ({error})"}
        except Exception as error:  # noqa: BLE001 - an inductor failure is a finding, recorded as such
            return {"skipped": f"failed here: {type(error).__name__}: {str(error)[:300]}"}
        return timed(lambda: pt2e(x), args.repeat)


def run_case(name: str, batch: int, args, clock: dict) -> dict:
    """Every engine on one case, each in a fresh process, one after the other; ratios and GOP/s."""
    threads = int(os.environ["TVM_NUM_THREADS"])
    row: dict[str, object] = {"model": name, "batch": batch, "input": [batch, *MODELS[name][1]],
                              "load_average_before": list(os.getloadavg())}
    for engine in ENGINES:
        if engine == "tvm_fp32_untuned" and (not args.tvm_fp32 or (name == "resnet18" and batch > 1)):
            row[engine] = {"skipped": "not run (--no-tvm-fp32)" if not args.tvm_fp32 else
                           "not run: unscheduled fp32 ResNet-18 takes tens of seconds per batch-8 run"}
            continue
        if engine == "torch_int8_fx_vnni" and "amx_int8" not in cpu_flags():
            row[engine] = {"skipped": "no AMX on this CPU: torch_int8_fx is already at most AVX-512 VNNI"}
            continue
        command = [sys.executable, __file__, "--worker", engine, "--cases", f"{name}:{batch}",
                   "--repeat", str(args.repeat), "--tuning-db", str(args.tuning_db), "--isa", args.isa]
        env = dict(os.environ)
        if engine in TVM_ENGINES:  # torch only builds and checks there: its OpenMP pool must not spin against TVM's
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        if engine == "torch_int8_fx_vnni":
            env.update(SAME_ISA_ENV)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row[engine] = json.loads(lines[-1]) if done.returncode == 0 and lines else \
            {"skipped": f"the worker failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'}"}
    tvm_row = row["mpqc_tvm"]
    if "median_ms" not in tvm_row:
        raise SystemExit(f"mpqc_tvm on {name}:{batch}: {tvm_row['skipped']}")
    row["weight_bits"] = tvm_row.pop("weight_bits")
    row["gmacs"] = tvm_row.pop("gmacs")
    peak = OPS_PER_CYCLE[tvm_row["isa"]] * threads * clock["clock_ghz"]
    total_ops = 2 * row["gmacs"] * 1e9
    tvm_row["peak_gops"] = peak
    tvm_row["gops"] = total_ops / tvm_row["median_ms"] / 1e6
    tvm_row["fraction_of_peak"] = tvm_row["gops"] / peak
    conv_ms = tvm_row["conv_layers_ms"]
    tvm_row["conv_layers_gops"] = 2 * tvm_row["conv_gmacs"] * 1e3 / conv_ms if conv_ms else None
    tvm_row["conv_layers_fraction_of_peak"] = tvm_row["conv_layers_gops"] / peak if conv_ms else None
    for klass in tvm_row.get("kernel_classes", {}).values():
        klass["gops"] = 2 * klass["gmacs"] * 1e3 / klass["ms"] if klass["ms"] else None
        klass["fraction_of_peak"] = klass["gops"] / peak if klass["gops"] else None
    for engine in ENGINES[1:]:
        if "median_ms" in row[engine]:
            row[engine]["gops"] = total_ops / row[engine]["median_ms"] / 1e6
            row[engine]["mpqc_tvm_speedup"] = row[engine]["median_ms"] / tvm_row["median_ms"]
    int8 = [row[e]["median_ms"] for e in ("torch_int8_fx", "torch_int8_pt2e") if "median_ms" in row[e]]
    row["mpqc_tvm_over_best_torch_int8"] = tvm_row["median_ms"] / min(int8) if int8 else None
    same_isa = row["torch_int8_fx_vnni"]
    row["mpqc_tvm_over_torch_int8_vnni"] = tvm_row["median_ms"] / same_isa["median_ms"] \
        if "median_ms" in same_isa else None
    row["load_average_after"] = list(os.getloadavg())
    return row


def median_round(rows: list[dict]) -> dict:
    """One case measured in several rounds (every engine once per round, one after the other): the round whose
    ratio to the best PyTorch int8 is the median, with every round's times and ratio under ``rounds`` (a shared
    machine's timings move between minutes; interleaved rounds see both engines under the same moves)."""
    if len(rows) == 1:
        return rows[0]
    key = "mpqc_tvm_over_best_torch_int8"
    ordered = sorted(rows, key=lambda row: row[key] if row[key] is not None else math.inf)
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["rounds"] = [{engine: r[engine]["median_ms"] for engine in ENGINES if "median_ms" in r[engine]}
                     | {key: r[key]} for r in rows]
    return row


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    return "; ".join(f"{k}: {fields[k]}" for k in ("Model name", "CPU family", "Model", "Hypervisor vendor")
                     if k in fields)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MODEL:BATCH, e.g. resnet18:1")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each case this many times, every engine once per round; the round with the "
                             "median ratio is reported, every round's under 'rounds'")
    parser.add_argument("--tuning-db", type=Path, default=ROOT / "bench" / "tuning",
                        help="TVM tuning database (VNNI tiles); measured on first use")
    parser.add_argument("--no-tvm-fp32", dest="tvm_fp32", action="store_false")
    parser.add_argument("--clock-ghz", type=float, help="the core clock for the peak, where the machine is too busy "
                                                        "to measure it (the measured one is recorded too)")
    parser.add_argument("--isa", choices=ISA_CHOICES, default="auto",
                        help="mpqc-TVM's int8 kernels: auto (the best this CPU has) or forced, e.g. avx2 on a VNNI "
                             "host; one this CPU lacks is refused (targets/tvm/kernels/registry.py)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latency.json")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)  # one engine, one case: JSON out
    args = parser.parse_args(argv)
    if args.worker:
        name, _, batch = args.cases[0].partition(":")
        print(json.dumps(run_engine(args.worker, name, int(batch or 1), args)))
        return {}

    from mpqc.cpu import cpu_flags, int8_isa
    from mpqc.targets.tvm import resolve_target
    from mpqc.targets.tvm.kernels import resolve_isa

    from mpqc.errors import ConfigError

    try:
        isa = resolve_isa(resolve_target("llvm"), args.isa)
    except ConfigError as error:  # e.g. --isa avxvnni on a CPU without avx_vnni: nothing is run
        sys.exit(f"bench/latency.py: {error}")
    clock = measure_clock(isa)  # the probe runs only an instruction of the kernels' ISA, which this CPU has
    if args.clock_ghz:  # a busy shared machine measures a low clock; the peak then uses the given one
        clock.update(measured_clock_ghz=clock.get("clock_ghz"), clock_ghz=args.clock_ghz,
                     clock_method=f"given (--clock-ghz); measured here: {clock.get('clock_ghz')}")
    if not clock.get("clock_ghz"):
        sys.exit("cannot measure or read the CPU clock")
    threads = int(os.environ["TVM_NUM_THREADS"])
    peak_gops = OPS_PER_CYCLE[isa] * threads * clock["clock_ghz"]
    results = {
        "machine": {**clock, "threads": threads, "logical_cpus": os.cpu_count(), "host_int8_isa": int8_isa(),
                    "kernel_isa": isa, "cpu_flags": sorted(cpu_flags()),
                    "lscpu_model": _lscpu_model(),
                    "peak_gops": peak_gops,
                    "peak_formula_kernel_isa": f"{OPS_PER_CYCLE[isa]} int8 ops/cycle/core ({isa}) x {threads} "
                                               f"threads x clock",
                    "environment": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "TVM_NUM_THREADS",
                                                                    "TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")},
                    "vnni_peak_gops": VNNI_OPS_PER_CYCLE * threads * clock["clock_ghz"],
                    "peak_formula": f"{VNNI_OPS_PER_CYCLE} int8 ops/cycle/core x {threads} threads x clock"},
        "torch": torch.__version__, "note": args.note, "cases": [],
    }
    header = f"{'case':14s} {'mpqc-TVM':>9s} {'fp32':>8s} {'int8 FX':>8s} {'FX VNNI':>8s} {'int8 PT2E':>9s} " \
             f"{'TVM fp32':>9s}" \
             f" {'GOP/s':>7s} {'conv %peak':>10s} exact"
    print(f"clock {clock['clock_ghz']:.2f} GHz ({clock['clock_method']}), {threads} threads, kernels {isa}, peak "
          f"{peak_gops:.0f} GOP/s\n{header}")
    for case in args.cases:
        name, _, batch = case.partition(":")
        row = median_round([run_case(name, int(batch or 1), args, clock) for _ in range(args.rounds)])
        results["cases"].append(row)

        def ms(engine):
            return f"{row[engine]['median_ms']:.2f}" if "median_ms" in row[engine] else "-"

        tvm_row = row["mpqc_tvm"]
        print(f"{case:14s} {tvm_row['median_ms']:9.2f} {ms('torch_fp32'):>8s} {ms('torch_int8_fx'):>8s} "
              f"{ms('torch_int8_fx_vnni'):>8s} {ms('torch_int8_pt2e'):>9s} {ms('tvm_fp32_untuned'):>9s} {tvm_row['gops']:7.0f} "
              f"{100 * (tvm_row['conv_layers_fraction_of_peak'] or 0):9.0f}% {tvm_row['bit_exact']}", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
