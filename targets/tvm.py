"""Lower an integer program to Apache TVM (Relax + TIR), bit for bit equal to the reference.

>>> lowered = lower(compiled, target="llvm", input_shape=(1, 1, 28, 28), out="artifacts/r20")   # doctest: +SKIP
>>> lowered(images)            # fp32 outputs, torch.equal to compiled.program.run(images)            # doctest: +SKIP
>>> lower(compiled, target="cuda:sm_90", input_shape=(1, 1, 28, 28)).source()[:80]                    # doctest: +SKIP

*Matches*: every node of an :class:`~mpqc.reference.IntegerProgram` through its op family in the registry
(``mpqc/ops/``: ``OpDef.relax``, ``relax_check``); nodes whose op has no converter, or whose attributes the converter refuses (more than 8 bits,
a 16-bit activation, ...), raise one :class:`~mpqc.errors.UnsupportedOpError` listing every such node.

*Rewrites to* one Relax function ``main(x_0, ..., <node>.weight, <node>.bias, ...)`` built with
``relax.BlockBuilder`` and ``relax.op``, mirroring ``mpqc.reference`` value for value, and a second function
``unpack_weights(packed) -> (weights...)`` (below, *Artifact*):

* ``quantize`` -> its requantisation region (the node's ``region``: leaves, then steps, each op's
  ``relax_requantize_step``) in fp32, then round half to even, ``clip`` to the b-bit range and a
  cast to ``int8`` (signed) or ``uint8`` (``_round_clip_te``: ``llvm.roundeven`` on CPU, which vectorizes where
  Relax ``round``'s ``nearbyint`` did not; Relax ``round`` -> ``nearbyintf`` on CUDA; both checked on ties).
  The per-channel multipliers ``M = fp32(float64(s_in) / float64(s_out))`` are computed on the host with the
  reference's own torch float64 expressions and embedded as fp32 constants.
* ``conv2d`` (groups 1) / 2-D ``linear`` on an llvm target with AVX512-VNNI or AVX2 (the kernel table
  ``targets/tvm_kernels.py``, asked per layer; ``lower(..., isa=)`` / ``vnni=`` force a choice): the implicit-GEMM
  kernel of ``targets/tvm_vnni.py`` on NHWC uint8 codes (a signed input is shifted by the kernel's shift, VNNI
  128, AVX2 ``2^(bits-1)``, and ``shift * sum(w)`` is subtracted from the int32 bias, exactly) with the weights
  packed ``[Co/16, KH*KW*C/4, 16, 4]``, tensorized by a hand schedule with ``vpdpbusd`` (VNNI) or the AVX2
  micro-kernels of ``targets/tvm_avx2.py`` (narrow, wide or int16 multi-step, from the layer's bits). The
  accumulator stays NHWC, and so does everything computed from it elementwise (requantisation, ReLU, clamps, residual adds, max pooling,
  integer global pooling); the converters that need the program's NCHW layout (flatten, cat, average pooling,
  fp32 global mean, TVM's own convs, the outputs) transpose back first (``_Lowering.in_layout``).
* other ``conv1d`` / ``conv2d`` (grouped and depthwise too) / ``linear``, and every layer on other targets ->
  ``conv1d`` / ``conv2d`` / ``matmul`` on the 8-bit codes and int8 weights with ``out_dtype="int32"``, plus the
  int32 bias: the exact accumulator.
* ``relu``, max pools, ``identity`` and data movement (``mpqc/ops/movement.py``) on integers stay integer;
  ``global_avg_pool``, ``adaptive_avg_pool`` and ``avg_pool2d`` (any padding, ``ceil_mode``), ``mean``/``sum``
  on integers are int sums (int32, or int64 when summing int32 accumulators), scaled per position by PyTorch's
  divisor.
* every fp32 product is an *exact multiply* (``_exact_mul_te``): TVM's LLVM backend builds with
  ``AllowFPOpFusion=Fast`` (hard-coded in ``llvm_instance.cc``; no target option turns it off), so ``a*b + c``
  becomes one FMA with a single rounding (a quarter of such sums changed in a test here). The product is
  wrapped in ``llvm.arithmetic.fence`` (free at run time; the backend may not contract across it). On CUDA,
  where nvcc contracts too, the product is ``__fmul_rn``, which is never contracted.
* float ``global_avg_pool`` (on a dequantized value, e.g. MobileNetV2's last ReLU6) reproduces PyTorch's CPU
  summation order (``at::mean`` -> ``cascade_sum``: 8-lane vector accumulators, 4-way ILP) as an unrolled add
  tree, then divides by the count; checked equal to ``F.adaptive_avg_pool2d`` for windows up to 1000 elements.
  Larger windows lower to the same tree but are flagged in ``LoweredModule.inexact``. Float ``avg_pool2d`` sums
  each window in order then divides, as ATen's CPU kernel does.

*Requires*: a frozen program (8-bit storage activations feeding every layer), static input shapes.

*Ensures* (``tests/test_tvm.py``): on llvm, the dequantized outputs and the 8-bit codes of every quantize node
are ``torch.equal`` to ``IntegerProgram.run_all`` on ResNet-20, torchvision ResNet-18 and MobileNetV2 at mixed
2-8 bits (and on small models covering the other converters); the CPU code holds no FMA instruction; the exported
artifact runs in a process where torch and mpqc cannot be imported; the CUDA module compiles for sm_80 and sm_90
and its kernels accumulate in int32. Every schedule (default rule, dlight, MetaSchedule records) only reorders
loops (the VNNI kernels: exact int32 dot products, tested against float64 convolutions), so these hold after
tuning too (re-checked by the slow tuning test); with and without VNNI (a target lacking the feature).

*Artifact* (``out=DIR``): ``model.so`` (``Executable.export_library``, both functions), ``params.bin``
(``tvm.runtime.save_param_dict``: ``weights.packed``, every weight bit-packed at its own bit-width in one uint8
array, within one byte per layer of ``sum(bits * params) / 8`` (``targets/tvm_weights.py``), and the int32
biases), ``model.json`` (inputs, outputs, parameter order, the packed weights' layout, input quantizer
scale/bits, per-layer bits, the VNNI layers, target) and ``loader.py`` (the runtime-only loader in
``LOADER_SOURCE``). The weights are unpacked inside the module: ``unpack_weights`` runs once when the artifact is
loaded (``loader.load``, or the first call of a ``LoweredModule``) and its outputs are ``main``'s weight arguments
from then on, so an inference costs no unpacking.

Threads: TVM's runtime here starts one worker unless ``TVM_NUM_THREADS`` is set before the first run; set it to the
number of physical cores.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpqc import ops
from mpqc.cpu import cpu_flags
from mpqc.errors import ConfigError, MpqcError, UnsupportedOpError
from mpqc.reference import IntegerProgram, IntNode
from mpqc.targets import tvm_kernels
from mpqc.targets.tvm_vnni import ConvGeometry, conv2d_te
from mpqc.targets.tvm_weights import WeightLayout, pack_bits, packed_size, place, unpack_te

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "mpqc-tvm-artifact/2"
PACKED_WEIGHTS = "weights.packed"  # params.bin entry holding every weight, bit-packed (targets/tvm_weights.py)
UNPACK_FUNCTION = "unpack_weights"  # the module's function that unpacks them, run once at load
DEFAULT_CUDA_ARCH = "sm_80"
# Windows up to this many elements were checked equal to PyTorch's float mean (tests and module docstring).
_CHECKED_FLOAT_MEAN_WINDOW = 1000


# --------------------------------------------------------------------------------------------- targets
def host_target() -> dict[str, Any]:
    """The llvm target of this machine: ``mcpu``/``mattr`` from the flags in ``/proc/cpuinfo`` (never hard-coded).

    x86-64 hosts get the highest ``x86-64-v2/v3/v4`` level their flags cover, plus the extensions that matter to
    int8 code (VNNI, VBMI, BF16, ...) as ``mattr``; other hosts get LLVM's generic CPU.
    """
    flags = cpu_flags()
    target: dict[str, Any] = {"kind": "llvm", "num-cores": _physical_cores()}
    if not flags:
        return target
    levels = [
        ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
        ("x86-64-v3", {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"}),
        ("x86-64-v2", {"sse4_2", "popcnt", "ssse3"}),
    ]
    for name, needed in levels:
        if needed <= flags:
            target["mcpu"] = name
            break
    extras = {  # /proc/cpuinfo flag -> LLVM feature
        "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni", "avx512vbmi": "avx512vbmi",
        "avx512_vbmi2": "avx512vbmi2", "avx512_bf16": "avx512bf16", "avx512_bitalg": "avx512bitalg",
        "avx512_vpopcntdq": "avx512vpopcntdq", "avx512ifma": "avx512ifma", "avx512_fp16": "avx512fp16",
        "gfni": "gfni", "amx_tile": "amx-tile", "amx_int8": "amx-int8",
    }
    mattr = [f"+{feature}" for flag, feature in extras.items() if flag in flags]
    if mattr and "mcpu" in target:
        target["mattr"] = mattr
    return target


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.cpu_count() or 1


def resolve_target(target: Any):
    """``"llvm"`` (this host), ``"cuda"`` (sm_80), ``"cuda:sm_90"``, a target dict or a ``tvm.target.Target``."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        spec = dict(target)
    elif isinstance(target, str):
        kind, _, arch = target.partition(":")
        if kind == "llvm" and not arch:
            spec = host_target()
        elif kind == "cuda":
            spec = {"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH}
        else:
            raise ConfigError(f"target {target!r}: expected 'llvm', 'cuda' or 'cuda:sm_XX'")
    else:
        raise ConfigError(f"target must be a string, a dict or a tvm Target, got {type(target).__name__}")
    if spec.get("kind") == "llvm" and spec == {"kind": "llvm"}:
        spec = host_target()
    if spec.get("kind") == "cuda":
        # the host side (the VM's glue, no kernels) stays generic x86-64: the GPU machine's CPU is not this one
        return tvm.target.Target(spec, host={"kind": "llvm"})
    return tvm.target.Target(spec)


# --------------------------------------------------------------------------------------------- values
NCHW, NHWC = "NCHW", "NHWC"  # a value's layout: the program's own (channels at dim 1), or channels-last (4-D only)


@dataclass
class _Int:
    """An integer value ``q * scale``: ``q`` a Relax tensor (int8/uint8/int32/int64), ``scale`` the float64 torch
    tensor the reference computes for it (same expressions, so the multipliers derived from it are the same),
    shaped to broadcast against ``q`` in ``layout``."""

    expr: Any
    scale: torch.Tensor
    layout: str = NCHW


@dataclass
class _Float:
    expr: Any
    layout: str = NCHW


_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


# --------------------------------------------------------------------------------------------- TE kernels
def _exact_mul_te(a, b, *, mode: str):
    """``a * b`` (b broadcast NumPy-style) rounded once to fp32 and never fused into an FMA with what follows."""
    from tvm import te, tirx

    rank_a, rank_b = len(a.shape), len(b.shape)

    def body(*index):
        b_index = [0 if int(b.shape[d]) == 1 else index[rank_a - rank_b + d] for d in range(rank_b)]
        x, y = a[index], b[tuple(b_index)] if rank_b else b[()]
        if mode == "cuda":
            return tirx.call_pure_extern("float32", "__fmul_rn", x, y)
        return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", x * y)

    return te.compute(a.shape, body, name="exact_mul")


def _round_clip_te(y, qmin: int, qmax: int, storage: str):
    """``clamp(round_half_even(y), qmin, qmax)`` as ``storage``. ``llvm.roundeven`` rather than Relax ``round``:
    that lowers to ``nearbyint``, which TVM's loop vectorizer cannot vectorize (it scalarised every requantisation
    loop); ``roundeven`` is the same rounding (half to even, independent of the FP environment) and vectorizes
    to ``vrndscaleps $8``."""
    from tvm import te, tirx

    low, high = tirx.const(float(qmin), "float32"), tirx.const(float(qmax), "float32")

    def body(*index):
        rounded = tirx.call_llvm_pure_intrin("float32", "llvm.roundeven", y[index])
        return tirx.min(tirx.max(rounded, low), high).astype(storage)

    return te.compute(y.shape, body, name="requantize")


def torch_sum_order(values: Sequence[Any], add: Callable[[Any, Any], Any]) -> Any:
    """Sum ``values`` in the order PyTorch's CPU ``sum``/``mean`` does for one contiguous reduced row.

    ATen's ``cascade_sum``: rows of >= 8 elements are summed as 8-lane vectors (``vectorized_inner_sum``), each lane
    with ``row_sum``'s 4-way ILP accumulators (``multi_row_sum``, cascading every 16 rows), then the scalar tail and
    the lanes are added in order; shorter rows use ``row_sum`` on scalars. ``add`` builds one fp32 addition.
    """
    vec = 8

    def plus(a, b):
        return b if a is None else a if b is None else add(a, b)

    def multi_row_sum(rows: list[list[Any]]) -> list[Any]:
        size, levels, nrows = len(rows), 4, 4
        level_power = max(4, (math.ceil(math.log2(size)) if size > 1 else 0) // levels)
        step, mask = 1 << level_power, (1 << level_power) - 1
        acc: list[list[Any]] = [[None] * nrows for _ in range(levels)]
        i = 0
        while i + step <= size:
            for j in range(step):
                for k in range(nrows):
                    acc[0][k] = plus(acc[0][k], rows[i + j][k])
            for j in range(1, levels):
                for k in range(nrows):
                    acc[j][k], acc[j - 1][k] = plus(acc[j][k], acc[j - 1][k]), None
                if i & (mask << (j * level_power)):
                    break
            i += step
        for r in range(i, size):
            for k in range(nrows):
                acc[0][k] = plus(acc[0][k], rows[r][k])
        for j in range(1, levels):
            for k in range(nrows):
                acc[0][k] = plus(acc[0][k], acc[j][k])
        return acc[0]

    def row_sum(row: Sequence[Any]) -> Any:
        ilp = len(row) // 4
        partial = multi_row_sum([[row[r * 4 + k] for k in range(4)] for r in range(ilp)])
        for i in range(ilp * 4, len(row)):
            partial[0] = plus(partial[0], row[i])
        for k in range(1, 4):
            partial[0] = plus(partial[0], partial[k])
        return partial[0]

    n = len(values)
    if n < vec:
        return row_sum(values)
    rows = n // vec
    lanes = [row_sum([values[r * vec + lane] for r in range(rows)]) for lane in range(vec)]
    total = None
    for k in range(rows * vec, n):
        total = plus(total, values[k])
    for lane in lanes:
        total = plus(total, lane)
    return total


def _float_global_avg_pool_te(x):
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in x.shape)

    def body(b, ch, i, j):
        values = [x[b, ch, k // w, k % w] for k in range(h * w)]
        return torch_sum_order(values, lambda p, q: p + q) / tirx.const(float(h * w), "float32")

    return te.compute((n, c, 1, 1), body, name="float_global_avg_pool")


def _window_sum_te(x, kernel, stride, out_dtype: str, divide: bool):
    """Sum of each ``kernel`` window (no padding), in row-major order; ``divide``: then / window (fp32 avg pool)."""
    from tvm import te, tirx

    n, c, h, w = (int(d) for d in x.shape)
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1

    def body(b, ch, i, j):
        total = None
        for u in range(kh):
            for v in range(kw):
                value = x[b, ch, i * sh + u, j * sw + v].astype(out_dtype)
                total = value if total is None else total + value
        return total / tirx.const(float(kh * kw), "float32") if divide else total

    return te.compute((n, c, oh, ow), body, name="window_avg" if divide else "window_sum")


# --------------------------------------------------------------------------------------------- converters
class _Lowering:
    """Walks the program in order, one converter per op (``OpDef.relax`` in the op registry), building the Relax functions ``main``
    and ``unpack_weights``.

    ``vnni``: conv2d/linear layers use the AVX512-VNNI kernels of ``targets/tvm_vnni.py`` and their results stay
    channels-last (NHWC) through every op that is layout-blind (requantisation, ReLU, clamps, residual adds, max
    pooling, integer global pooling); the ops that are not convert back to the program's NCHW layout first.
    """

    def __init__(self, program: IntegerProgram, input_shapes: list[tuple[int, ...]], mode: str,
                 expose: Sequence[str], vnni: bool = False, isa: str | None = None) -> None:
        from tvm import relax

        self.program = program
        self.mode = mode  # "llvm" or "cuda": how exact multiplies and rounding are spelled
        # the ISA of the conv/linear kernels (targets/tvm_kernels.py); ``vnni`` is the older switch
        self.isa = isa if isa is not None else ("avx512vnni" if vnni else "generic")
        self.vnni = self.isa == "avx512vnni"
        self.kernel_layers: dict[str, str] = {}  # layer node -> the micro-kernel block it runs on
        self.by_name = {node.name: node for node in program.nodes}
        self.bb = relax.BlockBuilder()
        self.env: dict[str, _Int | _Float] = {}
        self.param_vars: list[Any] = []
        self.param_names: list[str] = []
        self.params: dict[str, np.ndarray] = {}  # parameters stored as they are (int32 biases)
        self.weights: list[WeightLayout] = []  # parameters stored bit-packed (the layers' weights)
        self.weight_codes: dict[str, np.ndarray] = {}
        self.inexact: list[str] = []
        self.expose = list(expose)
        inputs = [node for node in program.nodes if node.op == "input"]
        if len(input_shapes) != len(inputs):
            raise ConfigError(f"the program takes {len(inputs)} input(s), got {len(input_shapes)} input shape(s)")
        self.input_vars = {node.name: relax.Var(node.name, relax.TensorType(tuple(shape), "float32"))
                           for node, shape in zip(inputs, input_shapes)}
        self._scaled_cache: dict[tuple[str, float], _Float] = {}
        self._relayout_cache: dict[tuple[Any, str], Any] = {}

    # ----------------------------------------------------------------------------- building blocks
    def emit(self, expr):
        return self.bb.emit(expr)

    def param(self, name: str, array: np.ndarray):
        from tvm import relax

        var = relax.Var(name, relax.TensorType(array.shape, str(array.dtype)))
        self.param_vars.append(var)
        self.param_names.append(name)
        self.params[name] = np.ascontiguousarray(array)
        return var

    def weight(self, node: IntNode, layout: str):
        """The parameter holding ``node``'s weight in ``layout`` (see ``targets/tvm_weights.py``); its codes are
        stored bit-packed and unpacked by ``unpack_weights``."""
        from tvm import relax

        codes = node.tensors["weight"].to(torch.int8).numpy()
        spec = WeightLayout(f"{node.name}.weight", node.name, int(node.attrs["weight_bits"]), tuple(codes.shape),
                            layout)
        var = relax.Var(spec.name, relax.TensorType(spec.kernel_shape, "int8"))
        self.param_vars.append(var)
        self.param_names.append(spec.name)
        self.weights.append(spec)
        self.weight_codes[spec.name] = codes
        return var

    def const(self, tensor: torch.Tensor):
        from tvm import relax

        return relax.const(tensor.detach().cpu().numpy())

    def mul(self, expr, factor: torch.Tensor):
        """fp32 ``expr * factor`` (factor an fp32 torch tensor, broadcast), rounded once, never contracted."""
        return self.bb.emit_te(_exact_mul_te, expr, self.const(factor.to(torch.float32)), mode=self.mode,
                               primfunc_name_hint="exact_mul")

    def to_f32(self, expr):
        from tvm.relax import op as R

        return expr if _dtype(expr) == "float32" else self.emit(R.astype(expr, "float32"))

    def relayout(self, expr, source: str, target: str):
        """``expr`` (4-D, laid out ``source``) in ``target`` layout; other ranks and equal layouts pass."""
        from tvm.relax import op as R

        if source == target or len(_shape(expr)) != 4:
            return expr
        key = (expr, target)
        if key not in self._relayout_cache:
            self._relayout_cache[key] = self.emit(R.permute_dims(expr, _TO_NHWC if target == NHWC else _TO_NCHW))
        return self._relayout_cache[key]

    def in_layout(self, value: _Int | _Float, target: str) -> _Int | _Float:
        """``value`` converted to ``target`` layout (the scale of an integer value follows its channels)."""
        if value.layout == target or len(_shape(value.expr)) != 4:
            return value
        expr = self.relayout(value.expr, value.layout, target)
        if isinstance(value, _Float):
            return _Float(expr, target)
        scale = value.scale
        if scale.dim() == 4:
            scale = scale.permute(*(_TO_NHWC if target == NHWC else _TO_NCHW))
        return _Int(expr, scale, target)

    def dequantize(self, value: _Int | _Float):
        """The reference's ``_dequantize``: ``fp32(q) * fp32(scale)`` (in the value's layout)."""
        if isinstance(value, _Float):
            return value.expr
        return self.mul(self.to_f32(value.expr), value.scale.to(torch.float32))

    def requantize_region(self, node: IntNode, s_out: float) -> _Float:
        """The value of ``node``'s requantisation region (``attrs["region"]``, built by
        ``passes/to_integer_program.py``) in units of ``s_out``: the leaves scaled, then each step's
        ``relax_requantize_step`` in order, as the reference's ``Quantize.region_value``. Shared by the quantize
        nodes of equal scale over the same values (cached)."""
        region = node.attrs["region"]
        units: dict[str, _Float] = {}
        for name in region["leaves"]:
            units[name] = self._cached((name, s_out), lambda name=name: self._scaled_leaf(name, s_out))
        for name in region["steps"]:
            step = self.by_name[name]
            units[name] = self._cached((name, s_out), lambda step=step: ops.op_named(step.op).relax_requantize_step(
                self, step, [units[i] for i in step.inputs], s_out))
        return units[node.inputs[0]]

    def _cached(self, key: tuple[str, float], build: Callable[[], _Float]) -> _Float:
        if key not in self._scaled_cache:
            self._scaled_cache[key] = build()
        return self._scaled_cache[key]

    def _scaled_leaf(self, name: str, s_out: float) -> _Float:
        value = self.env[name]
        if isinstance(value, _Int):
            multiplier = (value.scale / s_out).to(torch.float32)
            return _Float(self.mul(self.to_f32(value.expr), multiplier), value.layout)
        return _Float(self.mul(value.expr, torch.tensor(1.0 / s_out, dtype=torch.float32)), value.layout)

    def round_to_codes(self, y, qmin: int, qmax: int, storage: str):
        """``clamp(round_half_even(y), qmin, qmax)`` cast to ``storage``."""
        from tvm.relax import op as R

        if self.mode == "cuda":  # Relax round -> nearbyintf (half to even)
            return self.emit(R.astype(R.clip(R.round(y), qmin, qmax), storage))
        return self.bb.emit_te(_round_clip_te, y, qmin, qmax, storage, primfunc_name_hint="requantize")

    # ----------------------------------------------------------------------------- the functions
    def build(self):
        from tvm import relax

        bb = self.bb
        with bb.function("main"):
            with bb.dataflow():
                for node in self.program.nodes:
                    self.env[node.name] = ops.op_named(node.op).relax(self, node)
                results = [self.dequantize(self.in_layout(self.env[name], NCHW)) for name in self.program.outputs]
                results += [self.in_layout(self.env[name], NCHW).expr for name in self.expose]
                output = results[0] if len(results) == 1 else relax.Tuple(results)
                output = bb.emit_output(output)
            bb.emit_func_output(output, params=list(self.input_vars.values()) + self.param_vars)
        self.weights = place(self.weights)
        packed = relax.Var(PACKED_WEIGHTS, relax.TensorType((packed_size(self.weights),), "uint8"))
        with bb.function(UNPACK_FUNCTION, [packed]):
            with bb.dataflow():
                unpacked = [bb.emit_te(functools.partial(unpack_te, layout=spec), packed,
                                       primfunc_name_hint="unpack_weight") for spec in self.weights]
                output = bb.emit_output(relax.Tuple(unpacked))
            bb.emit_func_output(output)
        return bb.get()


def _max_pool(expr, a: dict, layout: str = NCHW):
    from tvm.relax import op as R

    return R.nn.max_pool2d(expr, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                           layout=layout)


def _flatten(expr, start: int):
    from tvm.relax import op as R

    shape = _shape(expr)
    start = start % len(shape) if shape else 0
    return R.reshape(expr, shape[:start] + [math.prod(shape[start:])])


def _layer_facts(lowering: _Lowering, node: IntNode, x: _Int) -> tvm_kernels.LayerFacts:
    producer = lowering.by_name[node.inputs[0]]
    return tvm_kernels.LayerFacts(node.op, int(node.attrs.get("groups", 1)), int(node.attrs["weight_bits"]),
                                  int(producer.attrs.get("bits", 8)), _dtype(x.expr) == "int8", len(_shape(x.expr)),
                                  int(node.tensors["weight"].shape[1]))


def _layer_kernel(lowering: _Lowering, node: IntNode, x: _Int) -> tvm_kernels.Kernel | None:
    """The kernel of ``lowering.isa`` that takes this layer (``targets/tvm_kernels.py``), or None."""
    return tvm_kernels.choose(lowering.isa, _layer_facts(lowering, node, x))


def _uses_vnni(lowering: _Lowering, node: IntNode, x: _Int) -> bool:
    return _layer_kernel(lowering, node, x) is not None and lowering.isa == "avx512vnni"


def _convert_layer(lowering: _Lowering, node: IntNode):
    from tvm.relax import op as R

    x = lowering.env[node.inputs[0]]
    if not isinstance(x, _Int) or _dtype(x.expr) not in ("int8", "uint8"):
        raise MpqcError(f"layer {node.name!r} reads {node.inputs[0]!r}, which is not an 8-bit quantized value")
    bias = node.tensors["bias"].to(torch.int32).numpy()
    scale = x.scale * node.tensors["weight_scale"].to(torch.float64)  # the reference's _eval_layer
    kernel = _layer_kernel(lowering, node, x)
    if kernel is not None:
        return _convert_layer_vnni(lowering, node, x, bias, scale, kernel)
    a = node.attrs
    if node.op == "linear":
        w = lowering.weight(node, "io")  # [in, out]
        acc = lowering.emit(R.matmul(x.expr, w, out_dtype="int32"))
        bias_shape = [1] * (len(_shape(acc)) - 1) + [-1]
    else:
        x = lowering.in_layout(x, NCHW)
        w = lowering.weight(node, "oihw")
        conv = R.nn.conv2d if node.op == "conv2d" else R.nn.conv1d
        acc = lowering.emit(conv(x.expr, w, a["stride"], a["padding"], a["dilation"], a["groups"],
                                 out_dtype="int32"))
        bias_shape = [1, -1] + [1] * (len(_shape(acc)) - 2)
    b = lowering.param(f"{node.name}.bias", bias.reshape(bias_shape))
    acc = lowering.emit(R.add(acc, b))
    return _Int(acc, scale.reshape(bias_shape))  # channels last for linear (any rank), at dim 1 for convs


def _convert_layer_vnni(lowering: _Lowering, node: IntNode, x: _Int, bias: np.ndarray, scale: torch.Tensor,
                       kernel: tvm_kernels.Kernel | None = None):
    """conv2d / linear on an implicit-GEMM kernel (``targets/tvm_vnni.py``; ``kernel``'s micro-kernel, VNNI by
    default): NHWC int32 accumulators, output channels sliced back from a multiple of 16; a signed input is shifted
    by the kernel's shift (VNNI: +128) and ``shift * sum(w)`` leaves the bias."""
    from tvm.relax import op as R

    kernel = kernel or tvm_kernels.BY_ISA["avx512vnni"]
    facts = _layer_facts(lowering, node, x)
    micro, shift = kernel.micro(facts), kernel.shift(facts)
    weight = node.tensors["weight"].to(torch.int64)
    out_channels = int(weight.shape[0])
    signed = _dtype(x.expr) == "int8"
    if signed:
        corrected = bias.astype(np.int64) - shift * weight.reshape(out_channels, -1).sum(1).numpy()
        if np.abs(corrected).max(initial=0) > np.iinfo(np.int32).max:
            raise MpqcError(f"layer {node.name!r}: the bias minus {shift}*sum(w) for the signed input's +{shift} "
                            f"shift leaves int32")
        bias = corrected.astype(np.int32)
    w = lowering.weight(node, "vnni")
    if node.op == "linear":
        geometry = ConvGeometry("NC", signed, int(weight.shape[1]), shift=shift)
    else:
        a = node.attrs
        geometry = ConvGeometry(x.layout, signed, int(weight.shape[1]), tuple(weight.shape[2:]), tuple(a["stride"]),
                                tuple(a["padding"]), tuple(a["dilation"]), shift=shift)
    lowering.kernel_layers[node.name] = micro.block
    acc = lowering.bb.emit_te(functools.partial(conv2d_te, geometry=geometry, name=micro.block), x.expr, w,
                              primfunc_name_hint=micro.block)
    shape = _shape(acc)
    if shape[-1] != out_channels:
        acc = lowering.emit(R.strided_slice(acc, axes=[3], begin=[0], end=[out_channels]))
    if node.op == "linear":
        acc = lowering.emit(R.reshape(acc, [shape[2], out_channels]))
    b = lowering.param(f"{node.name}.bias", bias)
    acc = lowering.emit(R.add(acc, b))
    if node.op == "linear":
        return _Int(acc, scale.reshape(1, -1))
    return _Int(acc, scale.reshape(1, 1, 1, -1), NHWC)


def _sum_dtype(expr) -> str:
    return "int32" if _dtype(expr) in ("int8", "uint8") else "int64"


def check_supported(program: IntegerProgram) -> None:
    """Raise one :class:`UnsupportedOpError` listing every node the TVM target cannot lower."""
    problems = []
    for node in program.nodes:
        op = ops.op_named(node.op)
        reason = f"no TVM converter for op {node.op!r}" if op is None or not op.has_backend("relax") else \
            op.relax_check(node)
        if reason:
            problems.append(f"{node.name} ({node.op}): {reason}")
    if problems:
        raise UnsupportedOpError(f"the TVM target cannot lower {len(problems)} node(s):\n  " + "\n  ".join(problems))


@dataclass
class BuiltModule:
    """A program as Relax: ``main(inputs..., params...)`` and ``unpack_weights(packed) -> weights``."""

    mod: Any
    param_names: list[str]  # main's parameters after its inputs, in order
    params: dict[str, np.ndarray]  # those stored as they are (int32 biases)
    weights: list[WeightLayout]  # those stored bit-packed, in the order unpack_weights returns them
    packed: np.ndarray  # the packed weights (targets/tvm_weights.py)
    inexact: list[str]
    vnni_layers: list[str]  # layers on the VNNI kernels
    kernel_layers: dict[str, str] = field(default_factory=dict)  # layer -> micro-kernel block (tvm_kernels)


def build_module(program: IntegerProgram, input_shapes: Sequence[Sequence[int]], *, mode: str = "llvm",
                 expose: Sequence[str] = (), vnni: bool = False, isa: str | None = None) -> BuiltModule:
    """The Relax IRModule of ``program``, its parameters, and the list of nodes whose bit-exactness is not
    guaranteed (empty for the supported zoo). ``isa``: the conv/linear kernels' ISA (``targets/tvm_kernels.py``;
    ``None``: ``vnni`` says, True for the AVX512-VNNI kernels, False for TVM's own operators)."""
    from tvm import relax

    check_supported(program)
    unknown = [name for name in expose if name not in {node.name for node in program.nodes}]
    if unknown:
        raise ConfigError(f"expose: no node named {', '.join(map(repr, unknown))} in the program")
    lowering = _Lowering(program, [tuple(int(d) for d in s) for s in input_shapes], mode, expose, vnni=vnni,
                         isa=isa)
    mod = lowering.build()
    mod = relax.transform.DeadCodeElimination(entry_functions=["main", UNPACK_FUNCTION])(mod)
    vnni_layers = [layer for layer, block in lowering.kernel_layers.items() if block == tvm_kernels.VNNI_BLOCK]
    return BuiltModule(mod, lowering.param_names, lowering.params, lowering.weights,
                       pack_bits(lowering.weights, lowering.weight_codes), lowering.inexact, vnni_layers,
                       dict(lowering.kernel_layers))


# --------------------------------------------------------------------------------------------- lowering
@dataclass
class LoweredModule:
    """A program compiled by TVM. ``__call__`` runs it (CPU targets only); the weights are unpacked from their
    bit-packed storage by the module's ``unpack_weights`` once, on the first run, as the artifact's loader does."""

    executable: Any
    target: Any
    meta: dict[str, Any]
    params: dict[str, np.ndarray]  # stored as they are (int32 biases)
    packed_weights: np.ndarray  # every weight, bit-packed
    ir_module: Any = None
    build_seconds: float = 0.0
    inexact: list[str] = field(default_factory=list)
    schedules: dict[str, int] = field(default_factory=dict)  # CPU: functions, from_database, vnni, default_rule
    _vm: Any = None
    _param_tensors: list[Any] | None = None

    @property
    def kind(self) -> str:
        return self.target.kind.name

    def _machine(self):
        if self.kind != "llvm":
            raise MpqcError(f"a {self.kind} module cannot run on this machine's CPU; export it and run it there")
        if self._vm is None:
            import tvm
            from tvm import relax

            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
            self._param_tensors = bind_params(self._vm, self.meta, {PACKED_WEIGHTS: self.packed_weights,
                                                                    **self.params}, tvm.cpu())
        return self._vm

    def unpacked_weights(self) -> dict[str, np.ndarray]:
        """The weights as ``unpack_weights`` gives them to ``main`` (in their kernels' layouts)."""
        self._machine()
        names = self.meta["params"]
        return {name: tensor.numpy() for name, tensor in zip(names, self._param_tensors)
                if name in self.meta["weights"]["names"]}

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """All results as NumPy arrays: the program's outputs, then the exposed nodes' values."""
        import tvm

        vm = self._machine()
        arrays = [tvm.runtime.tensor(np.ascontiguousarray(np.asarray(x, dtype=np.float32))) for x in inputs]
        result = vm["main"](*arrays, *self._param_tensors)
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return [r.numpy() for r in results]

    def __call__(self, *inputs):
        """Outputs (torch tensors for torch inputs, NumPy arrays otherwise); one output unwrapped."""
        as_torch = any(isinstance(x, torch.Tensor) for x in inputs)
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in inputs]
        results = self.run(*arrays)[: len(self.meta["outputs"])]
        if as_torch:
            results = [torch.from_numpy(r) for r in results]
        return results[0] if len(results) == 1 else tuple(results)

    def exposed(self, *inputs) -> dict[str, np.ndarray]:
        """The values of the nodes named in ``lower(..., expose=...)`` (8-bit codes of quantize nodes, ...)."""
        results = self.run(*[x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in inputs])
        return dict(zip(self.meta["exposed"], results[len(self.meta["outputs"]):]))

    def source(self, fmt: str = "") -> str:
        """The generated device source (CUDA C for cuda; LLVM IR for llvm, or ``fmt="asm"``)."""
        mod = self.executable.mod
        if self.kind == "cuda":
            for imported in _import_tree(mod):
                if imported.kind == "cuda":
                    return imported.inspect_source("")
            raise MpqcError("the CUDA module has no CUDA source")
        for imported in _import_tree(mod):
            if imported.kind == "llvm":
                return imported.inspect_source(fmt or "ll")
        raise MpqcError("the module has no LLVM code")

    def export(self, directory: str | Path) -> Path:
        """Write ``model.so``, ``params.bin`` (the packed weights and the biases), ``model.json`` and ``loader.py``
        into ``directory``."""
        import tvm

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.executable.export_library(str(directory / "model.so"))
        stored = {PACKED_WEIGHTS: self.packed_weights, **self.params}
        blob = tvm.runtime.save_param_dict({name: tvm.runtime.tensor(a) for name, a in stored.items()})
        (directory / "params.bin").write_bytes(blob)
        (directory / "model.json").write_text(json.dumps(self.meta, indent=1))
        (directory / "loader.py").write_text(LOADER_SOURCE)
        if self.kind == "cuda":
            (directory / "kernels.cu").write_text(self.source())
        return directory


def bind_params(vm, meta: dict[str, Any], stored: dict[str, Any], device) -> list[Any]:
    """``main``'s parameters (after its inputs), in order: the weights from ``unpack_weights`` (run once here),
    the rest from ``stored`` (``params.bin``). The loader holds the same code, written for tvm + numpy only."""
    import tvm

    def tensor(value):
        return value if isinstance(value, tvm.runtime.Tensor) else tvm.runtime.tensor(np.asarray(value), device)

    unpacked = vm[meta["weights"]["unpack"]](tensor(stored[meta["weights"]["packed"]]))
    values = dict(zip(meta["weights"]["names"], unpacked))
    return [values[name] if name in values else tensor(stored[name]) for name in meta["params"]]


def _import_tree(mod):
    yield mod
    for imported in mod.imports:
        yield from _import_tree(imported)


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
    per convolution geometry and recorded there too (``vnni_tiles.json``, ``targets/tvm_schedule.py``).
    ``isa``: the conv2d/linear kernels (``targets/tvm_kernels.py``): ``"auto"`` (default) the best the target has
    (``avx512vnni``, else ``avx2``, else TVM's own operators), or forced: ``"avx512vnni"``, ``"avx2"`` (on an
    AVX-512 target the module is built for ``x86-64-v3``, so it holds AVX2 code only), ``"generic"``.
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
    isa = tvm_kernels.resolve_isa(tvm_target, isa, vnni) if kind == "llvm" else "generic"
    tvm_target = tvm_kernels.isa_target(tvm_target, isa)
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
                            meta={**_metadata(program, shapes, built, tvm_target, expose), "isa": isa})
    if out is not None:
        lowered.export(out)
    return lowered


def compile_module(mod, target, *, schedule: bool = True, trials: int = 0, tuning_db: str | Path | None = None,
                   stats: dict | None = None):
    """``tvm.compile`` with schedules: on CUDA dlight's GPU rules (TVM's CUDA default pipeline); on CPU the VNNI
    kernels' hand schedule, the MetaSchedule database ``tuning_db`` (after ``trials`` trials of tuning) and, for
    the rest, :func:`mpqc.targets.tvm_schedule.default_cpu_rule` (``schedule=False``: TVM's unscheduled CPU code,
    VNNI kernels included)."""
    import tvm

    from mpqc.targets.tvm_schedule import cpu_pipeline

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
            "storage": "every weight bit-packed at its own bit-width in one uint8 array (targets/tvm_weights.py), "
                       "unpacked by the module's unpack_weights once at load; biases int32",
            "packed_bytes": int(built.packed.size),
            "bits_over_8": sum(spec.bits * spec.count for spec in weights) / 8,
            "layers": {spec.name: {"bits": spec.bits, "shape": list(spec.shape), "layout": spec.layout,
                                   "offset": spec.offset} for spec in weights},
        },
        "vnni_layers": built.vnni_layers,
        "kernel_layers": built.kernel_layers,
        "layers": {module: {"weight_bits": w, "activation_bits": a} for module, (w, a) in program.layer_bits().items()},
        "layer_nodes": {node.attrs["module"]: node.name for node in program.layers()},
        "inexact": list(built.inexact),
    }


# --------------------------------------------------------------------------------------------- runtime loader
LOADER_SOURCE = '''"""Run an mpqc TVM artifact with the TVM runtime and NumPy only (no mpqc, no torch).

    import numpy as np
    from loader import load
    run = load("artifact_dir")                      # reads model.so, params.bin, model.json
    logits = run(np.zeros((1, 1, 28, 28), "float32"))

The weights are stored bit-packed in params.bin; ``load`` runs the module's ``unpack_weights`` once to unpack them
into the layouts the kernels read, then every call reuses them.
Set TVM_NUM_THREADS to the number of physical cores before the first call (TVM's pool starts one thread here).
"""
import json
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine


def load(directory, device=None):
    directory = Path(directory)
    meta = json.loads((directory / "model.json").read_text())
    device = device or tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(str(directory / meta["library"])), device)
    stored = tvm.runtime.load_param_dict((directory / meta["params_file"]).read_bytes())
    weights = meta["weights"]
    unpacked = vm[weights["unpack"]](tvm.runtime.tensor(stored[weights["packed"]].numpy(), device))
    values = dict(zip(weights["names"], unpacked))
    args = [values[name] if name in values else tvm.runtime.tensor(stored[name].numpy(), device)
            for name in meta["params"]]
    n_out = len(meta["outputs"])

    def run(*inputs):
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), device) for x in inputs]
        result = vm["main"](*tensors, *args)
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        results = [r.numpy() for r in results][:n_out]
        return results[0] if n_out == 1 else tuple(results)

    run.meta = meta
    return run


if __name__ == "__main__":
    import sys

    model = load(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    shape = model.meta["inputs"][0]["shape"]
    print(model(np.zeros(shape, "float32")))
'''
