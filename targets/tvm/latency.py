"""The measured latency table behind the ``latency`` budget (:class:`mpqc.budgets.Latency`): per layer and per
weight/activation bit pair, the milliseconds of the kernel :func:`~mpqc.targets.tvm.lower` would run it on, here.

>>> table = latency_table(layers, tuning_db="tuning")               # doctest: +SKIP
>>> table.ms(w_bits, a_bits)                # per-layer ms, differentiable in the (fractional) bits   # doctest: +SKIP

*Measures*: for each layer geometry (:class:`LayerGeometry`, from its :class:`~mpqc.layers.LayerInfo`) and each bit
pair ``(w, a)`` in 2..8, the kernel registry's choice (``kernels/registry.py``: the same ``choose`` as the
lowering, for the resolved ISA of the target) names a micro-kernel block (``avx2_conv``, ``avx2s8_conv``,
``vnni_conv``, ...) or the generic kernel. Bit pairs on the same block run the same instructions, so each distinct
block is built and timed once per geometry (AVX2: up to five, from the bits; AVX-512 VNNI, AVX-VNNI and generic: one):

* an ISA kernel: one PrimFunc, the implicit-GEMM TE (``kernels/implicit_gemm.py``) on NHWC uint8 codes with the
  layer's fused epilogue (int32 bias, exact fp32 multiply, round-half-even clamp to uint8), scheduled by the same
  hand schedule and default register tile as in a lowered module (``schedule_conv``);
* the generic kernel: TVM's int8 ``conv2d``/``matmul`` plus the same epilogue, through ``compile_module``.

Each is timed with TVM's ``time_evaluator`` (the fastest of repeats in :data:`TABLE_PASSES` passes over all entries,
batch 1, the runtime's thread pool as it is: set ``TVM_NUM_THREADS`` as for deployment). The results are kept in
``<tuning_db>/latency_table.json`` keyed by the host (ISA, target, threads) and the geometry, so a second compile
measures nothing.

*Differentiable*: :meth:`LatencyTable.ms` interpolates each layer's 7x7 grid bilinearly between the measured
integer bit-widths (exact at integer bits, as freezing sees them). Bits inside one kernel's region cost the same,
so the gradient is zero there and non-zero across the bits where the kernel changes (AVX2: 8x8 -> narrow ->
int16 multi-step); freezing (``passes/freeze.py``) steps over such plateaus to the next bit-width that saves.

*Not in the table*: the work between layers (pooling, the input's quantisation, the VM's calls and allocations),
which a lowered module also runs and which does not depend on the bits: ``between_layers.py`` measures it once on
the lowered model and the budget adds it (``Latency.between_layers_ms``). *Not modelled*: a signed or NCHW input
(the first layer's) is timed as unsigned NHWC; stride and padding are inferred from the layer's input and output
shapes (``LayerInfo`` does not keep them), dilation taken as 1.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpqc.errors import ConfigError
from mpqc.layers import LayerInfo

TABLE_FILE = "latency_table.json"
TABLE_FORMAT = "mpqc-latency-table/1"
BITS = tuple(range(2, 9))  # the bit-widths of the grid (packed weights and the kernels take 2..8)
GENERIC = "generic"  # the table's name for TVM's own operators
#: TVM's grouped conv2d channels-last: what a depthwise conv between two kernel layers runs (``kernels/generic.py``)
GENERIC_CHANNELS_LAST = "generic_nhwc"
DEFAULT_TUNING_DB = Path.home() / ".cache" / "mpqc" / "tuning"
#: passes over all entries when measuring a table, the fastest kept: on a VM whose cores run up to 1.8x slower for
#: seconds at a time, passes spread over several seconds reach its steady speed (3 passes missed it now and then)
TABLE_PASSES = 8

_TABLES: dict[tuple[str, tuple[str, ...]], "LatencyTable"] = {}  # in-process memo: (host, geometries) -> table
_REQUESTS: dict[tuple, "LatencyTable"] = {}  # in-process memo: the arguments of latency_table -> table


def clear_memo() -> None:
    """Forget the tables of this process (the database on disk stays)."""
    _TABLES.clear()
    _REQUESTS.clear()


def default_tuning_db() -> Path:
    """``$MPQC_TUNING_DB``, else ``~/.cache/mpqc/tuning``."""
    return Path(os.environ.get("MPQC_TUNING_DB") or DEFAULT_TUNING_DB)


@dataclass(frozen=True)
class LayerGeometry:
    """The shape facts of one layer that its kernel's speed depends on (batch 1)."""

    op: str  # conv1d | conv2d | linear
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    input_size: tuple[int, ...]  # spatial (H, W) / (L,); () for a linear layer on a vector
    rank: int  # rank of the layer's input with its batch dimension

    @classmethod
    def of(cls, layer: LayerInfo) -> "LayerGeometry":
        weight, inputs, outputs = tuple(layer.weight_shape), tuple(layer.input_shape), tuple(layer.output_shape)
        if layer.op == "linear":
            return cls("linear", weight[1], weight[0], 1, (), (), (), tuple(inputs[:-1]), len(inputs) + 1)
        if layer.op not in ("conv1d", "conv2d"):
            raise ConfigError(f"layer {layer.name}: no latency measurement for op {layer.op!r}")
        kernel, size, out_size = weight[2:], inputs[1:], outputs[1:]
        stride, padding = zip(*(_stride_padding(n, k, m, layer.name) for n, k, m in zip(size, kernel, out_size)))
        return cls(layer.op, inputs[0], weight[0], inputs[0] // weight[1], kernel, stride, padding, size,
                   len(inputs) + 1)

    @property
    def key(self) -> str:
        dims = lambda values: "x".join(map(str, values)) or "-"  # noqa: E731
        return (f"{self.op} {self.in_channels}->{self.out_channels} g{self.groups} k{dims(self.kernel)} "
                f"s{dims(self.stride)} p{dims(self.padding)} in{dims(self.input_size)} r{self.rank}")


def _stride_padding(size: int, kernel: int, out: int, layer: str) -> tuple[int, int]:
    """A (stride, padding) giving ``out`` from ``size`` with ``kernel`` (dilation 1): "same"-style padding first."""
    paddings = sorted(range(kernel), key=lambda p: (abs(p - (kernel - 1) // 2), p))
    for stride in range(1, max(size, 1) + 1):
        for padding in paddings:
            if (size + 2 * padding - kernel) // stride + 1 == out:
                return stride, padding
    raise ConfigError(f"layer {layer}: no stride/padding maps {size} to {out} with a kernel of {kernel}")


# --------------------------------------------------------------------------------------------- the kernels
def _host_key(target: Any, isa: str) -> str:
    threads = os.environ.get("TVM_NUM_THREADS", "default")
    return f"{isa} | {target} | threads={threads}"


def kernel_blocks(geometry: LayerGeometry, isa: str) -> dict[tuple[int, int], str]:
    """The micro-kernel block (or :data:`GENERIC`, :data:`GENERIC_CHANNELS_LAST`) the registry chooses for each bit
    pair of :data:`BITS`."""
    from mpqc.targets.tvm.kernels import registry

    blocks = {}
    for w in BITS:
        for a in BITS:
            facts = registry.LayerFacts(geometry.op, geometry.groups, w, a, False, geometry.rank, geometry.in_channels)
            kernel = registry.choose(isa, facts)
            if kernel is not None:
                blocks[w, a] = kernel.micro(facts).block
            elif isa != "generic" and geometry.op == "conv2d" and geometry.groups > 1:
                blocks[w, a] = GENERIC_CHANNELS_LAST
            else:
                blocks[w, a] = GENERIC
    return blocks


def _requantize_te(acc, bias, multiplier, channel_axis: int):
    """The layer's fused epilogue as in a lowered module: int32 bias, exact fp32 multiply, round, clamp to uint8."""
    from tvm import te

    from mpqc.targets.tvm.te import _exact_mul_te, _round_clip_te

    scaled = te.compute(acc.shape, lambda *i: (acc[i] + bias[i[channel_axis]]).astype("float32"), name="bias")
    return _round_clip_te(_exact_mul_te(scaled, multiplier, mode="llvm"), 0, 255, "uint8")


def _multiplier_shape(shape: Sequence[int], channel_axis: int) -> tuple[int, ...]:
    return tuple(int(d) if axis == channel_axis else 1 for axis, d in enumerate(shape))


def _isa_kernel(geometry: LayerGeometry, block: str, target: Any, tuning_dir: Path | None = None):
    """(``time_evaluator`` of, arguments for) the implicit-GEMM kernel ``block`` on ``geometry``: one PrimFunc, at
    the tile tuned for its geometry in ``tuning_dir`` (tuned there first if it is not yet: the lowering, given the
    same directory, then runs the same tile), or the default tile without one."""
    import tvm
    from tvm import s_tir, te

    from mpqc.targets.tvm.kernels import registry
    from mpqc.targets.tvm.kernels.implicit_gemm import ConvGeometry, conv2d_te, schedule_conv

    micro = next(m for m in registry.MICRO_KERNELS if m.block == block)
    c, co = geometry.in_channels, geometry.out_channels
    if geometry.op == "linear":  # its tokens (batch 1) as the rows of one GEMM, as the lowering runs it
        x = te.placeholder((math.prod(geometry.input_size), c), "uint8", name="x")
        conv = ConvGeometry("NC", False, c)
    else:
        x = te.placeholder((1, *geometry.input_size, c), "uint8", name="x")
        conv = micro.widened(ConvGeometry("NHWC", False, c, geometry.kernel, geometry.stride, geometry.padding))
    taps = math.prod(conv.kernel) // conv.kernel[1] * (conv.kernel[1] + conv.extra_columns)
    w = te.placeholder((-(-co // 16), taps * -(-c // 4), 16, 4), "int8", name="w")
    acc = conv2d_te(x, w, conv, name=block)
    if int(acc.shape[-1]) != co:
        full = acc
        acc = te.compute((*acc.shape[:-1], co), lambda *i: full[i], name="slice")
    bias = te.placeholder((co,), "int32", name="bias")
    channel_axis = len(acc.shape) - 1
    multiplier = te.placeholder(_multiplier_shape(acc.shape, channel_axis), "float32", name="multiplier")
    out = _requantize_te(acc, bias, multiplier, channel_axis)
    func = te.create_prim_func([x, w, bias, multiplier, out]).with_attr("global_symbol", "main")
    tile = None
    if tuning_dir is not None:
        from mpqc.targets.tvm.kernels.implicit_gemm import conv_signature, find_conv
        from mpqc.targets.tvm.schedule import tune_vnni_tiles

        tiles = tune_vnni_tiles(tvm.IRModule({"main": func}), target, tuning_dir)
        probe = s_tir.Schedule(func)
        tile = tiles.get(conv_signature(probe, find_conv(probe, (micro,))[0]))
    sch = s_tir.Schedule(func)
    if not schedule_conv(sch, tile, micro):
        raise ConfigError(f"latency table: could not schedule {block} for {geometry.key}")
    module = tvm.compile(sch.mod, target=target).mod
    return module.time_evaluator, _arguments([x, w, bias, multiplier, out])


def _generic_kernel(geometry: LayerGeometry, target: Any, channels_last: bool = False):
    """(``time_evaluator`` of, arguments for) TVM's int8 conv/matmul with the same epilogue: a Relax function
    compiled as the lowering compiles (``compile_module``, default CPU schedules); ``channels_last``: a grouped
    conv2d in NHWC with ``hwio`` weights."""
    import tvm
    from tvm import relax, te
    from tvm.relax import op as R

    from mpqc.targets.tvm.build import compile_module

    c, co, g = geometry.in_channels, geometry.out_channels, geometry.groups
    if geometry.op == "linear":
        x_shape, w_shape = (1, *geometry.input_size, c), (c, co)
    elif channels_last:
        x_shape, w_shape = (1, *geometry.input_size, c), (*geometry.kernel, c // g, co)
    else:
        x_shape, w_shape = (1, c, *geometry.input_size), (co, c // g, *geometry.kernel)
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    w = relax.Var("w", relax.TensorType(w_shape, "int8"))
    bias = relax.Var("bias", relax.TensorType((co,), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, bias]):
        with bb.dataflow():
            if geometry.op == "linear":
                acc = bb.emit(R.matmul(x, w, out_dtype="int32"))
            elif channels_last:
                acc = bb.emit(R.nn.conv2d(x, w, geometry.stride, geometry.padding, 1, g, data_layout="NHWC",
                                          kernel_layout="HWIO", out_dtype="int32"))
            else:
                conv = R.nn.conv2d if geometry.op == "conv2d" else R.nn.conv1d
                acc = bb.emit(conv(x, w, geometry.stride, geometry.padding, 1, g, out_dtype="int32"))
            acc_shape = [int(d) for d in acc.ty.shape]
            channel_axis = len(acc_shape) - 1 if geometry.op == "linear" or channels_last else 1
            multiplier = relax.const(np.full(_multiplier_shape(acc_shape, channel_axis), 1e-3, np.float32))
            out = bb.emit_te(_requantize_te, acc, bias, multiplier, channel_axis, primfunc_name_hint="requantize")
            output = bb.emit_output(out)
        bb.emit_func_output(output)
    vm = relax.VirtualMachine(compile_module(bb.get(), target), tvm.cpu())
    placeholders = [te.placeholder(shape, dtype) for shape, dtype in
                    ((x_shape, "uint8"), (w_shape, "int8"), ((co,), "int32"))]
    return vm.time_evaluator, _arguments(placeholders)


def _arguments(placeholders) -> list[Any]:
    """Random codes for the kernel's arguments (uint8 activations, small int8 weights, zero biases, 1e-3 scales)."""
    import tvm

    rng = np.random.default_rng(0)
    arrays = []
    for tensor in placeholders:
        shape, dtype = tuple(int(d) for d in tensor.shape), str(tensor.dtype)
        if dtype == "float32":
            arrays.append(np.full(shape, 1e-3, np.float32))
        elif dtype == "uint8":
            arrays.append(rng.integers(0, 256, shape).astype(np.uint8))
        elif dtype == "int8":
            arrays.append(rng.integers(-7, 8, shape).astype(np.int8))
        else:
            arrays.append(np.zeros(shape, dtype))
    return [tvm.runtime.tensor(a) for a in arrays]


def measure_blocks(entries: Sequence[tuple[LayerGeometry, str]], target: Any, repeat: int = 30,
                   rounds: int = 3, tuning_dir: Path | None = None) -> list[float]:
    """Milliseconds of each ``(geometry, block)`` (a micro-kernel block, or :data:`GENERIC`), batch 1: every
    kernel is built first (a micro-kernel at its tile tuned in ``tuning_dir``, :func:`_isa_kernel`), then timed in
    ``rounds`` passes over all of them, ``repeat`` timings each (each at least 2 ms of runs); the fastest timing of
    all passes counts. Passes apart in time keep a burst of other work on the cores from inflating one entry
    (single passes measured up to 5x too slow here under load)."""
    timers = block_timers(entries, target, repeat, tuning_dir)
    best = [math.inf] * len(timers)
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer())
    return best


def block_timers(entries: Sequence[tuple[LayerGeometry, str]], target: Any, repeat: int = 30,
                 tuning_dir: Path | None = None) -> list[Callable[[], float]]:
    """For each ``(geometry, block)``, its kernel built (as :func:`measure_blocks` says) and a callable returning the
    fastest of ``repeat`` timings (ms, each at least 2 ms of runs); warmed up once here."""
    import tvm

    timers = []
    for geometry, block in entries:
        if block in (GENERIC, GENERIC_CHANNELS_LAST):
            evaluator, arguments = _generic_kernel(geometry, target, channels_last=block == GENERIC_CHANNELS_LAST)
        else:
            evaluator, arguments = _isa_kernel(geometry, block, target, tuning_dir)
        timer = evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=2)
        timer(*arguments)  # warm-up (thread pool, caches)
        timers.append(lambda timer=timer, arguments=arguments: float(min(timer(*arguments).results)) * 1e3)
    return timers


# --------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class LatencyTable:
    """Measured milliseconds per layer on a ``len(BITS) x len(BITS)`` grid of (weight, activation) bits."""

    names: tuple[str, ...]
    grid: torch.Tensor  # [layers, weight bits, activation bits], float64 ms
    blocks: tuple[dict[tuple[int, int], str], ...]  # the kernel of each layer's bit pairs
    host: str

    def ms(self, weight_bits: torch.Tensor, activation_bits: torch.Tensor) -> torch.Tensor:
        """Per-layer ms at (fractional) bits, bilinear between the integer grid points, clamped to 2..8 bits."""
        low, high = float(BITS[0]), float(BITS[-1])
        w = torch.as_tensor(weight_bits, dtype=torch.float64).reshape(-1).clamp(low, high)
        a = torch.as_tensor(activation_bits, dtype=torch.float64).reshape(-1).clamp(low, high)
        if w.numel() == 1:
            w = w.expand(len(self.names))
        if a.numel() == 1:
            a = a.expand(len(self.names))
        w0 = torch.floor(w).clamp(low, high - 1).detach()
        a0 = torch.floor(a).clamp(low, high - 1).detach()
        fw, fa = w - w0, a - a0
        i, j = (w0 - low).long(), (a0 - low).long()
        rows = torch.arange(len(self.names))
        grid = self.grid.to(w.device)

        def at(di: int, dj: int) -> torch.Tensor:
            return grid[rows, i + di, j + dj]

        return ((1 - fw) * (1 - fa) * at(0, 0) + fw * (1 - fa) * at(1, 0) + (1 - fw) * fa * at(0, 1)
                + fw * fa * at(1, 1))

    def at(self, weight_bits: int, activation_bits: int) -> list[float]:
        """Per-layer ms at integer bits (one pair for every layer)."""
        return self.grid[:, weight_bits - BITS[0], activation_bits - BITS[0]].tolist()

    def at_each(self, bits: Sequence[tuple[float, float]]) -> list[tuple[str, float]]:
        """Each layer's (kernel block, ms) at its own ``(weight, activation)`` bits, rounded to the grid."""
        points = [tuple(int(min(max(round(float(b)), BITS[0]), BITS[-1])) for b in pair) for pair in bits]
        return [(self.blocks[i][w, a], self.grid[i, w - BITS[0], a - BITS[0]].item())
                for i, (w, a) in enumerate(points)]


def latency_table(layers: Sequence[LayerInfo], *, target: Any = "llvm", isa: str = "auto",
                  tuning_db: str | Path | None = None, repeat: int = 30) -> LatencyTable:
    """The table of ``layers`` on this host (measuring only what ``<tuning_db>/latency_table.json`` lacks). Given a
    ``tuning_db``, each micro-kernel layer is measured at the tile tuned there for its geometry (tuned first where
    none is), the tile a lowering with the same ``tuning_db`` runs; without one, at the default tile, as such a
    lowering runs."""
    from mpqc.targets.tvm.kernels import registry

    request = (str(target), isa, str(tuning_db), os.environ.get("TVM_NUM_THREADS"), tuple(layers))
    if request in _REQUESTS:  # the search asks for the same table at every step: no target resolution then
        return _REQUESTS[request]
    tvm_target, isa = measuring_target(target, isa)
    host = _host_key(tvm_target, isa)
    geometries = [LayerGeometry.of(layer) for layer in layers]
    memo_key = (host, tuple(g.key for g in geometries))
    if memo_key in _TABLES:
        _REQUESTS[request] = _TABLES[memo_key]
        return _TABLES[memo_key]
    path = table_path(tuning_db)
    stored = _read(path)
    measured = stored.setdefault(host, {})
    blocks = [kernel_blocks(g, isa) for g in geometries]
    missing = {(g.key, block): g for g, kinds in zip(geometries, blocks) for block in sorted(set(kinds.values()))
               if f"{g.key} | {block}" not in measured}
    entries = [(geometry, block) for (_, block), geometry in missing.items()]
    if entries:
        registry.check_runnable(isa, "measuring the latency table")
    tuning_dir = None if tuning_db is None else Path(tuning_db)
    timings = (measure_blocks(entries, tvm_target, repeat, rounds=TABLE_PASSES, tuning_dir=tuning_dir)
               if entries else [])
    for (geometry, block), ms in zip(entries, timings):
        measured[f"{geometry.key} | {block}"] = ms
    if missing:
        _write(path, stored)
    grid = torch.tensor([[[measured[f"{g.key} | {kinds[w, a]}"] for a in BITS] for w in BITS]
                         for g, kinds in zip(geometries, blocks)], dtype=torch.float64)
    table = LatencyTable(tuple(layer.name for layer in layers), grid, tuple(blocks), host)
    _TABLES[memo_key] = _REQUESTS[request] = table
    return table


def measuring_target(target: Any = "llvm", isa: str = "auto") -> tuple[Any, str]:
    """(the TVM target, the ISA) a table is measured for: ``target`` resolved (an llvm one: this machine's CPU),
    ``isa`` resolved for it (``auto``: the best it has) and the target restricted to it (``registry.isa_target``)."""
    from mpqc.targets.tvm.kernels import registry
    from mpqc.targets.tvm.target import resolve_target

    tvm_target = resolve_target(target)
    if tvm_target.kind.name != "llvm":
        raise ConfigError(f"a latency table is measured on this machine's CPU; target {tvm_target} is not llvm")
    isa = registry.resolve_isa(tvm_target, isa)
    return registry.isa_target(tvm_target, isa), isa


def distinct(entries: Sequence[tuple[LayerGeometry, str]]) -> tuple[list[tuple[LayerGeometry, str]], list[int]]:
    """``entries`` without repeats (layers of one geometry on one kernel are measured once), and the position of
    each entry among them."""
    position: dict[tuple[str, str], int] = {}
    unique = []
    for geometry, block in entries:
        if (geometry.key, block) not in position:
            position[geometry.key, block] = len(unique)
            unique.append((geometry, block))
    return unique, [position[geometry.key, block] for geometry, block in entries]


def table_path(tuning_db: str | Path | None) -> Path:
    """``<tuning_db>/latency_table.json`` (the default database without one)."""
    return (Path(tuning_db) if tuning_db is not None else default_tuning_db()) / TABLE_FILE


def _read(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"latency table {path}: unreadable ({error}); delete it to measure again") from None
    if data.get("format") != TABLE_FORMAT:
        raise ConfigError(f"latency table {path}: format {data.get('format')!r}, expected {TABLE_FORMAT!r}")
    return data["hosts"]


def _write(path: Path, hosts: dict[str, dict[str, float]]) -> None:
    from mpqc.checkpoint import atomic_write_bytes

    text = json.dumps({"format": TABLE_FORMAT, "hosts": hosts}, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode())
