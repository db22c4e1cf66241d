"""CPU schedules for the PrimFuncs of a lowered integer program: the VNNI kernels' hand schedule with measured
register tiles, a default (untuned) rule for the rest, and MetaSchedule tuning into an on-disk database.

TVM's CPU pipeline leaves TIR unscheduled (one scalar loop nest per op, every intermediate in memory) and dlight's
CPU rules cover only GEMV and softmax-like reductions. :func:`cpu_pipeline` schedules the fused functions in order:

1. *Kernel functions* (a micro-kernel's conv block, ``kernels/registry.py``: ``vnni_conv``, ``avxvnni_conv``,
   ``avx2_conv``, ``avx2wide_conv``, ...): ``implicit_gemm.schedule_conv`` with that micro-kernel and the register
   tile recorded for the convolution's geometry in ``<tuning_db>/vnni_tiles.json`` (:func:`tune_vnni_tiles` times
   every candidate tile of a geometry the first time it is seen) or ``MicroKernel.default_tile``.
2. *MetaSchedule records* for the other functions, with a tuning database (:func:`tune` adds ``trials``).
3. *The default rule* (:func:`schedule_func`) for what is left:

*Matches*: every PrimFunc of the module that dlight's ``normalize_prim_func`` can analyse.
*Rewrites to*: injective-only functions: everything inlined into the output block, its loops fused, parallelised
and vectorized (along the innermost axis alone when the vector would otherwise cross rows). Functions with one
reduction block (conv / matmul / pool / sum) whose innermost spatial axis has a divisor >= 8 and is read with unit
stride: the requantisation epilogue inlined into one block, the reduction tiled as ``parallel(spatial outer) ->
reduction loops -> vectorized innermost spatial`` with the epilogue computed at the parallel loop, the reduction's
producers (zero padding) left as their own parallel loops, except a channels-last pool's padding, inlined. Anything
else (late layers' 2x2..7x7 maps, strided convs, several reductions) stays unscheduled: LLVM's own vectorization
of TVM's plain loops measured faster there (MetaSchedule, ``tune``, is the way to more speed).
*Ensures*: the same values (scheduling reorders loops, never arithmetic: integer sums are exact and every fp32
product is fenced, see the package docstring); that inlining puts ``a*M + b*M'`` in one expression is exactly what the
fence is for, and ``tests/test_tvm.py`` checks the schedules against the reference bit for bit.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from mpqc.targets.tvm.kernels.registry import VNNI_BLOCK, find_micro_kernel, is_kernel_block
from mpqc.targets.tvm.kernels.implicit_gemm import Tile, conv_signature, schedule_conv

log = logging.getLogger(__name__)

VECTOR_BYTES = 64  # AVX-512; a narrower machine splits wider vectors, so this only sets the unroll/vector width
MIN_VECTOR_LANES = 8  # reductions whose innermost spatial axis has no divisor this large are left unscheduled


def _extent(sch, loop) -> int | None:
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _vector_split(sch, loop, lanes: int):
    """Split ``loop`` so that its inner part (a divisor of the extent, <= lanes) can be vectorized."""
    extent = _extent(sch, loop)
    if extent is None or extent < 2:
        return loop, None
    inner = max(d for d in range(1, min(lanes, extent) + 1) if extent % d == 0)
    if inner == 1:
        return loop, None
    if inner == extent:
        return None, loop
    outer, inner_loop = sch.split(loop, [None, inner])
    return outer, inner_loop


def _lanes(sch, block) -> int:
    buffer = sch.get(block).writes[0].source
    return max(VECTOR_BYTES // max(buffer.dtype.bits // 8, 1), 4)


def _schedule_injective(sch, block) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    lanes = _lanes(sch, block)
    innermost = _extent(sch, loops[-1])
    if len(loops) > 1 and innermost is not None and innermost >= MIN_VECTOR_LANES and innermost % lanes:
        # vectorize along the innermost axis alone: split off a fused index, a vector whose lanes cross a row
        # (224 = 3.5 x 64) became gathers, e.g. the input's quantization (0.10 -> 0.02 ms on ResNet-18)
        outer, inner = _vector_split(sch, loops[-1], lanes)
        if inner is not None and _extent(sch, inner) >= MIN_VECTOR_LANES:
            rest = loops[:-1] + ([outer] if outer is not None else [])
            sch.parallel(sch.fuse(*rest) if len(rest) > 1 else rest[0])
            sch.vectorize(inner)
            return
        loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer, inner = _vector_split(sch, fused, lanes)
    if outer is not None:
        sch.parallel(outer)
    if inner is not None:
        sch.vectorize(inner)


def _unit_stride(block, var) -> bool:
    """Whether every buffer ``block`` reads moves by 0 or 1 element along its last axis as ``var`` steps."""
    from tvm.sym.pattern import detect_linear_equation

    for region in block.reads:
        index = region.region[-1].min if region.region else None
        if index is None:
            continue
        coefficients = detect_linear_equation(index, [var])
        if not coefficients or int(coefficients[0]) not in (0, 1):
            return False
    return True


def _schedule_reduction(sch, info, epilogue) -> bool:
    kinds = info.dom_kind()
    spatial = len(kinds) - len(kinds.lstrip("S"))
    if not spatial or set(kinds[spatial:]) != {"R"}:
        return False
    block = info.block_rv
    loops = sch.get_loops(block)
    outer_spatial, last, reductions = loops[: spatial - 1], loops[spatial - 1], loops[spatial:]
    extent = _extent(sch, last)
    if extent is None or max(d for d in range(1, min(16, extent) + 1) if extent % d == 0) < MIN_VECTOR_LANES:
        return False  # a short innermost axis (late layers' 2x2..7x7 maps): LLVM's own vectorization did better
    if not _unit_stride(sch.get(block), info.iters[spatial - 1].var):
        return False  # strided convolutions: vector gathers were 4-40x slower than the unscheduled loops
    last_outer, last_inner = _vector_split(sch, last, 16)
    order = list(outer_spatial) + ([last_outer] if last_outer is not None else [])
    if last_inner is not None:
        sch.reorder(*order, *reductions, last_inner)
    parallel = sch.fuse(*order) if len(order) > 1 else (order[0] if order else None)
    if parallel is not None:
        sch.parallel(parallel)
    if last_inner is not None:
        sch.vectorize(last_inner)
    init = sch.decompose_reduction(block, reductions[0])
    if last_inner is not None:
        sch.vectorize(sch.get_loops(init)[-1])
    if epilogue is not None and parallel is not None:
        sch.reverse_compute_at(epilogue, parallel, preserve_unit_loops=True)
        inner_loops = sch.get_loops(epilogue)[1:]
        if inner_loops:
            fused = sch.fuse(*inner_loops) if len(inner_loops) > 1 else inner_loops[0]
            _, vector = _vector_split(sch, fused, _lanes(sch, epilogue))
            if vector is not None:
                sch.vectorize(vector)
    elif epilogue is not None:
        _schedule_injective(sch, epilogue)
    return True


#: Functions of more blocks are left unscheduled: the integer kernels of transformer ops (LayerNorm's Newton square
#: root, softmax) fuse into functions of a hundred elementwise blocks, on which dlight's ``try_inline`` ran for
#: minutes (issue 15); unscheduled they are as exact.
MAX_SCHEDULED_BLOCKS = 32


def schedule_func(func):
    """The schedule of ``func`` under this rule, or None where it does not apply (the function is left as it is)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base.common_schedules import try_inline

    if is_kernel_func(func):
        return None  # the kernels' rule's (vnni_cpu_rule); unscheduled it is still exact
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or len(infos) > MAX_SCHEDULED_BLOCKS:
        return None
    try:
        first_reduction = next((i for i, info in enumerate(infos) if not info.is_injective()), len(infos))
        # Producers of the reduction (the conv's zero padding) stay separate loops: inlined, their bounds checks
        # sat in the innermost loop and made the conv 3-5x slower. The epilogue is inlined into one block.
        producers = infos[:first_reduction]
        if first_reduction < len(infos) and _channels_last_pool(sch, infos[first_reduction]):
            # ... except a channels-last pool's padding: its bounds check is constant along the vectorized
            # channels, and a separate loop copied the whole int32 input (ResNet-18's max pool: 0.14 -> 0.05 ms)
            producers = [info for info in producers if not _inlined(sch, info.block_rv)]
        infos = producers + try_inline(sch, infos[first_reduction:])
        reductions = [info for info in infos if not info.is_injective()]
        if not reductions:
            for info in try_inline(sch, infos):
                _schedule_injective(sch, info.block_rv)
            return sch
        rest = infos[len(producers):]
        if len(reductions) == 1 and len(rest) <= 2 and rest[0] is reductions[0]:
            epilogue = rest[1].block_rv if len(rest) == 2 else None
            if _schedule_reduction(sch, reductions[0], epilogue):
                for info in producers:
                    _schedule_injective(sch, info.block_rv)
                return sch
    except Exception:  # noqa: BLE001 - a function this rule does not fit stays unscheduled (and correct)
        return None
    return None


def _channels_last_pool(sch, info) -> bool:
    """A pooling reduction (TVM's ``pool_max``/``pool_sum`` blocks) whose window does not move along the last
    (channels) axis of what it reads."""
    from tvm.sym.pattern import detect_linear_equation

    block = sch.get(info.block_rv)
    if not block.name_hint.startswith("pool_"):
        return False
    window = [it.var for it in info.iters if it.kind == "R"]
    for region in block.reads:
        last = region.region[-1].min if region.region else None
        coefficients = detect_linear_equation(last, window) if last is not None else None
        if not coefficients or any(int(c) != 0 for c in list(coefficients)[:-1]):
            return False
    return bool(window)


def _inlined(sch, block) -> bool:
    try:
        sch.compute_inline(block)
    except Exception:  # noqa: BLE001 - a producer that cannot be inlined stays a loop of its own
        return False
    return True


def block_names(func) -> list[str]:
    """The names of the blocks directly under a PrimFunc's root block (all of them, for fused functions)."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        return [sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_sblock("root"))]
    except Exception:  # noqa: BLE001 - a function without a root block (already lowered) has none to name
        return []


def is_vnni_func(func) -> bool:
    """Whether a PrimFunc holds a VNNI convolution block (``kernels/avx512_vnni.py``)."""
    return any(name.startswith(VNNI_BLOCK) for name in block_names(func))


def is_kernel_func(func) -> bool:
    """Whether a PrimFunc holds the conv block of one of the micro-kernels (``kernels/registry.py``)."""
    return any(is_kernel_block(name) for name in block_names(func))


def schedule_vnni_func(func, tiles: dict[str, Tile] | None = None):
    """The hand schedule of a VNNI PrimFunc (``implicit_gemm.schedule_conv``) with its tile from ``tiles`` (keyed by
    ``implicit_gemm.conv_signature``) or the default tile; None where ``func`` holds no VNNI block or tensorization
    fails (logged: the function then runs unscheduled, still exact)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    conv, micro = find_micro_kernel(sch)
    if conv is None:
        return None
    try:
        schedule_conv(sch, (tiles or {}).get(conv_signature(sch, conv)), micro)
    except Exception as error:  # noqa: BLE001 - reported, and the function stays correct unscheduled
        log.warning("VNNI schedule failed for %s: %s", conv_signature(sch, conv),
                    str(error).strip().splitlines()[-1][:300])
        return None
    return sch


def vnni_cpu_rule(tiles: dict[str, Tile] | None = None):
    """:func:`schedule_vnni_func` as a dlight ``ScheduleRule``."""
    from tvm.s_tir import dlight

    class VNNISchedule(dlight.ScheduleRule):
        def apply(self, func, target, tunable):  # noqa: ARG002 - the tile comes from ``tiles``
            return schedule_vnni_func(func, tiles)

    return VNNISchedule()


def default_cpu_rule():
    """:func:`schedule_func` as a dlight ``ScheduleRule`` (for ``dlight.ApplyDefaultSchedule``)."""
    from tvm.s_tir import dlight

    class DefaultCPUSchedule(dlight.ScheduleRule):
        def apply(self, func, target, tunable):  # noqa: ARG002 - the rule has no tunable knobs
            return schedule_func(func)

    return DefaultCPUSchedule()


def _count_scheduled(mod) -> tuple[int, int]:
    from tvm import tirx

    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    return sum(bool(f.attrs and f.attrs.get("tirx.is_scheduled", False)) for f in funcs), len(funcs)


def cpu_pipeline(target, *, trials: int = 0, tuning_db: str | None = None, schedule: bool = True,
                 stats: dict | None = None):
    """The CPU Relax pipeline (``relax.backend.cpu_generic``) with schedules inserted after fusion:

    1. the VNNI functions get their hand schedule (:func:`vnni_cpu_rule`): with ``tuning_db``, the register
       tile measured fastest for each convolution geometry (:func:`tune_vnni_tiles` measures the geometries
       ``tuning_db/vnni_tiles.json`` does not hold yet, seconds each, whatever ``trials`` is), else the default;
    2. with ``tuning_db``: ``trials`` MetaSchedule trials (``trials=0``: none) over the other functions (not the
       weights' one-off unpacking), recorded in that directory's JSON database (records keyed by the PrimFunc's
       structural hash and the target), then every PrimFunc the database has a record for gets its best schedule
       (``MetaScheduleApplyDatabase``): a second lowering reuses them;
    3. the functions left get :func:`default_cpu_rule` (``schedule=False``: everything left unscheduled).

    ``stats`` (a dict) receives how many PrimFuncs each step scheduled: ``functions``, ``vnni`` (of
    ``vnni_functions``), ``from_database``, ``default_rule`` (the rest stay unscheduled).
    """
    stats = {} if stats is None else stats
    import tvm
    from tvm import relax, tirx
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    @tvm.transform.module_pass(opt_level=0, name="MpqcCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            mod = tvm.transform.Sequential(cpu_generic.library_dispatch_passes(target)
                                           + cpu_generic.legalize_passes(target))(mod)
            stats["functions"] = _count_scheduled(mod)[1]
            funcs = [func for _, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)]
            stats["kernel_functions"] = sum(is_kernel_func(func) for func in funcs)
            stats["vnni_functions"] = sum(is_vnni_func(func) for func in funcs)
            if schedule:
                tiles = tune_vnni_tiles(mod, target, tuning_db) if tuning_db is not None else {}
                mod = dlight.ApplyDefaultSchedule(vnni_cpu_rule(tiles))(mod)
            stats["kernels"] = _count_scheduled(mod)[0]
            stats["vnni"] = sum(is_vnni_func(func) and bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))
                                for _, func in mod.functions_items() if isinstance(func, tirx.PrimFunc))
            if tuning_db is not None:
                if trials > 0:
                    tune(mod, target, tuning_db, trials)
                if (Path(tuning_db) / "database_tuning_record.json").is_file():  # (empty files are not made)
                    mod = relax.transform.MetaScheduleApplyDatabase(str(tuning_db))(mod)
            stats["from_database"] = _count_scheduled(mod)[0] - stats["kernels"]
            if schedule:
                mod = dlight.ApplyDefaultSchedule(default_cpu_rule())(mod)
            stats["default_rule"] = _count_scheduled(mod)[0] - stats["from_database"] - stats["kernels"]
            rest = cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)
            return tvm.transform.Sequential(rest)(mod)

    return _pipeline


def _tunable(func) -> bool:
    """Functions MetaSchedule tunes: not the VNNI ones (hand-scheduled), not those already scheduled, not the
    weights' unpacking (run once at load)."""
    from tvm import tirx

    if not isinstance(func, tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled", False)):
        return False
    return not any(is_kernel_block(name) or name.startswith("unpack_weight") for name in block_names(func))


def tune(mod, target, work_dir, trials: int) -> None:
    """MetaSchedule's default search over the fused PrimFuncs of ``mod`` that :func:`_tunable` admits; records go
    to ``work_dir``.

    Runs on ``TVM_NUM_THREADS`` threads (set it to the physical cores: TVM_NOTES trap 2); the builder gets a long
    timeout because the machine is shared. Records for workloads already in the database are kept and extended.
    """
    from tvm.s_tir import meta_schedule as ms

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:  # its per-round tables go to work_dir/logs, not the console
        ms_logger.setLevel(logging.WARNING)
    extracted = [task for task in ms.relax_integration.extract_tasks(mod, target)
                 if _tunable(task.dispatched[0]["main"])]
    if not extracted:
        return
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, work_dir=str(work_dir),
        # the default population (512 candidates per task and round) took minutes per round on 2 shared cores
        strategy=ms.search_strategy.EvolutionarySearch(population_size=min(512, max(64, 8 * trials))))
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir), max_trials_global=trials,
        num_trials_per_iter=min(16, trials),
        builder=ms.builder.LocalBuilder(timeout_sec=120),
        runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                                               min_repeat_ms=20)),
    )


# --------------------------------------------------------------------------------------------- VNNI tiles
VNNI_TILES_FILE = "vnni_tiles.json"


def tune_vnni_tiles(mod, target, work_dir, repeat: int = 20) -> dict[str, Tile]:
    """Measure every register tile that fits (``MicroKernel.tile_candidates``, at most 13) for each convolution
    geometry of ``mod``'s VNNI functions not yet recorded, keep the fastest in ``work_dir/vnni_tiles.json`` (with
    every candidate's time), and return all records. Each candidate is the whole fused function, compiled alone
    and timed on random inputs: the median of ``repeat`` runs on ``TVM_NUM_THREADS`` threads."""
    import os
    import time

    import numpy as np
    import tvm
    from tvm import s_tir, tirx

    from mpqc.targets.tvm.kernels.implicit_gemm import conv_shape

    path = Path(work_dir) / VNNI_TILES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(path.read_text()) if path.is_file() else {}
    rng = np.random.default_rng(0)
    for _, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        conv, micro = find_micro_kernel(sch)
        if conv is None or conv_signature(sch, conv) in records:
            continue
        key = conv_signature(sch, conv)
        out_width, channel_blocks = conv_shape(sch, conv)
        args = [tvm.runtime.tensor(_random_array(param.ty, rng)) for param in func.params]
        timings = {}
        for tile in micro.tile_candidates(out_width, channel_blocks):
            scheduled = schedule_vnni_func(func, {key: tile})
            if scheduled is None:
                continue
            kernel = tvm.compile(tvm.IRModule({"main": scheduled.mod["main"].with_attr("global_symbol", "main")}),
                                 target=target)
            kernel(*args)
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                kernel(*args)
                times.append(time.perf_counter() - start)
            timings[tile] = float(np.median(times))
        if not timings:
            continue
        best = min(timings, key=timings.get)
        default = micro.default_tile(out_width, channel_blocks)
        records[key] = {"rows": best.rows, "blocks": best.blocks, "ms": round(timings[best] * 1e3, 4),
                        "default": f"{default.rows}x{default.blocks}",
                        "candidates_ms": {f"{t.rows}x{t.blocks}": round(v * 1e3, 4) for t, v in timings.items()},
                        "threads": os.environ.get("TVM_NUM_THREADS", "1")}
        path.write_text(json.dumps(records, indent=1))
    return {key: Tile(record["rows"], record["blocks"]) for key, record in records.items()}


def _random_array(buffer_type, rng):
    import numpy as np

    shape = [int(d) for d in buffer_type.shape]
    dtype = str(buffer_type.dtype)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -100), min(info.max, 100) + 1, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)
