"""A default (untuned) CPU schedule for the PrimFuncs of a lowered integer program.

TVM's CPU pipeline leaves TIR unscheduled (one scalar loop nest per op, every intermediate in memory) and dlight's
CPU rules cover only GEMV and softmax-like reductions. This rule schedules the fused functions where a plain shape
helps:

*Matches*: every PrimFunc of the module that dlight's ``normalize_prim_func`` can analyse.
*Rewrites to*: injective-only functions: everything inlined into the output block, its loops fused, parallelised
and vectorized. Functions with one reduction block (conv / matmul / pool / sum) whose innermost spatial axis has a
divisor >= 8 and is read with unit stride: the requantisation epilogue inlined into one block, the reduction tiled
as ``parallel(spatial outer) -> reduction loops -> vectorized innermost spatial`` with the epilogue computed at the
parallel loop, the reduction's producers (zero padding) left as their own parallel loops. Anything else (late
layers' 2x2..7x7 maps, strided convs, several reductions) stays unscheduled: LLVM's own vectorization of TVM's
plain loops measured faster there (``bench/latency.py``; MetaSchedule, ``tune``, is the way to real speed).
*Ensures*: the same values (scheduling reorders loops, never arithmetic: integer sums are exact and every fp32
product is fenced, see ``targets/tvm.py``); that inlining puts ``a*M + b*M'`` in one expression is exactly what the
fence is for, and ``tests/test_tvm.py`` checks the schedule against the reference bit for bit.
"""
from __future__ import annotations


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
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer, inner = _vector_split(sch, fused, _lanes(sch, block))
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


def schedule_func(func):
    """The schedule of ``func`` under this rule, or None where it does not apply (the function is left as it is)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base.common_schedules import try_inline

    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    try:
        first_reduction = next((i for i, info in enumerate(infos) if not info.is_injective()), len(infos))
        # Producers of the reduction (the conv's zero padding) stay separate loops: inlined, their bounds checks
        # sat in the innermost loop and made the conv 3-5x slower. The epilogue is inlined into one block.
        producers = infos[:first_reduction]
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

    1. with ``tuning_db``: ``trials`` MetaSchedule trials (``trials=0``: none) recorded in that directory's JSON
       database (records keyed by the PrimFunc's structural hash and the target), then every PrimFunc the database
       has a record for gets its best schedule (``MetaScheduleApplyDatabase``): a second lowering reuses them;
    2. the functions left get :func:`default_cpu_rule` (``schedule=False``: left unscheduled).

    ``stats`` (a dict) receives how many PrimFuncs each step scheduled: ``functions``, ``from_database``,
    ``default_rule`` (the rest stay unscheduled).
    """
    stats = {} if stats is None else stats
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    @tvm.transform.module_pass(opt_level=0, name="MpqcCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            mod = tvm.transform.Sequential(cpu_generic.library_dispatch_passes(target)
                                           + cpu_generic.legalize_passes(target))(mod)
            if tuning_db is not None:
                if trials > 0:
                    tune(mod, target, tuning_db, trials)
                mod = relax.transform.MetaScheduleApplyDatabase(str(tuning_db))(mod)
            stats["from_database"], stats["functions"] = _count_scheduled(mod)
            if schedule:
                mod = dlight.ApplyDefaultSchedule(default_cpu_rule())(mod)
            stats["default_rule"] = _count_scheduled(mod)[0] - stats["from_database"]
            rest = cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)
            return tvm.transform.Sequential(rest)(mod)

    return _pipeline


def tune(mod, target, work_dir, trials: int) -> None:
    """MetaSchedule's default search over every fused PrimFunc of ``mod``; records go to ``work_dir``.

    Runs on ``TVM_NUM_THREADS`` threads (set it to the physical cores: TVM_NOTES trap 2); the builder gets a long
    timeout because the machine is shared. Records for workloads already in the database are kept and extended.
    """
    import logging

    from tvm.s_tir import meta_schedule as ms

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:  # its per-round tables go to work_dir/logs, not the console
        ms_logger.setLevel(logging.WARNING)
    ms.relax_integration.tune_relax(
        mod, params={}, target=target, work_dir=str(work_dir), max_trials_global=trials,
        num_trials_per_iter=min(16, trials),
        # the default population (512 candidates per task and round) took minutes per round on 2 shared cores
        strategy=ms.search_strategy.EvolutionarySearch(population_size=min(512, max(64, 8 * trials))),
        builder=ms.builder.LocalBuilder(timeout_sec=120),
        runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                                               min_repeat_ms=20)),
    )
