"""Model-zoo sweep (issue 7): every torchvision classification model, with random weights, through the compiler.

For each model the stages run in order:

``capture`` -> ``functional_layers`` -> ``fold_batchnorm`` -> ``analyze_layers`` -> ``insert_quantizers`` (DQ, then
``IntegerProgram.check_supported`` as ``mpqc.compile`` does) -> ``search`` (a few forward/backward steps of task
loss on random data, weights and quantizer parameters updated) -> ``freeze`` (random mixed 2-8 bits, a loose
budget) -> ``integer`` (``IntegerProgram.from_graph`` + ``run``, compared with the fake-quant graph) -> ``onnx``
(``export_onnx`` + ``compare_with_reference`` with onnxruntime) -> ``tvm`` (llvm ``lower`` + bit-exact check, only
with ``--tvm``).

Each stage is ``ok``, ``clear error`` (an ``mpqc.errors.MpqcError`` subclass was raised: its first line is kept),
``FAIL`` (any other exception, or a numeric check beyond its tolerance) or ``-`` (skipped after an earlier stage
did not pass). Tolerances (the ones the tests of the contract use):

* integer vs fake-quant (same input, not the calibration batch), judged stepwise (the reference re-run with the
  fake-quant codes substituted at every quantizer, so each requantisation step sees the same inputs): every step
  within 1 LSB, at most ``CODE_FLIP_FLOOR`` (0.2%) of the codes flipped (rounding ties). End to end, the max
  relative error of the logits (``max_rel_error``, and ``max_rel_error_over_tol`` against ``INTEGER_REL_TOL`` = 5%,
  the bound tests/test_reference.py puts on ResNet-18 and MobileNetV2) and the argmax agreement (against
  ``ARGMAX_FLOOR``, ``argmax_below_floor``) are recorded but not judged: legal 1-LSB flips at 2-3-bit quantizers
  amplify through deep nets, and a random-weight net's logits are nearly tied (vgg19: every step within 1 LSB,
  5e-6 of the codes flipped, yet 1 of 4 argmaxes agreed);
* onnxruntime vs reference (``compare_with_reference``), judged as the contract says (``contract_violations``):
  every quantizer and integer output within 1 LSB on >= ``AGREEMENT_FLOOR`` (99.9%) of its codes, stepwise (never
  more than 1 LSB per step) and end to end; all codes exact on >= 99.9% stepwise;
* TVM: outputs and every 8-bit code equal to the reference (``torch.equal``).

Two custom models check capture: ``data_dependent_if`` (``if x.sum() > 0``) must be refused with a
``CaptureError`` (its capture stage is ``FAIL`` otherwise), ``shape_dependent_if`` (``if x.shape[-1] > 32``: fx
cannot trace it, torch.export can) must go through.

Usage::

    OMP_WAIT_POLICY=PASSIVE TVM_NUM_THREADS=1 python3 bench/zoo.py [--models a,b] [--skip vit_b_16] [--tvm]
        [--time-budget 900] [--out bench/results/zoo.json]
    python3 bench/zoo.py --merge part1.json part2.json ... --out bench/results/zoo_all.json
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# this checkout's mpqc, not whichever one is installed: the commit recorded per model must be the code that ran
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from torch import nn  # noqa: E402

from mpqc.budgets import WeightMemory  # noqa: E402
from mpqc.config import QuantizerConfig  # noqa: E402
from mpqc.errors import MpqcError  # noqa: E402
from mpqc.passes.analyze_layers import analyze_layers  # noqa: E402
from mpqc.passes.capture import capture  # noqa: E402
from mpqc.passes.canonicalize import canonicalize  # noqa: E402
from mpqc.passes.fold_batchnorm import fold_batchnorm  # noqa: E402
from mpqc.passes.functional_layers import functional_layers  # noqa: E402
from mpqc.passes.freeze import freeze  # noqa: E402
from mpqc.passes.insert_quantizers import quantized_layers, searched_quantizers  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402
from mpqc import pipeline  # noqa: E402
from mpqc.reference import IntegerProgram  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# the compiler's own order (mpqc.pipeline), then the checks of the integer program and its targets
STAGES = [*pipeline.TRACE_STAGES, "insert_quantizers", "search", "freeze", "integer", "onnx", "tvm"]
INTEGER_REL_TOL = 0.05  # end to end, recorded only (see the module docstring)
CODE_FLIP_FLOOR = 2e-3
ARGMAX_FLOOR = 0.5
NUM_CLASSES = 10
BATCH = 4
SEARCH_STEPS = 3

# name -> (builder kwargs beyond num_classes, input side). Smallest sizes each model accepts, or 64.
TORCHVISION: dict[str, tuple[dict[str, Any], int]] = {
    "resnet18": ({}, 64), "resnet34": ({}, 64), "resnet50": ({}, 64), "resnext50_32x4d": ({}, 64),
    "wide_resnet50_2": ({}, 64), "mobilenet_v2": ({}, 64), "mobilenet_v3_small": ({}, 64),
    "mobilenet_v3_large": ({}, 64), "efficientnet_b0": ({}, 64), "regnet_x_400mf": ({}, 64),
    "regnet_y_400mf": ({}, 64), "shufflenet_v2_x0_5": ({}, 64), "squeezenet1_0": ({}, 64), "mnasnet0_5": ({}, 64),
    "densenet121": ({}, 64), "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 75), "vgg11_bn": ({}, 64),
    "alexnet": ({}, 64), "convnext_tiny": ({}, 64),
    "vit_b_16": ({"image_size": 64}, 64),  # torchvision's builder takes image_size; 224 is only its default
    "swin_t": ({}, 64), "maxvit_t": ({}, 224),  # every stage's size must be divisible by its partition size 7
}
DEFAULT_MODELS = list(TORCHVISION) + ["data_dependent_if", "shape_dependent_if"]


def every_torchvision_classifier() -> list[str]:
    """Every classification model torchvision registers (``--all``), with sizes and kwargs filled in below."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    for name in names:
        if name not in TORCHVISION:
            if name.startswith("vit_"):
                side = 70 if name.endswith("_14") else 64  # a multiple of the patch size
                TORCHVISION[name] = ({"image_size": side}, side)
            elif name.startswith("inception"):
                TORCHVISION[name] = ({"aux_logits": False, "init_weights": True}, 75)
            elif name.startswith("googlenet"):
                TORCHVISION[name] = ({"aux_logits": False, "init_weights": True}, 64)
            elif name.startswith("maxvit"):
                TORCHVISION[name] = ({}, 224)
            else:
                TORCHVISION[name] = ({}, 64)
    return names + ["data_dependent_if", "shape_dependent_if"]


# --------------------------------------------------------------------------------------------- custom models
class DataDependentIf(nn.Module):
    """Control flow on a tensor's values: neither torch.fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if y.sum() > 0:
            y = y * 2
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class ShapeDependentIf(nn.Module):
    """Control flow on a shape: torch.fx.symbolic_trace fails (a Proxy in ``if``), torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if x.shape[-1] > 32:
            y = F.max_pool2d(y, 2)
        y = F.relu(self.conv2(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


CUSTOM: dict[str, tuple[Callable[[], nn.Module], int, str | None]] = {
    # name -> (builder, input side, the error class its capture must raise, or None: must pass)
    "data_dependent_if": (DataDependentIf, 64, "CaptureError"),
    "shape_dependent_if": (ShapeDependentIf, 64, None),
}


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name in CUSTOM:
        builder, side, _ = CUSTOM[name]
        return builder(), (BATCH, 3, side, side)
    import torchvision

    kwargs, side = TORCHVISION[name]
    return getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs), (BATCH, 3, side, side)


# --------------------------------------------------------------------------------------------- helpers
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (copied from tests/conftest.py)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    return model.eval()


def freeze_at_random_bits(gm, seed: int = 0, low: int = 2, high: int = 8):
    """Freeze ``gm`` at random integer bit-widths in [low, high] under a loose budget (tests/conftest.py's helper)."""
    rng = random.Random(seed)
    chosen: dict[str, int] = {}
    for name, q in searched_quantizers(gm):
        if q.learnable_bits:
            q.set_bits(chosen.setdefault(name, rng.randint(low, high)))
    return freeze(gm, WeightMemory(1e12)), chosen


def search_steps(gm, shape: tuple[int, ...], steps: int = SEARCH_STEPS, seed: int = 0) -> dict[str, float]:
    """A few forward/backward steps of task loss on random data (weights and quantizer parameters)."""
    generator = torch.Generator().manual_seed(seed)
    # Plain SGD with the gradient norm clipped to 1: random-weight nets with randomised BatchNorm have logits in the
    # hundreds (resnet50: ~570), and unclipped SGD(lr=1e-3, momentum=0.9) blew them up to NaN in two steps.
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-3)
    gm.train()
    losses = []
    for _ in range(steps):
        x = torch.randn(shape, generator=generator)
        y = torch.randint(0, NUM_CLASSES, (shape[0],), generator=generator)
        optimizer.zero_grad()  # before the forward pass: the last step's gradients (a copy of the weights) freed
        out = gm(x)
        loss = F.cross_entropy(out, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"search loss is {float(loss)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gm.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    gm.eval()
    return {"loss_first": losses[0], "loss_last": losses[-1]}


class Mismatch(Exception):
    """A numeric check beyond its documented tolerance."""


def _fake_quant_codes(gm, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Integer codes (value / scale) at every activation quantizer of the fake-quant graph, and its output."""
    from torch.fx import Interpreter

    from mpqc.passes.insert_quantizers import ACT_QUANTIZERS

    codes: dict[str, torch.Tensor] = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op == "call_module" and n.target.startswith(ACT_QUANTIZERS + "."):
                q = self.module.get_submodule(n.target)
                codes[n.name] = torch.round(value / q.scale.abs()).to(torch.int64)
            return value

    with torch.no_grad():
        out = Recorder(gm).run(x)
    return codes, out


def check_integer(gm, program: IntegerProgram, x: torch.Tensor) -> dict[str, Any]:
    """Reference vs fake-quant on ``x``.

    Judged **stepwise** (as ``compare_with_reference`` judges onnxruntime): the reference is re-run with the
    fake-quant graph's codes substituted at every quantizer, so each requantisation step is compared on the same
    inputs; the contract is at most 1 LSB apart, on at most ``CODE_FLIP_FLOOR`` of the codes (rounding ties). End to
    end (``max_rel_error``, ``e2e_code_max_lsb``, ``argmax_agreement``) is recorded, not judged: a legal 1-LSB
    flip at a 2-3-bit quantizer moves every later code, by tens of LSB in deep
    nets (squeezenet1_0: 18 flips at a 3-bit quantizer became 4 LSB at the next, 62 LSB six layers on).
    """
    from mpqc.reference import IntValue

    codes, fake = _fake_quant_codes(gm, x)
    with torch.no_grad():
        env = program.run_all(x)
        ref = program.run(x)
        names = [node.name for node in program.nodes if node.op == "input"]
        stepwise: dict[str, Any] = {name: value.float() for name, value in zip(names, (x,))}
        step_diffs: dict[str, torch.Tensor] = {}
        for node in program.nodes:
            if node.op == "input":
                continue
            value = program.step(node, stepwise)
            if node.name in codes and isinstance(value, IntValue):
                step_diffs[node.name] = (value.q - codes[node.name]).abs()
                value = IntValue(codes[node.name], value.scale)
            stepwise[node.name] = value
    if not isinstance(ref, torch.Tensor) or ref.shape != fake.shape:
        raise Mismatch(f"integer output shape {getattr(ref, 'shape', type(ref))} != fake-quant {tuple(fake.shape)}")
    missing = sorted(set(codes) - set(step_diffs))
    # the contract accumulates in int32: an accumulator outside it is a value no int32 target can reproduce
    overflow = [node.name for node in program.nodes if node.op in ("conv1d", "conv2d", "linear")
                and isinstance(env.get(node.name), IntValue) and int(env[node.name].q.abs().max()) > 2**31 - 1]
    total = sum(d.numel() for d in step_diffs.values())
    flips = sum(int((d > 0).sum()) for d in step_diffs.values())
    step_max = max((int(d.max()) for d in step_diffs.values()), default=0)
    worst = max(step_diffs, key=lambda n: int(step_diffs[n].max()), default=None)
    e2e_max = max((int((env[n].q - c).abs().max()) for n, c in codes.items() if isinstance(env.get(n), IntValue)),
                  default=0)
    scale = float(fake.abs().max())
    rel = float((ref - fake).abs().max()) / max(scale, 1e-12)
    agree = float((ref.argmax(1) == fake.argmax(1)).float().mean())
    stats = {"max_rel_error": rel, "max_rel_error_over_tol": rel > INTEGER_REL_TOL, "argmax_agreement": agree,
             "argmax_below_floor": agree < ARGMAX_FLOOR,
             "step_max_lsb": step_max,
             "step_flip_fraction": flips / max(total, 1), "e2e_code_max_lsb": e2e_max, "quantizers": len(step_diffs)}
    problems = []
    if missing:
        problems.append(f"quantizers without an integer value in the program: {missing[:5]}")
    if overflow:
        problems.append(f"int32 accumulator overflow at {overflow[:5]}")
    if step_max > 1:
        problems.append(f"a requantisation step {step_max} LSB off ({worst})")
    if flips / max(total, 1) > CODE_FLIP_FLOOR:
        problems.append(f"{flips}/{total} codes flipped (> {CODE_FLIP_FLOOR})")
    if problems:
        raise Mismatch("integer vs fake-quant: " + "; ".join(problems) + f" (end to end: max rel error {rel:.4g})")
    return stats


def check_onnx(program: IntegerProgram, x: torch.Tensor, directory: Path) -> dict[str, float]:
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import AGREEMENT_FLOOR, compare_with_reference, contract_violations

    exported = export_onnx(program, directory / "model.onnx")
    agreement = compare_with_reference(program, exported.path, x)
    overall = agreement["overall"]
    problems = contract_violations(agreement)
    if overall["exact"] < AGREEMENT_FLOOR:
        problems.append(f"overall exact {overall['exact']:.5f}")
    if problems:
        raise Mismatch("onnxruntime vs reference: " + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
    (output,) = agreement["outputs"].values() if len(agreement["outputs"]) == 1 else (None,)
    return {"overall_exact": float(overall["exact"]), "overall_max_lsb": float(overall["max_lsb"]),
            "end_to_end_within_1_lsb": float(overall["end_to_end_within_1_lsb"]),
            "output_max_abs_error": output and output["max_abs_error"],
            "output_max_abs_reference": output and output["max_abs_reference"]}


def check_tvm(program: IntegerProgram, x: torch.Tensor) -> dict[str, float]:
    from mpqc.targets import tvm as mtvm

    x = x[:1]
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers)
    if not torch.equal(lowered(x), program.run(x)):
        raise Mismatch("TVM outputs differ from the reference")
    env = program.run_all(x)
    codes = lowered.exposed(x)
    for name in quantizers:
        if not torch.equal(torch.from_numpy(codes[name]).to(torch.int64), env[name].q):
            raise Mismatch(f"TVM 8-bit codes of {name} differ from the reference")
    return {"quantizers": len(quantizers)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


# --------------------------------------------------------------------------------------------- the sweep
def run_model(name: str, *, tvm: bool = False, verbose: bool = False) -> dict[str, dict[str, Any]]:
    """Every stage on one model: ``{stage: {"status", "message", "seconds", ...}}`` (stages in STAGES order)."""
    results: dict[str, dict[str, Any]] = {}
    expected_capture_error = CUSTOM[name][2] if name in CUSTOM else None
    state: dict[str, Any] = {}

    def stage_capture():
        model, shape = build(name)
        model = randomize_batchnorm(model)
        state["shape"] = shape
        state["x"] = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        state["x_eval"] = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        state["gm"] = capture(model, (state["x"],))
        return {"nodes": len(state["gm"].graph.nodes)}

    def stage_canonicalize():
        state["gm"] = canonicalize(state["gm"])
        return {}

    def stage_functional():
        state["gm"] = functional_layers(state["gm"])
        return {}

    def stage_fold():
        state["gm"] = fold_batchnorm(state["gm"])
        return {}

    def stage_analyze():
        state["layers"] = analyze_layers(state["gm"], (state["x"],))
        return {"layers": len(state["layers"]), "params": sum(layer.params for layer in state["layers"])}

    def stage_insert():
        state["gm"] = pipeline.quantize(state["gm"], get_method("dq"), QuantizerConfig(), (state["x"],))
        return {"quantized_layers": len(quantized_layers(state["gm"]))}

    def stage_search():
        torch.manual_seed(0)
        return search_steps(state["gm"], state["shape"])

    def stage_freeze():
        state["gm"], chosen = freeze_at_random_bits(state["gm"], seed=1)
        state["gm"].eval()
        return {"distinct_bits": len(set(chosen.values()))}

    def stage_integer():
        state["program"] = IntegerProgram.from_graph(state["gm"])
        return check_integer(state["gm"], state["program"], state["x_eval"])

    def stage_onnx():
        with tempfile.TemporaryDirectory(prefix="mpqc-zoo-") as directory:
            return check_onnx(state["program"], state["x_eval"], Path(directory))

    def stage_tvm():
        return check_tvm(state["program"], state["x_eval"])

    functions = {"capture": stage_capture, "canonicalize": stage_canonicalize, "functional_layers": stage_functional, "fold_batchnorm": stage_fold,
                 "analyze_layers": stage_analyze, "insert_quantizers": stage_insert, "search": stage_search,
                 "freeze": stage_freeze, "integer": stage_integer, "onnx": stage_onnx, "tvm": stage_tvm}
    failed = False
    for stage in STAGES:
        if failed or (stage == "tvm" and not tvm):
            results[stage] = {"status": "-", "message": "skipped" if stage == "tvm" and not failed else "",
                              "seconds": 0.0}
            continue
        start = time.perf_counter()
        try:
            extra = functions[stage]()
            entry = {"status": "ok", "message": "", **(extra or {})}
        except MpqcError as error:
            entry = {"status": "clear error", "message": f"{type(error).__name__}: {_first_line(error)}",
                     "detail": str(error)[:1500]}
        except Exception as error:  # noqa: BLE001 - everything else is a failure, recorded
            entry = {"status": "FAIL", "message": f"{type(error).__name__}: {str(error)[:600]}"}
            if verbose:
                traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - start, 3)
        if stage == "capture" and name in CUSTOM:
            # the custom models' capture verdicts are fixed: refused with the named class, or captured
            if expected_capture_error is None and entry["status"] != "ok":
                entry = {**entry, "status": "FAIL", "message": "expected capture to succeed; " + entry["message"]}
            elif expected_capture_error is not None and not entry["message"].startswith(expected_capture_error):
                entry = {**entry, "status": "FAIL",
                         "message": f"expected {expected_capture_error}; got {entry['status']} {entry['message']}"}
        results[stage] = entry
        failed = entry["status"] != "ok"
        if verbose:  # progress of a long model, stage by stage
            print(f"[zoo] {name} / {stage}: {entry['status']} ({entry['seconds']}s)", flush=True)
    return results


def format_table(all_results: dict[str, dict[str, dict[str, Any]]], stages: list[str] = STAGES) -> str:
    short = {"capture": "capture", "canonicalize": "canonical", "functional_layers": "functional",
             "fold_batchnorm": "fold_bn",
             "analyze_layers": "analyze",
             "insert_quantizers": "insert_q", "search": "search", "freeze": "freeze", "integer": "integer",
             "onnx": "onnx", "tvm": "tvm"}
    width = max([len(n) for n in all_results] + [5])
    header = "model".ljust(width) + "  " + "  ".join(short[s].ljust(11) for s in stages) + "  seconds"
    lines = [header, "-" * len(header)]
    notes = []
    for name, results in all_results.items():
        row = name.ljust(width) + "  " + "  ".join(results[s]["status"].ljust(11) for s in stages)
        row += f"  {sum(r['seconds'] for r in results.values()):7.1f}"
        lines.append(row)
        for s in stages:
            if results[s]["status"] in ("clear error", "FAIL"):
                notes.append(f"  {name} / {s}: [{results[s]['status']}] {results[s]['message'][:300]}"
                             + _reasons(results[s].get("detail", "")))
    return "\n".join(lines + ([""] + ["notes:"] + notes if notes else []))


def _reasons(detail: str) -> str:
    """The distinct '(why)' endings of an UnsupportedOpError's node lines, e.g. '(module type Sigmoid)'."""
    import re

    reasons = sorted({m.group(1) for m in re.finditer(r"\)\s+\(((?:[^()]|\([^()]*\))*)\)\s*$", detail, re.M)})
    return (" -- " + "; ".join(reasons[:6]) + (" ..." if len(reasons) > 6 else "")) if reasons else ""


def main(argv: list[str] | None = None) -> int:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--all", action="store_true", help="every torchvision classification model (overrides --models)")
    parser.add_argument("--skip", default="", help="comma-separated model names to leave out")
    parser.add_argument("--tvm", action="store_true", help="also lower with TVM (llvm) and check bit-exactness")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop starting new models after this many seconds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "zoo.json"))
    parser.add_argument("--batch", type=int, default=BATCH,
                        help=f"images per batch (default {BATCH}; maxvit_t's onnxruntime check at 4 224x224 images "
                             "holds every code several times over: ~18 GiB, OOM-killed on a 24 GiB machine)")
    parser.add_argument("--verbose", action="store_true",
                        help="print each stage as it ends, and tracebacks of failures")
    parser.add_argument("--merge", nargs="+", metavar="PART", default=None,
                        help="merge these part files (run with --out each) into --out instead of running models; "
                             "a model in several parts keeps its entry from the last part naming it")
    args = parser.parse_args(argv)
    if args.merge:  # with --all: every model --all names, less --skip, that no part holds is listed as not run
        expected = [m for m in every_torchvision_classifier() if m not in set(args.skip.split(","))] if args.all else []
        return merge(args.merge, Path(args.out), expected)
    torch.set_num_threads(max(1, int(os.environ.get("ZOO_THREADS", "1"))))
    BATCH = args.batch  # read by build() and recorded in the settings

    skip = {m for m in args.skip.split(",") if m}
    everything = every_torchvision_classifier()  # (also gives every torchvision model its input size)
    requested = everything if args.all else args.models.split(",")
    models = [m for m in requested if m and m not in skip]
    unknown = [m for m in models if m not in TORCHVISION and m not in CUSTOM]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(DEFAULT_MODELS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    started = time.perf_counter()
    all_results: dict[str, dict[str, dict[str, Any]]] = {}
    runs: dict[str, dict[str, Any]] = {}
    not_run: list[str] = []
    for name in models:
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            not_run.append(name)
            continue
        print(f"[zoo] {name} ...", flush=True)
        model_start = time.perf_counter()
        all_results[name] = run_model(name, tvm=args.tvm, verbose=args.verbose)
        # per model: the code it ran (a part file may be merged with others run at other commits) and its wall time
        runs[name] = {"commit": commit, "wall_seconds": round(time.perf_counter() - model_start, 1),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        summary = " ".join(f"{s}={r['status']}" for s, r in all_results[name].items())
        print(f"[zoo] {name}: {summary} ({sum(r['seconds'] for r in all_results[name].values()):.1f}s)", flush=True)
        _write(out, all_results, not_run, args, runs)
    _write(out, all_results, not_run, args, runs)
    print()
    print(format_table(all_results))
    if not_run:
        print(f"\nnot run (time budget): {', '.join(not_run)}")
    failures = sum(r["status"] == "FAIL" for results in all_results.values() for r in results.values())
    return 1 if failures else 0


def merge(parts: list[str], out: Path, expected: list[str] = ()) -> int:
    """One table from part files written by separate ``--out`` runs: models, their runs and settings, in order;
    ``expected`` models no part holds are listed as not run."""
    payloads = [json.loads(Path(part).read_text()) for part in parts]
    for part, payload in zip(parts, payloads):
        if payload.get("format") != "mpqc-zoo/1" or payload.get("stages") != STAGES:
            raise SystemExit(f"--merge: {part} is not an mpqc-zoo/1 table with stages {STAGES}")
    models: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for part, payload in zip(parts, payloads):
        for name, results in payload["models"].items():
            models.pop(name, None)
            models[name] = results
            runs[name] = {**payload.get("runs", {}).get(name, {}), "part": Path(part).name,
                          "batch": payload["settings"].get("batch")}  # parts may differ (--batch 1 for the large)
    not_run = sorted(({name for payload in payloads for name in payload["not_run"]} | set(expected)) - set(models))
    settings = {**payloads[-1]["settings"], "merged_from": [Path(part).name for part in parts]}
    settings["tvm"] = all(payload["settings"].get("tvm") for payload in payloads)
    batches = {payload["settings"].get("batch") for payload in payloads} - {None}
    settings["batch"] = sorted(batches)  # each model's own in its run
    _dump(out, {"format": "mpqc-zoo/1", "stages": STAGES, "settings": settings, "models": models, "runs": runs,
                "not_run": not_run})
    print(format_table(models))
    print("\nper stage (ok / clear error / FAIL / skipped):")
    for stage in STAGES:
        statuses = [results[stage]["status"] for results in models.values()]
        print(f"  {stage:18} " + " / ".join(str(statuses.count(s)) for s in ("ok", "clear error", "FAIL", "-")))
    print(f"not run: {len(not_run)}" + (f" ({', '.join(not_run)})" if not_run else ""))
    return 0


def _commit() -> str:
    """The commit this checkout's code is at, with ``+dirty`` when tracked files differ from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = "+dirty" if git("status", "--porcelain", "-uno", "--", ".", ":!bench/results") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def _write(out: Path, all_results, not_run, args, runs) -> None:
    payload = {
        "format": "mpqc-zoo/1",
        "stages": STAGES,
        "settings": {"batch": BATCH, "num_classes": NUM_CLASSES, "search_steps": SEARCH_STEPS, "method": "dq",
                     "bits": [2, 8], "tvm": args.tvm, "integer_rel_tol_recorded_only": INTEGER_REL_TOL,
                     "code_flip_floor": CODE_FLIP_FLOOR,
                     "argmax_floor_recorded_only": ARGMAX_FLOOR, "torch": torch.__version__},
        "models": all_results,
        "runs": runs,
        "not_run": not_run,
    }
    _dump(out, payload)


def _dump(out: Path, payload: dict[str, Any]) -> None:
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
