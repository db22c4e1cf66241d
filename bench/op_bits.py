"""Per-op bit sweep (issue 14): every op of the integer program, TVM vs the reference bit-exact and onnxruntime
within 1 LSB, at uniform bit-widths 2..8.

The op registry (``mpqc/ops/``) is walked for every program op (``OpDef.names``). The models are the tests' own
(``tests/test_ops_arith.py``, ``test_ops_movement.py``, ``test_tvm.py``, ``test_ops_transformer.py``) plus a chain
of every lookup-table function; the fewest of them that together hold every op are chosen (greedy cover of the
program ops each one's integer program holds). Each chosen model is quantized (DQ), every learnable quantizer
(weights, activations, operands) set to ``b`` bits (``tests/conftest.set_bits``), frozen, and checked at
``b = 2..8``:

* **TVM** (llvm, this host's kernels): the codes of every quantizer and every output equal to the reference's;
* **onnxruntime**: ``compare_with_reference``'s stepwise and end-to-end LSB differences at every quantizer.

Per op and bit-width the table holds the verdict of the quantizers right after the op's nodes (the first quantize
node on every path from them, or the program output they reach): ``tvm_exact`` (all equal), ``onnx_step_max_lsb``
and ``onnx_e2e_max_lsb`` (largest differences), and the models it was measured in. Quantizers that are not
learnable (the ``residual_bits`` ones and a model's input quantizer where fixed) keep their bits.

Usage::

    OMP_WAIT_POLICY=PASSIVE TVM_NUM_THREADS=1 python3 bench/op_bits.py [--bits 2,3,4,5,6,7,8] [--models a,b]
        [--out bench/results/op_bits.json]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]  # this checkout's mpqc; the tests' models

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mpqc import ops, pipeline  # noqa: E402
from mpqc.budgets import WeightMemory  # noqa: E402
from mpqc.config import QuantizerConfig  # noqa: E402
from mpqc.passes.freeze import freeze  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402
from mpqc.reference import IntegerProgram  # noqa: E402

BITS = tuple(range(2, 9))
#: Program ops with no numerics of their own to sweep: graph inputs (every model has one) and quantize nodes
#: (judged as the quantizers after every other op).
BOOKKEEPING = ("input", "quantize")


class Lookups(nn.Module):
    """Every lookup-table function of ``tests/test_lookup.py`` in a chain of 1x1 convs (each table's input is a
    conv's accumulator, quantized)."""

    def __init__(self) -> None:
        super().__init__()
        from test_lookup import ACTS

        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.acts = nn.ModuleList(ACTS)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in ACTS)

    def forward(self, x):
        x = self.stem(x)
        for act, conv in zip(self.acts, self.convs):
            x = conv(act(x))
        return x


def candidates() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]]]]:
    """name -> (model builder, example inputs): the tests' models that exercise the registry's ops."""
    import test_ops_arith
    import test_ops_movement
    import test_ops_transformer
    import test_tvm

    def randn(shape):
        return lambda: (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)

    models: dict[str, Any] = {}
    for source, table in (("arith", test_ops_arith.MODELS), ("movement", test_ops_movement.MODELS)):
        for name, (build, shape) in table.items():
            models[f"{source}.{name}"] = (build, randn(shape))
    for name, shape in (("_LessCommonOps", (2, 3, 16, 16)), ("_Conv1d", (2, 2, 16)), ("_Reductions", (2, 3, 8, 8)),
                        ("_PaddedPools", (2, 3, 9, 9))):  # (the shapes the tests run them at)
        models[f"tvm.{name.strip('_')}"] = (getattr(test_tvm, name), randn(shape))
    models["lookups"] = (Lookups, randn((2, 3, 8, 8)))
    models["transformer.tiny_encoder"] = (test_ops_transformer.TinyEncoder, test_ops_transformer._tiny_inputs)
    models["transformer.tiny_bert"] = (  # HF's padding mask and its constants
        lambda: test_ops_transformer.tiny_bert(layers=1),
        lambda: dict(zip(("input_ids", "attention_mask"), test_ops_transformer.bert_inputs())))
    return models


#: Always swept: every lookup-table function (one program op, eleven tables).
ALWAYS = ("lookups",)


def program_at(build, inputs, bits: int) -> tuple[IntegerProgram, tuple[torch.Tensor, ...]]:
    """``build()`` quantized on ``inputs`` (a tuple, or a dict of keyword inputs; DQ), every learnable quantizer at
    ``bits``, frozen: the program and its positional inputs."""
    from conftest import randomize_batchnorm, set_bits

    torch.manual_seed(0)
    gm, _ = pipeline.trace(randomize_batchnorm(build()).eval(), inputs)
    positional = pipeline.positional_inputs(gm, inputs)
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), positional)
    set_bits(gm, lambda name: bits)
    return IntegerProgram.from_graph(freeze(gm, WeightMemory(1e12)).eval()), positional


def program_ops() -> list[str]:
    """Every op name of the integer program the registry defines (bookkeeping ones left out)."""
    return sorted(name for op in ops.all_ops() for name in op.names if name not in BOOKKEEPING)


def cover(programs: dict[str, IntegerProgram], always: tuple[str, ...] = ALWAYS) -> list[str]:
    """``always``, then the fewest models (greedy) whose programs together hold every op any of them holds."""
    held = {name: {node.op for node in program.nodes} - set(BOOKKEEPING) for name, program in programs.items()}
    chosen = [name for name in always if name in held]
    left = set().union(*held.values()) - set().union(*(held[name] for name in chosen))
    while left:
        best = max(held, key=lambda name: (len(held[name] & left), -len(chosen)))
        chosen.append(best)
        left -= held[best]
    return chosen


def judged_after(program: IntegerProgram) -> dict[str, set[str]]:
    """Per node, the quantize nodes (or program outputs) that first follow it on every path."""
    users: dict[str, list[str]] = {}
    for node in program.nodes:
        for source in node.inputs:
            users.setdefault(source, []).append(node.name)
    quantizers = {node.name for node in program.nodes if node.op == "quantize"}
    after: dict[str, set[str]] = {}
    for node in program.nodes:
        seen, frontier, found = set(), list(users.get(node.name, [])), set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in quantizers:
                found.add(name)
            else:
                frontier += users.get(name, [])
                if name in program.outputs:
                    found.add(name)
        if node.name in program.outputs:
            found.add(node.name)
        after[node.name] = found
    return after


def check(program: IntegerProgram, inputs: tuple[torch.Tensor, ...], directory: Path) -> dict[str, dict[str, Any]]:
    """Per quantizer / output: TVM equal to the reference, onnxruntime's stepwise and end-to-end LSB differences."""
    from mpqc.targets import tvm as mtvm
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import compare_with_reference

    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    shapes = [tuple(x.shape) for x in inputs]
    lowered = mtvm.lower(program, input_shape=shapes if len(shapes) > 1 else shapes[0], expose=quantizers)
    floats = [x.float() if x.is_floating_point() else x for x in inputs]
    env, codes = program.run_all(*inputs), lowered.exposed(*floats)
    outputs = lowered(*floats)
    outputs = list(outputs.values()) if isinstance(outputs, dict) else (
        [outputs] if isinstance(outputs, torch.Tensor) else list(outputs))
    reference = program.run(*inputs)
    reference = list(reference.values()) if isinstance(reference, dict) else (
        [reference] if isinstance(reference, torch.Tensor) else list(reference))
    verdicts: dict[str, dict[str, Any]] = {}
    for name in quantizers:
        verdicts[name] = {"tvm_exact": bool(torch.equal(torch.from_numpy(codes[name]).to(torch.int64), env[name].q))}
    for name, got, expected in zip(program.outputs, outputs, reference):
        verdicts.setdefault(name, {})["tvm_exact"] = bool(torch.equal(got, expected))
    exported = export_onnx(program, directory / "model.onnx", input_shapes=shapes)
    agreement = compare_with_reference(program, exported.path, inputs)
    for table in (agreement["quantizers"], agreement["outputs"]):
        for name, stats in table.items():
            if "max_lsb" in stats:
                verdicts.setdefault(name, {}).update(onnx_step_max_lsb=stats["max_lsb"],
                                                     onnx_e2e_max_lsb=stats["end_to_end_max_lsb"])
            elif name in verdicts:  # a float output: its absolute error
                verdicts[name]["onnx_max_abs_error"] = stats["max_abs_error"]
    return verdicts


def sweep(models: list[str], bits: tuple[int, ...], log=print) -> dict[str, Any]:
    table = candidates()
    per_op: dict[str, dict[str, dict[str, Any]]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for model in models:
        build, example = table[model]
        for b in bits:
            start = time.perf_counter()
            key = f"{model}@{b}"
            try:
                program, inputs = program_at(build, example(), b)
                with tempfile.TemporaryDirectory(prefix="mpqc-opbits-") as directory:
                    verdicts = check(program, inputs, Path(directory))
            except Exception as error:  # noqa: BLE001 - recorded per model and bits
                runs[key] = {"error": f"{type(error).__name__}: {str(error)[:400]}",
                             "seconds": round(time.perf_counter() - start, 1)}
                log(f"[op_bits] {key}: {runs[key]['error']}")
                continue
            after = judged_after(program)
            for node in program.nodes:
                if node.op in BOOKKEEPING:
                    continue
                judged = [verdicts[name] for name in after[node.name] if name in verdicts]
                entry = per_op.setdefault(node.op, {}).setdefault(str(b), {
                    "tvm_exact": True, "onnx_step_max_lsb": 0.0, "onnx_e2e_max_lsb": 0.0, "nodes": 0, "models": []})
                entry["nodes"] += 1
                entry["judged_tensors"] = entry.get("judged_tensors", 0) + len(judged)
                if model not in entry["models"]:
                    entry["models"].append(model)
                for verdict in judged:
                    entry["tvm_exact"] &= verdict.get("tvm_exact", True)
                    for key_ in ("onnx_step_max_lsb", "onnx_e2e_max_lsb"):
                        entry[key_] = max(entry[key_], verdict.get(key_, 0.0))
            runs[key] = {"seconds": round(time.perf_counter() - start, 1),
                         "tvm_exact": all(v.get("tvm_exact", True) for v in verdicts.values()),
                         "onnx_step_max_lsb": max((v.get("onnx_step_max_lsb", 0.0) for v in verdicts.values()),
                                                  default=0.0)}
            log(f"[op_bits] {key}: {runs[key]}")
    return {"ops": per_op, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default=",".join(map(str, BITS)))
    parser.add_argument("--models", default=None, help="comma-separated candidate names (default: a greedy cover)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "op_bits.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bits = tuple(int(b) for b in args.bits.split(","))
    table = candidates()
    if args.models:
        models = args.models.split(",")
    else:
        programs = {}
        for name, (build, example) in table.items():
            try:
                programs[name] = program_at(build, example(), 8)[0]
            except Exception as error:  # noqa: BLE001
                print(f"[op_bits] candidate {name} does not build: {type(error).__name__}: {error}")
        models = cover(programs)
    print(f"[op_bits] models: {models}", flush=True)
    result = sweep(models, bits, log=lambda line: print(line, flush=True))
    wanted = program_ops()
    missing = [op for op in wanted if op not in result["ops"]]
    failing = {op: sorted(b for b, e in per_bits.items() if not e["tvm_exact"] or e["onnx_step_max_lsb"] > 1)
               for op, per_bits in result["ops"].items()}
    payload = {"format": "mpqc-op-bits/1", "bits": list(bits), "models": models, "program_ops": wanted,
               "not_covered": missing, "failing": {op: b for op, b in failing.items() if b},
               "settings": {"method": "dq", "tvm_target": "llvm (host)", "torch": torch.__version__,
                            "host": _host()}, **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(format_table(payload))
    return 1 if payload["failing"] or missing else 0


def _host() -> str:
    from mpqc.targets.onnx_check import describe_cpu

    return describe_cpu()


def format_table(payload: dict[str, Any]) -> str:
    """op x bits: ``=`` TVM bit-exact and onnxruntime exact stepwise, ``1`` within 1 LSB, ``X`` otherwise. (An
    integer output is compared dequantized: its difference in LSBs is fractional, ~1e-5 from the fp32 product; below
    half an LSB it is exact.)"""
    bits = payload["bits"]
    lines = ["op".ljust(18) + " ".join(str(b) for b in bits)]
    for op in payload["program_ops"]:
        per_bits = payload["ops"].get(op, {})
        cells = []
        for b in bits:
            e = per_bits.get(str(b))
            cells.append("." if e is None else "X" if not e["tvm_exact"] or e["onnx_step_max_lsb"] > 1
                         else "=" if e["onnx_step_max_lsb"] < 0.5 else "1")
        lines.append(op.ljust(18) + " ".join(cells))
    return "\n".join(lines + ["(= exact everywhere, 1 onnxruntime within 1 LSB, X beyond, . not covered)"])


if __name__ == "__main__":
    sys.exit(main())
