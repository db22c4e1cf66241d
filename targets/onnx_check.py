"""Check an ONNX export (``targets/onnx.py``) against the integer reference, on this CPU or an emulated one.

    agreement = compare_with_reference(compiled, "model.onnx", torch.randn(8, 1, 28, 28))
    check_agreement(agreement)   # raises OnnxMismatchError naming the worst tensor
    compare_with_reference(compiled, "model.onnx", x, cpu="Haswell")      # onnxruntime's AVX2 kernels, any host

**The contract** (DESIGN.md, "The integer contract"): onnxruntime's CPU provider, with its default session options,
agrees with the reference within 1 LSB, step by step at every tensor and end to end over all codes, on >=
:data:`AGREEMENT_FLOOR` of them, on every x86 CPU (:func:`contract_violations` says exactly what is judged). Which
kernels onnxruntime runs depends on the CPU it sees (its u8 x s8 kernels saturate on CPUs without VNNI, which is why
the export stores every operand as UINT8), so a check on one machine says nothing about another: ``cpu=`` runs onnxruntime under QEMU's user-mode emulator with another
CPU model (``qemu-x86_64 -cpu Haswell``: AVX2 without AVX-512, the kernels of most AMD Zen and older Intel
servers; ``Nehalem``: SSE4.2), whatever the host (Debian package ``qemu-user``, installed by
``scripts/install.sh``). Emulation is ~20x slower: meant for small batches.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor

from mpqc.cpu import describe_cpu
from mpqc.errors import ConfigError, MpqcError
from mpqc.ops import dequantize
from mpqc.reference import LAYER_OPS, IntegerProgram, IntValue
from mpqc.targets import onnx_runner
from mpqc.targets.onnx import read_metadata

AGREEMENT_FLOOR = 0.999  # the fraction of codes within 1 LSB of the reference the contract asks of onnxruntime
QEMU = "qemu-x86_64"


class OnnxMismatchError(MpqcError):
    """onnxruntime's results break the integer contract (see :func:`check_agreement`)."""


# --------------------------------------------------------------------------------------------- running
def run_models(models: Sequence[tuple[onnx.ModelProto, Sequence[str]]], feeds: dict[str, np.ndarray], *,
               optimize: bool = True, cpu: str | None = None) -> list[list[np.ndarray]]:
    """onnxruntime's outputs ``names`` of each ``(model, names)`` for ``feeds``: in this process, or, with ``cpu``
    (a QEMU CPU model such as ``"Haswell"``), in a fresh interpreter under ``qemu-x86_64 -cpu CPU``."""
    serialized = [(model.SerializeToString(), list(names)) for model, names in models]
    if cpu is None:
        return onnx_runner.run_models(serialized, feeds, optimize=optimize)
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise ConfigError(f"cpu={cpu!r}: running onnxruntime on an emulated CPU needs QEMU's user-mode emulator "
                          f"({QEMU}); install the Debian package qemu-user (scripts/install.sh does)")
    with tempfile.TemporaryDirectory(prefix="mpqc-onnx-") as tmp:
        request, result = Path(tmp) / "request.npz", Path(tmp) / "result.npz"
        arrays = {f"feed:{name}": value for name, value in feeds.items()}
        for i, (model, names) in enumerate(serialized):
            arrays[f"model{i}"] = np.frombuffer(model, dtype=np.uint8)
            arrays[f"outputs{i}"] = np.frombuffer("\n".join(names).encode(), dtype=np.uint8)
        np.savez(request, optimize=np.array(optimize), threads=np.array(1), **arrays)
        command = [qemu, "-cpu", cpu, os.path.realpath(sys.executable), onnx_runner.__file__, str(request), str(result)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            errors = [line for line in completed.stderr.splitlines() if "TCG doesn't support" not in line]
            raise MpqcError(f"onnxruntime on an emulated {cpu} CPU failed (exit {completed.returncode}): "
                            + " | ".join(errors[-3:]))
        with np.load(result) as outputs:
            return [[outputs[f"{i}:{name}"] for name in names] for i, (_, names) in enumerate(serialized)]


def _with_codes_as_outputs(onnx_model: onnx.ModelProto, codes: list[str]) -> onnx.ModelProto:
    """A copy whose integer codes are extra int32 graph outputs (``Cast``, since numpy has no int4)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(onnx_model)
    for name in codes:
        exposed.graph.node.append(helper.make_node("Cast", [name], [f"{name}.int32"], name=f"{name}/Cast",
                                                   to=TensorProto.INT32))
        exposed.graph.output.append(helper.make_tensor_value_info(f"{name}.int32", TensorProto.INT32, None))
    return exposed


# --------------------------------------------------------------------------------------------- comparing
def _agreement(diff: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Fractions of elements whose code differs by 0 and by at most 1 LSB (``diff`` in LSBs), and the largest."""
    diff = np.abs(diff)
    return {f"{prefix}exact": float(np.mean(diff < 0.5)) if diff.size else 1.0,
            f"{prefix}within_1_lsb": float(np.mean(diff <= 1.0 + 1e-6)) if diff.size else 1.0,
            f"{prefix}max_lsb": float(diff.max()) if diff.size else 0.0}


def _output_lsb(onnx_out: np.ndarray, value: Tensor | IntValue) -> np.ndarray | None:
    """An output's error in LSBs of its reference scale (for integer outputs), else None: against the value the
    reference outputs, ``fp32(q) * fp32(scale)`` (an fp32 output cannot hold an accumulator past 2^24 exactly, the
    reference's no more than onnxruntime's: vit_b_32's logits measured 1.8 "LSB" against the exact integers)."""
    if not isinstance(value, IntValue):
        return None
    scale = torch.broadcast_to(value.scale, value.q.shape).numpy()
    return (onnx_out.astype(np.float64) - dequantize(value).double().numpy()) / scale


def compare_with_reference(model: IntegerProgram | Any, onnx_model: onnx.ModelProto | str | Path,
                           inputs: Tensor | Sequence[Tensor], *, optimize: bool = True,
                           cpu: str | None = None) -> dict[str, Any]:
    """How closely onnxruntime (CPU) running ``onnx_model`` agrees with ``model``'s integer reference on ``inputs``.

    Agreement is measured on integer codes: at every quantizer (the QuantizeLinear output, exposed as an extra
    output, its zero point taken off) and at every integer program output (an int32 accumulator, or codes: the
    ONNX output divided by the reference's per-channel scale). Each gets ``elements``, ``exact`` (the fraction of
    elements with the same code), ``within_1_lsb`` (off by at most one) and ``max_lsb``, measured **stepwise**: the
    reference is re-run with onnxruntime's codes substituted at every quantizer, so each quantizer's numbers judge
    its own requantisation step. The same three with the prefix ``end_to_end_`` compare with the reference run on
    its own: what a user deploying the file gets, and what the contract bounds (:func:`check_agreement`).
    ``overall`` pools every quantizer's elements; ``outputs`` adds ``max_abs_error`` and ``max_abs_reference`` (end
    to end). Final outputs come from a session of the model as written; the codes from a second session with the
    extra outputs. ``optimize=False`` disables onnxruntime's graph optimisations in both; ``cpu`` runs both on an
    emulated CPU (see the module docstring). ``result["cpu"]`` says which CPU ran them.
    """
    program = IntegerProgram.of(model)
    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model))
    quantizers = read_metadata(onnx_model)["quantizers"]
    missing = sorted(set(quantizers) - {node.name for node in program.nodes if node.op == "quantize"})
    if missing:
        raise MpqcError(f"the ONNX model was not exported from this program: it has quantizers {missing[:5]} "
                        "that the program lacks")
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    names = [node.name for node in program.nodes if node.op == "input"]
    feeds = {name: x.detach().float().contiguous().numpy() for name, x in zip(names, inputs)}

    code_names = [q["tensor"] for q in quantizers.values()]
    final, codes = run_models([(onnx_model, program.outputs),
                               (_with_codes_as_outputs(onnx_model, code_names), [f"{n}.int32" for n in code_names])],
                              feeds, optimize=optimize, cpu=cpu)
    outputs = dict(zip(program.outputs, final))
    onnx_codes = {name: torch.from_numpy(values.astype(np.int64) - int(info.get("zero_point", 0)))
                  for (name, info), values in zip(quantizers.items(), codes)}

    reference = program.run_all(*inputs)
    stepwise: dict[str, Tensor | IntValue] = {name: x.float() for name, x in zip(names, inputs)}
    stepwise_codes: dict[str, Tensor] = {}  # the reference's codes computed from onnxruntime's codes upstream
    for node in program.nodes:
        if node.op != "input":
            value = program.step(node, stepwise)
            if node.name in onnx_codes:
                stepwise_codes[node.name] = value.q
                value = IntValue(onnx_codes[node.name], value.scale)
            stepwise[node.name] = value

    result: dict[str, Any] = {"cpu": f"emulated {cpu}" if cpu else describe_cpu(), "quantizers": {}, "outputs": {}}
    pooled_step, pooled_e2e = [], []
    for name, info in quantizers.items():
        step, e2e = onnx_codes[name] - stepwise_codes[name], onnx_codes[name] - reference[name].q
        result["quantizers"][name] = {"bits": info["bits"], "signed": info["signed"], "elements": step.numel(),
                                      **_agreement(step.numpy()), **_agreement(e2e.numpy(), "end_to_end_")}
        pooled_step.append(step.reshape(-1))
        pooled_e2e.append(e2e.reshape(-1))
    step, e2e = (torch.cat(pooled).numpy() if pooled else np.zeros(0) for pooled in (pooled_step, pooled_e2e))
    result["overall"] = {"elements": step.size, **_agreement(step), **_agreement(e2e, "end_to_end_")}
    ops = {node.name: node.op for node in program.nodes}
    for name, out in outputs.items():
        ref = reference[name]
        exact = ref.q.double() * ref.scale if isinstance(ref, IntValue) else ref.double()
        stats: dict[str, Any] = {"elements": out.size, "max_abs_error": float(np.abs(out - exact.numpy()).max()),
                                 "max_abs_reference": float(exact.abs().max()),
                                 "accumulator": ops[name] in LAYER_OPS}
        step, e2e = _output_lsb(out, stepwise[name]), _output_lsb(out, ref)
        if step is not None and e2e is not None:
            stats.update(**_agreement(step), **_agreement(e2e, "end_to_end_"))
        result["outputs"][name] = stats
    return result


def contract_violations(agreement: dict[str, Any]) -> list[str]:
    """Where ``agreement`` (from :func:`compare_with_reference`) breaks the contract, one line each (empty: kept).

    **Stepwise**, per tensor: every quantizer's codes and every integer output within 1 LSB of the reference on >=
    :data:`AGREEMENT_FLOOR` of their elements, codes never off by more than 1 (each step computed from the same
    input codes, so a kernel that saturates or computes differently shows here, at the tensor at fault: the u8 x s8
    saturation on AVX2 CPUs broke the stepwise output by up to 18,452 LSB). **End to end**, pooled over every
    quantizer's codes (the file as a user runs it): within 1 LSB on >= :data:`AGREEMENT_FLOOR`.

    Per tensor, end-to-end numbers are reported but not judged. onnxruntime requantises in its own way, which the
    contract allows to differ by 1 LSB at a rounding tie; in a deep net at low bits one such flip moves later codes
    by more (measured, bench/onnx_cpus.json: ResNet-18 at random 2-8 bits on an AVX2 CPU, 1 code in 150,000 flipped
    in ``layer4`` left 94.6% of the last quantizer's codes within 1 LSB, 99.92% of all codes), and an int32
    accumulator output moves by ``|w|`` LSBs for each flipped input code."""
    problems = []
    for kind, entries in (("quantizer", agreement["quantizers"]), ("output", agreement["outputs"])):
        for name, stats in entries.items():
            if "within_1_lsb" not in stats:
                continue  # a float output: judged by the codes that feed it
            if stats["within_1_lsb"] < AGREEMENT_FLOOR or (kind == "quantizer" and stats["max_lsb"] > 1):
                problems.append(f"{kind} {name}, stepwise: {stats['within_1_lsb']:.4%} within 1 LSB, "
                                f"max {stats['max_lsb']:.3g} LSB")
    overall = agreement["overall"]
    if overall["end_to_end_within_1_lsb"] < AGREEMENT_FLOOR:
        problems.append(f"all quantizers, end to end: {overall['end_to_end_within_1_lsb']:.4%} within 1 LSB, "
                        f"max {overall['end_to_end_max_lsb']:.3g} LSB")
    return problems


def check_agreement(agreement: dict[str, Any], *, what: str = "the ONNX model") -> None:
    """Raise :class:`OnnxMismatchError` naming every quantizer and output where ``agreement`` breaks the
    contract (:func:`contract_violations`), and the CPU it was measured on."""
    problems = contract_violations(agreement)
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise OnnxMismatchError(
            f"onnxruntime running {what} on {agreement.get('cpu', 'this CPU')} disagrees with the integer reference "
            f"(the contract asks >= {AGREEMENT_FLOOR:.1%} of the codes within 1 LSB, end to end):\n  "
            + "\n  ".join(shown))


def format_agreement(agreement: dict[str, Any]) -> str:
    """A few lines for a terminal: the CPU, overall agreement, the worst quantizer, each output."""
    def line(label: str, s: dict[str, Any]) -> str:
        return (f"{label}: {s['within_1_lsb']:.4%} within 1 LSB, {s['exact']:.4%} exact, max {s['max_lsb']:.3g} LSB "
                f"over {s['elements']} elements (end to end: {s['end_to_end_within_1_lsb']:.4%}, "
                f"{s['end_to_end_exact']:.4%}, max {s['end_to_end_max_lsb']:.3g})")

    lines = [f"onnxruntime on {agreement.get('cpu', 'this CPU')}", line("all quantizers", agreement["overall"])]
    if agreement["quantizers"]:
        worst = min(agreement["quantizers"], key=lambda n: (agreement["quantizers"][n]["end_to_end_within_1_lsb"],
                                                            agreement["quantizers"][n]["within_1_lsb"],
                                                            agreement["quantizers"][n]["exact"]))
        lines.append(line(f"worst quantizer {worst}", agreement["quantizers"][worst]))
    for name, stats in agreement["outputs"].items():
        if "exact" in stats:
            lines.append(line(f"output {name}", stats))
        lines.append(f"output {name}: max |onnxruntime - reference| = {stats['max_abs_error']:.3g} "
                     f"(reference max |value| {stats['max_abs_reference']:.3g})")
    return "\n".join(lines)
