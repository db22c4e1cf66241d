"""Build: a frozen program -> Relax (``lowering.build_module``) -> ``tvm.compile`` with schedules
(:func:`compile_module`) -> a :class:`~mpqc.targets.tvm.runtime.LoweredModule` and, with ``out=``, its artifact.
:func:`lower` is the TVM target's entry point; the package docstring says what the lowered module guarantees.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpqc.cpu import isa_flags
from mpqc.errors import ConfigError
from mpqc.reference import IntegerProgram
from mpqc.targets.tvm.kernels import registry
from mpqc.targets.tvm.lowering import BuiltModule, build_module
from mpqc.targets.tvm.runtime import LoweredModule
from mpqc.targets.tvm.target import resolve_target
from mpqc.targets.tvm.weights import PACKED_WEIGHTS, UNPACK_FUNCTION

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "mpqc-tvm-artifact/2"


def lower(program_or_compiled, *, target: Any = "llvm", out: str | Path | None = None,
          input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None, trials: int = 0,
          tuning_db: str | Path | None = None, expose: Sequence[str] = (), vnni: bool | None = None,
          isa: str = "auto") -> LoweredModule:
    """Compile a frozen program (an :class:`IntegerProgram` or a ``CompiledModel``) with TVM.

    ``target``: ``"llvm"`` (this host, features from /proc/cpuinfo), ``"cuda"`` (sm_80), ``"cuda:sm_90"``, a target
    dict or a ``tvm.target.Target``. ``input_shape``: the static input shape (a list of shapes for several inputs);
    taken from a ``CompiledModel``'s report (its first layer's input shape, batch 1) when omitted. ``out``: also export the artifact
    there. ``expose``: node names whose values ``LoweredModule.exposed`` returns (the 8-bit codes of quantize nodes).
    ``trials``/``tuning_db`` (llvm): ``trials`` MetaSchedule trials over the functions other than the VNNI kernels,
    recorded in the database directory ``tuning_db``, whose best schedules are applied (``trials=0`` with a
    ``tuning_db``: reuse earlier tuning); with a ``tuning_db`` the VNNI kernels' register tiles are measured once
    per convolution geometry and recorded there too (``vnni_tiles.json``, ``schedule.py``).
    ``isa``: the conv2d/linear kernels (``kernels/registry.py``): ``"auto"`` (default) the best the target has
    (``amx``, else ``avx512vnni``, else ``avxvnni``, else ``avx2``, else TVM's own operators), or forced: ``"amx"``
    (convs whose input channels fill 64-byte tile rows on AMX, the other layers on AVX-512 VNNI), ``"avx512vnni"``,
    ``"avxvnni"``, ``"avx2"`` (on an AVX-512 target these two build for ``x86-64-v3``, plus ``avxvnni`` for the
    first, so the module holds no AVX-512 instruction), ``"generic"``. A forced ISA the target lacks is refused
    (naming the /proc/cpuinfo flags this CPU lacks); a module built for an explicit target whose ISA this CPU lacks
    is built (and exported) but refuses to run here (``meta["cpu_flags"]``, checked by the artifact's loader too),
    and refuses a ``tuning_db`` (tuning measures on this CPU).
    ``vnni`` (the older switch): True forces ``avx512vnni``, False ``generic``; ``None`` (default) leaves ``isa``.
    """
    program, compiled = _program_and_compiled(program_or_compiled)
    shapes = _input_shapes(input_shape, compiled)
    tvm_target = resolve_target(target)
    kind = tvm_target.kind.name
    if kind not in ("llvm", "cuda"):
        raise ConfigError(f"target kind {kind!r}: the TVM lowering supports llvm and cuda")
    if trials < 0:
        raise ConfigError(f"trials must be >= 0, got {trials}")
    if (trials or tuning_db is not None) and kind != "llvm":
        raise ConfigError("MetaSchedule tuning (trials, tuning_db) is implemented for llvm only (a CUDA target "
                          "cannot be measured on this machine)")
    if trials and tuning_db is None:
        raise ConfigError("trials > 0 needs a tuning_db directory to keep the tuning records in")
    if kind != "llvm" and (isa not in ("auto", "generic") or vnni):
        raise ConfigError(f"isa={isa!r}/vnni={vnni}: the x86 int8 kernels are for llvm targets, not {kind}")
    isa = registry.resolve_isa(tvm_target, isa, vnni) if kind == "llvm" else "generic"
    if tuning_db is not None:  # register tiles and MetaSchedule candidates are timed here
        registry.check_runnable(isa, f"tuning into tuning_db={str(tuning_db)!r}")
    tvm_target = registry.isa_target(tvm_target, isa)
    started = time.perf_counter()
    built = build_module(program, shapes, mode=kind, expose=expose, isa=isa)
    for reason in built.inexact:
        log.warning("not guaranteed bit-exact: %s", reason)
    stats: dict[str, int] = {}
    executable = compile_module(built.mod, tvm_target, trials=trials, tuning_db=tuning_db, stats=stats)
    if stats.get("kernels", 0) < stats.get("kernel_functions", 0):
        log.warning("%d of %d %s kernel functions could not be tensorized and run unscheduled (still exact)",
                    stats["kernel_functions"] - stats["kernels"], stats["kernel_functions"], isa)
    seconds = time.perf_counter() - started
    lowered = LoweredModule(executable=executable, target=tvm_target, params=built.params,
                            packed_weights=built.packed, ir_module=built.mod, build_seconds=seconds,
                            inexact=built.inexact, schedules=stats,
                            meta={**_metadata(program, shapes, built, tvm_target, expose), "isa": isa,
                                  "cpu_flags": isa_flags(isa)})
    if out is not None:
        lowered.export(out)
    return lowered


def compile_module(mod, target, *, schedule: bool = True, trials: int = 0, tuning_db: str | Path | None = None,
                   stats: dict | None = None):
    """``tvm.compile`` with schedules: on CUDA dlight's GPU rules (TVM's CUDA default pipeline); on CPU the VNNI
    kernels' hand schedule, the MetaSchedule database ``tuning_db`` (after ``trials`` trials of tuning) and, for
    the rest, :func:`mpqc.targets.tvm.schedule.default_cpu_rule` (``schedule=False``: TVM's unscheduled CPU code,
    VNNI kernels included)."""
    import tvm

    from mpqc.targets.tvm.schedule import cpu_pipeline

    with target:
        if target.kind.name == "llvm":
            pipeline = cpu_pipeline(target, trials=trials, tuning_db=None if tuning_db is None else str(tuning_db),
                                    schedule=schedule, stats=stats)
            return tvm.compile(mod, target=target, relax_pipeline=pipeline)
        return tvm.compile(mod, target=target)


def _program_and_compiled(obj) -> tuple[IntegerProgram, Any]:
    """The program to lower, and the CompiledModel it came from (its report gives the input shape), if any."""
    program = IntegerProgram.of(obj)
    return program, obj if getattr(obj, "report", None) is not None else None


def _input_shapes(input_shape, compiled) -> list[tuple[int, ...]]:
    if input_shape is None and compiled is not None:
        from mpqc.targets.onnx import input_shape_from_report  # (1, *first layer's input shape) from the report

        input_shape = input_shape_from_report(compiled)
    if input_shape is None:
        raise ConfigError("input_shape is required (the report does not tell it), e.g. input_shape=(1, 3, 224, 224)")
    shapes = list(input_shape)
    if shapes and all(isinstance(d, (int, np.integer)) for d in shapes):
        shapes = [shapes]
    try:
        return [tuple(int(d) for d in shape) for shape in shapes]
    except (TypeError, ValueError):
        raise ConfigError(f"input_shape {input_shape!r} must be a shape or a list of shapes of ints") from None


def _metadata(program: IntegerProgram, shapes, built: BuiltModule, target, expose) -> dict[str, Any]:
    inputs = [node for node in program.nodes if node.op == "input"]
    ret = built.mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]

    def quantizers_of(name: str) -> list[dict[str, Any]]:
        return [{"name": node.name, "module": node.attrs.get("module"), "bits": node.attrs["bits"],
                 "signed": node.attrs["signed"], "scale": node.attrs["scale"]}
                for node in program.nodes if node.op == "quantize" and node.inputs == [name]]

    weights = built.weights
    return {
        "format": ARTIFACT_FORMAT,
        "target": str(target),
        "library": "model.so",
        "params_file": "params.bin",
        "inputs": [{"name": node.name, "shape": list(shape), "dtype": "float32", "quantizers": quantizers_of(node.name)}
                   for node, shape in zip(inputs, shapes)],
        "outputs": [{"name": name, "shape": [int(d) for d in fields[i].shape], "dtype": str(fields[i].dtype)}
                    for i, name in enumerate(program.outputs)],
        "exposed": list(expose),
        "params": built.param_names,
        "weights": {
            "packed": PACKED_WEIGHTS,
            "unpack": UNPACK_FUNCTION,
            "names": [spec.name for spec in weights],
            "storage": "every weight bit-packed at its own bit-width in one uint8 array (weights.py), "
                       "unpacked by the module's unpack_weights once at load; biases int32",
            "packed_bytes": int(built.packed.size),
            "bits_over_8": sum(spec.bits * spec.count for spec in weights) / 8,
            "layers": {spec.name: {"bits": spec.bits, "shape": list(spec.shape), "layout": spec.layout,
                                   "offset": spec.offset, **({"kernel_width": spec.kernel_width}
                                                             if spec.kernel_width else {})} for spec in weights},
        },
        "vnni_layers": built.vnni_layers,
        "kernel_layers": built.kernel_layers,
        "layers": {module: {"weight_bits": w, "activation_bits": a} for module, (w, a) in program.layer_bits().items()},
        "layer_nodes": {node.attrs["module"]: node.name for node in program.layers()},
        "inexact": list(built.inexact),
    }
