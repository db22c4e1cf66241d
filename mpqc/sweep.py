"""``mpqc.sweep``: accuracy against budget over a grid of methods, budgets and activation bit-widths.

A sweep compiles one fp32 model at every point of a grid (method x budget x activation bits) and, as the reference
curve, with uniform QAT at the uniform bit-widths whose cost falls in the range of the budgets. Every point is an
ordinary :func:`mpqc.compile` run in its own directory ``OUT/points/<slug>/`` (checkpoints, report, frozen model),
so an interrupted sweep continues where it stopped (``resume=True``) and a finished point is read back, never
recomputed. ``OUT/sweep.json`` (schema ``"mpqc-sweep/1"``) is rewritten atomically after every point and
``OUT/pareto.png`` (top-1 against weight memory, one line per method plus uniform, the Pareto front marked) at the
end; ``format_sweep`` is the table ``mpqc report OUT`` prints.

>>> [b.label for b in parse_sweep_budgets("weight-memory=1.5b,2bpw,20KiB")]
['weight-memory=1.5bpw', 'weight-memory=2bpw', 'weight-memory=20KiB']
>>> [b.label for b in parse_sweep_budgets("bitops=W3A8")]
['bitops=W3A8']

Budgets in a sweep are ``KIND=V1,V2,...`` with the kinds and units of :func:`mpqc.parse_budget`, except that a
weight memory written with a lower-case ``b`` (or ``bpw``, ``bit``, ``bits``) is in **bits per weight**:
``weight-memory=1.5b`` is ``WeightMemory(P * 1.5 / 8)`` bytes for the model's ``P`` quantized weights (bytes are
written ``B``, ``KiB``, ``KB``, ...; ``mpqc compile --budget`` keeps reading ``b`` as bytes). Any kind also takes
``WxAy``: the cost of the model with every weight at x bits and every layer input at y bits (``bitops=W3A8``).

Per point:

* the activations are fixed at the axis value ``a`` (``activation_bits=BitRange(a, a)``) and the weights searched
  in the config's range; uniform points fix the weights too (``weight_bits=BitRange(b, b)``, quantizers of
  :data:`UNIFORM_QUANTIZER`, i.e. QAT with a learned step size at fixed bits);
* a budget below the smallest cost the search space allows is recorded as ``"infeasible"`` (with the smallest
  cost from the compiler's error) and the sweep goes on; a uniform bit-width the quantizers cannot express
  (1-bit weights: weights are signed symmetric, at least 2 bits) is recorded as ``"not-expressible"``;
* any other :class:`~mpqc.errors.MpqcError` (a diverged loss, a point directory holding a different run) is
  recorded as ``"failed"`` with its message and the sweep goes on: those are properties of one point, and a
  later run with ``resume=True`` retries it. Any other exception is a bug, which would most likely hit every
  point: the sweep stops and re-raises it with a note naming the point (``sweep.json`` keeps what finished).

The Pareto front is taken per activation bit-width over the points that met their budget, on (weight bytes,
smaller is better; top-1, larger is better), uniform points included.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mpqc.budgets import Budget, LayerBits, parse_budget
from mpqc.checkpoint import atomic_write_bytes
from mpqc.compile import CompiledModel, compile, prepare_task
from mpqc.config import CompileConfig
from mpqc.errors import CheckpointError, ConfigError, DataError, InfeasibleBudgetError, MpqcError
from mpqc.layers import LayerInfo
from mpqc import pipeline
from mpqc.quantizers import BitRange, get_method
from mpqc.report import _table, human_bytes, human_count, load_report
from mpqc.train import evaluate

log = logging.getLogger(__name__)

SWEEP_FORMAT = "mpqc-sweep/1"
SWEEP_FILE = "sweep.json"
PLOT_FILE = "pareto.png"
POINTS_DIR = "points"
#: The method name of the uniform-QAT reference points.
UNIFORM = "uniform"
#: Uniform weight bit-widths tried as the reference curve (those whose cost falls in the budgets' range).
UNIFORM_BITS = (1, 2, 3, 4, 8)
#: Whose quantizers, with the bits fixed, run uniform QAT (DQ at fixed bits: step size and range learned).
UNIFORM_QUANTIZER = "dq"

DONE, INFEASIBLE, NOT_EXPRESSIBLE, FAILED, PENDING = "done", "infeasible", "not-expressible", "failed", "pending"
#: Budget kinds whose cost does not depend on weight bits get no uniform reference points.
_NO_UNIFORM_KINDS = ("activation-memory",)
#: Relative tolerance for "this uniform bit-width costs what the budget allows".
_RANGE_TOLERANCE = 1e-6

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_BITS_PER_WEIGHT = re.compile(rf"\s*{_NUMBER}\s*(b|bpw|bit|bits)\s*")  # case-sensitive: "B" is bytes
_UNIFORM_SPEC = re.compile(r"\s*[wW]([0-9]+)[aA]([0-9]+)\s*")


# ------------------------------------------------------------------------------------------------ budgets
@dataclass(frozen=True)
class SweepBudget:
    """One budget of a sweep, as written; :meth:`resolve` turns it into an mpqc :class:`Budget` for a model.

    Exactly one of ``budget`` (an ordinary budget), ``bits_per_weight`` (weight memory in bits per quantized
    weight) or ``uniform`` (the cost of uniform ``(weight bits, activation bits)``) is set.
    """

    kind: str
    label: str
    budget: Budget | None = None
    bits_per_weight: float | None = None
    uniform: tuple[int, int] | None = None
    option: str = ""

    def __post_init__(self) -> None:
        given = [x for x in (self.budget, self.bits_per_weight, self.uniform) if x is not None]
        if len(given) != 1:
            raise ConfigError(f"sweep budget {self.label!r} must set exactly one of budget, bits_per_weight, uniform")
        if self.bits_per_weight is not None and not (self.bits_per_weight > 0 and math.isfinite(self.bits_per_weight)):
            raise ConfigError(f"sweep budget {self.label!r}: bits per weight must be positive, got "
                              f"{self.bits_per_weight!r}")

    def resolve(self, layers: Sequence[LayerInfo]) -> Budget:
        """The budget for a model whose quantized layers are ``layers`` (from ``analyze_layers``)."""
        if self.budget is not None:
            return self.budget
        template = parse_budget(f"{self.kind}=1" + (f",{self.option}" if self.option else ""))
        if self.bits_per_weight is not None:
            return _budget_at(template, sum(layer.params for layer in layers) * self.bits_per_weight / 8)
        return _budget_at(template, uniform_cost(template, layers, *self.uniform))


def parse_sweep_budgets(text: str) -> list[SweepBudget]:
    """``KIND=V1,V2,...`` -> one :class:`SweepBudget` per value (see the module docstring for the units).

    ``activation-memory`` takes a ``sum`` or ``max`` item, applied to all its values
    (``activation-memory=8KiB,16KiB,sum``).
    """
    kind, sep, values = text.partition("=")
    kind = kind.strip().lower()
    items = [item.strip() for item in values.split(",")] if sep else []
    if not items or not all(items):
        raise ConfigError(f"sweep budget {text!r} must look like KIND=V1,V2,... (e.g. weight-memory=1.5b,2b,3b)")
    option = ""
    if kind == "activation-memory":
        options = [item for item in items if item.lower() in ("sum", "max")]
        option = options[-1].lower() if options else ""
        items = [item for item in items if item.lower() not in ("sum", "max")]
    suffix = f",{option}" if option else ""
    parsed = []
    for item in items:
        uniform = _UNIFORM_SPEC.fullmatch(item)
        bits = _BITS_PER_WEIGHT.fullmatch(item) if kind == "weight-memory" else None
        if uniform:
            parse_budget(f"{kind}=1{suffix}")  # refuse an unknown kind now, naming it
            w, a = int(uniform.group(1)), int(uniform.group(2))
            parsed.append(SweepBudget(kind, f"{kind}=W{w}A{a}{suffix}", uniform=(w, a), option=option))
        elif bits:
            value = float(bits.group(1))
            parsed.append(SweepBudget(kind, f"{kind}={value:g}bpw", bits_per_weight=value))
        else:
            parsed.append(SweepBudget(kind, f"{kind}={item}{suffix}", budget=parse_budget(f"{kind}={item}{suffix}")))
    return parsed


def uniform_cost(budget: Budget, layers: Sequence[LayerInfo], weight_bits: int, act_bits: int) -> float:
    """``budget``'s cost of the model with every weight at ``weight_bits`` and every layer input at ``act_bits``."""
    bits = LayerBits(torch.tensor(float(weight_bits)), torch.tensor(float(act_bits)))
    return float(budget.cost(layers, {layer.name: bits for layer in layers}))


def _budget_at(template: Budget, limit: float) -> Budget:
    """A budget of ``template``'s kind (and option) with ``limit`` in its unit."""
    kind, _, rest = template.text.partition("=")
    option = rest.partition(",")[2]
    return parse_budget(f"{kind}={limit!r}" + (f",{option}" if option else ""))


def _as_sweep_budgets(budgets: str | Budget | Iterable[str | Budget]) -> list[SweepBudget]:
    if isinstance(budgets, (str, Budget)):
        budgets = [budgets]
    result: list[SweepBudget] = []
    for item in budgets:
        if isinstance(item, Budget):
            result.append(SweepBudget(item.kind, item.text, budget=item))
        elif isinstance(item, str):
            result.extend(parse_sweep_budgets(item))
        else:
            raise ConfigError(f"budgets must be strings like 'weight-memory=1.5b,2b' or mpqc Budgets, got {item!r}")
    if not result:
        raise ConfigError("a sweep needs at least one budget")
    return result


# ------------------------------------------------------------------------------------------------ points
@dataclass
class SweepPoint:
    """One point of a sweep and, once it ran, its outcome: a row of ``sweep.json``.

    ``budget`` is the budget as the sweep names it (``weight-memory=1.5bpw``), ``budget_text`` as the compile run
    read it (``weight-memory=50739B``); ``achieved`` is in the budget's unit. ``top1`` is the fake-quant model's
    validation top-1 in percent (``top1_integer`` the integer reference's), ``drop`` = fp32 - ``top1``.
    """

    slug: str
    method: str
    budget: str
    budget_text: str
    budget_kind: str
    budget_limit: float
    budget_unit: str
    act_bits: int
    uniform_bits: int | None = None
    status: str = PENDING
    message: str | None = None
    smallest_feasible: str | None = None
    achieved: float | None = None
    budget_met: bool | None = None
    weight_bytes: float | None = None
    average_weight_bits: float | None = None
    bitops: float | None = None
    top1: float | None = None
    top1_integer: float | None = None
    fp32: float | None = None
    drop: float | None = None
    wall_time_s: float | None = None
    pareto: bool = False

    @property
    def name(self) -> str:
        """``dq weight-memory=2bpw A8``, ``uniform W2A8``."""
        if self.method == UNIFORM:
            return f"uniform W{self.uniform_bits}A{self.act_bits}"
        return f"{self.method} {self.budget} A{self.act_bits}"

    def record(self, report: dict[str, Any]) -> None:
        """Fill the outcome from a finished run's report."""
        budget, totals, accuracy = report["budget"], report["totals"], report.get("accuracy") or {}
        self.status, self.message = DONE, None
        self.achieved, self.budget_met = budget.get("achieved"), budget.get("met")
        self.weight_bytes = totals.get("weight_bytes")
        self.average_weight_bits, self.bitops = totals.get("average_weight_bits"), totals.get("bitops")
        self.top1, self.top1_integer = accuracy.get("quantized"), accuracy.get("integer_reference")
        self.fp32 = accuracy.get("fp32")
        self.drop = None if None in (self.fp32, self.top1) else self.fp32 - self.top1
        self.wall_time_s = (report.get("wall_time_s") or {}).get("total")

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "SweepPoint":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in row.items() if key in known})


def _slug(*parts: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", part).strip("-") for part in parts)


def plan_points(
    budgets: Sequence[SweepBudget], layers: Sequence[LayerInfo], *, methods: Sequence[str], act_bits: Sequence[int],
    uniform_bits: Sequence[int] = UNIFORM_BITS,
) -> list[SweepPoint]:
    """The points of a sweep, in the order they run: per activation bit-width, the uniform reference points
    (ascending bits), then every budget for every method.

    A uniform bit-width ``b`` gets a point when its cost at ``A=a`` lies within the smallest and largest budget
    of a budget kind (one point per ``(b, a)``, under the first such kind); activation-memory budgets, whose cost
    ignores weight bits, get none.
    """
    resolved = [(spec, spec.resolve(layers)) for spec in budgets]
    points: list[SweepPoint] = []
    for a in act_bits:
        uniform: dict[int, SweepPoint] = {}
        for spec, budget in resolved:
            if spec.kind in _NO_UNIFORM_KINDS:
                continue
            limits = [b.limit for s, b in resolved if (s.kind, s.option) == (spec.kind, spec.option)]
            for bits in uniform_bits:
                cost = uniform_cost(budget, layers, bits, a)
                inside = min(limits) * (1 - _RANGE_TOLERANCE) <= cost <= max(limits) * (1 + _RANGE_TOLERANCE)
                if inside and bits not in uniform:
                    label = (f"{spec.kind}={bits}bpw" if spec.kind == "weight-memory"
                             else f"{spec.kind}=W{bits}A{a}" + (f",{spec.option}" if spec.option else ""))
                    uniform[bits] = _point(UNIFORM, label, _budget_at(budget, cost), a, uniform_bits=bits)
        points += [uniform[bits] for bits in sorted(uniform)]
        points += [_point(method, spec.label, budget, a) for spec, budget in resolved for method in methods]
    slugs = [point.slug for point in points]
    repeated = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    if repeated:
        raise ConfigError(f"the sweep lists the same point more than once: {', '.join(repeated)}")
    return points


def _point(method: str, label: str, budget: Budget, act_bits: int, uniform_bits: int | None = None) -> SweepPoint:
    slug = _slug(f"w{uniform_bits}" if method == UNIFORM else method, label, f"a{act_bits}")
    return SweepPoint(slug=slug, method=method, budget=label, budget_text=budget.text, budget_kind=budget.kind,
                      budget_limit=budget.limit, budget_unit=budget.unit, act_bits=act_bits,
                      uniform_bits=uniform_bits)


def pareto_front(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """The points no other point beats on (weight bytes, top-1), per activation bit-width, among the finished
    points that met their budget. A point is beaten by one at most as large and at least as accurate, and
    strictly better in one of the two."""
    candidates = [p for p in points if p.status == DONE and p.budget_met and None not in (p.top1, p.weight_bytes)]

    def beats(q: SweepPoint, p: SweepPoint) -> bool:
        return (q.act_bits == p.act_bits and q.weight_bytes <= p.weight_bytes and q.top1 >= p.top1
                and (q.weight_bytes < p.weight_bytes or q.top1 > p.top1))

    return [p for p in candidates if not any(beats(q, p) for q in candidates if q is not p)]


# ------------------------------------------------------------------------------------------------ the sweep
@dataclass
class SweepResult:
    """What :func:`sweep` returns and :func:`load_sweep` reads: ``sweep.json`` as objects."""

    path: Path
    points: list[SweepPoint]
    fp32_top1: float | None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": SWEEP_FORMAT, **self.info, "fp32_top1": self.fp32_top1,
                "pareto": [p.slug for p in self.points if p.pareto], "points": [asdict(p) for p in self.points]}

    def table(self) -> str:
        return format_sweep(self.to_dict())

    def pareto(self) -> list[SweepPoint]:
        return [p for p in self.points if p.pareto]

    def point(self, method: str, budget: str, act_bits: int) -> SweepPoint:
        """The point of ``method`` (or ``"uniform"``) at the budget named ``budget`` and ``act_bits``."""
        for p in self.points:
            if (p.method, p.budget, p.act_bits) == (method, budget, act_bits):
                return p
        raise KeyError(f"no sweep point {method} {budget} A{act_bits} in {self.path}")


def sweep(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...] | dict[str, Tensor],
    *,
    data: tuple[DataLoader, DataLoader],
    budgets: str | Budget | Iterable[str | Budget],
    out: str | Path,
    methods: str | Sequence[str] = ("dq",),
    act_bits: int | Sequence[int] = (8,),
    uniform_bits: Sequence[int] | None = UNIFORM_BITS,
    config: CompileConfig = CompileConfig(),
    resume: bool = False,
    force: bool = False,
    loss: Callable | str | None = None,
    forward: Callable | None = None,
    metric: Callable | None = None,
) -> SweepResult:
    """Compile ``model`` at every (method, budget, activation bits) point, plus uniform QAT, into ``out``.

    ``budgets``: strings ``"KIND=V1,V2,..."`` (``weight-memory=1.5b`` is 1.5 bits per weight, see the module
    docstring) or :class:`Budget` objects. ``methods``: registered method names (``"dq,csq"`` also works).
    ``act_bits``: the activation bit-widths of the second axis (activations fixed at each). ``uniform_bits``:
    uniform weight bit-widths tried as the reference curve (None: none). ``config`` applies to every point;
    its ``progress`` shows two bars, the sweep's and the point in progress's.

    ``out`` that already holds a sweep is refused unless ``resume`` (continue it; it must be the same model,
    data and config, while methods, budgets and activation bits may change) or ``force`` (delete it first).
    ``loss``, ``forward``, ``metric``: the task, as for :func:`mpqc.compile`; the table and the plot name its metric
    (``fp32_top1``/``top1`` in ``sweep.json`` then hold that metric).

    Raises:
        ConfigError: a bad budget, method or activation bit-width (before any work).
        DataError: no validation loader (a sweep measures accuracy).
        CheckpointError: ``out`` holds a sweep and neither ``resume`` nor ``force`` is set, or a different one.
    """
    started = time.perf_counter()
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    for method in methods:
        get_method(method)  # ConfigError naming the known methods
    act_axis = [act_bits] if isinstance(act_bits, int) else list(act_bits)
    for a in act_axis:
        BitRange(a, a)  # ConfigError for an impossible bit-width
    if not methods or not act_axis:
        raise ConfigError("a sweep needs at least one method and one activation bit-width")
    specs = _as_sweep_budgets(budgets)
    train_loader, val_loader = _split(data)
    example_inputs = example_inputs if isinstance(example_inputs, (tuple, dict)) else (example_inputs,)

    gm, layers = pipeline.trace(model, example_inputs)
    positional = pipeline.positional_inputs(gm, example_inputs)
    points = plan_points(specs, layers, methods=methods, act_bits=act_axis, uniform_bits=uniform_bits or ())
    task = prepare_task(gm, positional, train_loader, config, loss=loss, forward=forward, metric=metric)
    identity = _identity(model, positional, train_loader, val_loader, config)
    if task.step_accuracy is None:  # another task than classification
        identity["task"] = {"name": task.name, "metric": task.metric_name}
    out = Path(out)
    previous = _open_directory(out, identity, resume=resume, force=force)
    fp32 = previous.get("fp32_top1") if previous else None
    if fp32 is None:
        fp32_model = gm if isinstance(example_inputs, dict) else model  # the eager model takes positional inputs
        fp32 = evaluate(fp32_model, val_loader, task=task, teacher=fp32_model)
    result = SweepResult(out, points, fp32, info={
        "metric": {"name": "top-1" if task.step_accuracy else task.metric_name,
                   "unit": task.metric_unit},
        "created": (previous or {}).get("created") or _now(), "model": type(model).__name__,
        "params": sum(layer.params for layer in layers), "identity": identity, "methods": methods,
        "budgets": [spec.label for spec in specs], "act_bits": act_axis, "uniform_bits": list(uniform_bits or ()),
        "uniform_quantizer": UNIFORM_QUANTIZER, "wall_time_s": None,
    })
    _save(result)

    bar = tqdm(total=len(points), desc="sweep", position=0, disable=not config.progress, dynamic_ncols=True)
    try:
        for point in points:
            bar.set_postfix_str(point.name, refresh=True)
            _run_point(point, model, example_inputs, (train_loader, val_loader), config, out,
                       {"loss": loss, "forward": forward, "metric": metric})
            _mark_pareto(result.points)
            _save(result)
            if config.progress:
                tqdm.write(_one_line(point, metric_label(result.info)))
            bar.update(1)
    finally:
        bar.close()
    result.info["wall_time_s"] = time.perf_counter() - started
    _save(result)
    plot_sweep(result.to_dict(), out / PLOT_FILE)
    return result


def merge_sweeps(parts: Sequence[str | Path], out: str | Path) -> SweepResult:
    """One sweep in ``out`` from finished parts of one grid (e.g. run on several machines with the same model, data
    and config): their points (run directories copied into ``out/points``), Pareto front, ``sweep.json`` and
    ``pareto.png``. :class:`CheckpointError` if the parts are not the same sweep or ``out`` is not empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} is not empty; merge sweeps into a new directory")
    loaded = [load_sweep(part) for part in parts]
    if not loaded:
        raise ConfigError("merge_sweeps needs at least one sweep directory")
    identity = loaded[0].info.get("identity")
    for part, result in zip(parts, loaded):
        if result.info.get("identity") != identity:
            raise CheckpointError(f"{part} is another sweep than {parts[0]} (model, data or config differ)")
    points: dict[str, SweepPoint] = {}
    for result in loaded:
        for point in result.points:
            if point.slug in points and points[point.slug].status == DONE:
                continue  # the same point finished in two parts: keep the first
            points[point.slug] = point
            source = result.path / POINTS_DIR / point.slug
            if source.is_dir():
                shutil.copytree(source, out / POINTS_DIR / point.slug, dirs_exist_ok=True)
    merged = SweepResult(out, list(points.values()), loaded[0].fp32_top1,
                         {**loaded[0].info, "merged_from": [str(part) for part in parts]})
    _mark_pareto(merged.points)
    _save(merged)
    plot_sweep(merged.to_dict(), out / PLOT_FILE)
    return merged


def _split(data) -> tuple[DataLoader, DataLoader]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, DataLoader) for d in data)):
        raise DataError("a sweep needs data=(train_loader, val_loader): it measures every point's validation top-1")
    return data[0], data[1]


def _run_point(point: SweepPoint, model: nn.Module, example_inputs: tuple, data: tuple, config: CompileConfig,
               out: Path, task: dict[str, Any] | None = None) -> None:
    """Run (or read back) one point, recording its outcome in ``point``; see the module docstring for errors."""
    directory = out / POINTS_DIR / point.slug
    if (directory / "report.json").is_file():
        report = load_report(directory)
        if (report.get("method"), (report.get("budget") or {}).get("text")) != (_method(point), point.budget_text):
            point.status, point.message = FAILED, (f"{directory} holds a run of {report.get('method')} at "
                                                   f"{(report.get('budget') or {}).get('text')}, not this point")
            return
        point.record(report)
        return
    try:
        point_config = _point_config(point, config)
    except ConfigError as error:
        point.status, point.message = NOT_EXPRESSIBLE, str(error)
        return
    try:
        compiled: CompiledModel = compile(model, example_inputs, budget=parse_budget(point.budget_text), data=data,
                                          method=_method(point), config=point_config, out=directory, resume=True,
                                          **(task or {}))
    except InfeasibleBudgetError as error:
        point.status, point.message = INFEASIBLE, str(error)
        point.smallest_feasible = _smallest_from(error)
        return
    except MpqcError as error:
        point.status, point.message = FAILED, f"{type(error).__name__}: {error}"
        log.warning("sweep point %s failed: %s", point.name, error)
        return
    except Exception as error:
        error.add_note(f"while compiling sweep point {point.name} in {directory}")
        raise
    point.record(compiled.report)


def _method(point: SweepPoint) -> str:
    return UNIFORM_QUANTIZER if point.method == UNIFORM else point.method


def _point_config(point: SweepPoint, config: CompileConfig) -> CompileConfig:
    """``config`` with the activations fixed at the point's bits (and, for uniform QAT, the weights too)."""
    quantizers = replace(config.quantizers, activation_bits=BitRange(point.act_bits, point.act_bits))
    if point.uniform_bits is not None:
        quantizers = replace(quantizers, weight_bits=BitRange(point.uniform_bits, point.uniform_bits))
    return replace(config, quantizers=quantizers)


def _smallest_from(error: InfeasibleBudgetError) -> str | None:
    """The smallest achievable cost an infeasible-budget error names (``"66.07 KiB"``), if it names one."""
    found = re.search(r"smallest achievable is (.+?) \(", str(error))
    return found.group(1) if found else None


def _mark_pareto(points: Sequence[SweepPoint]) -> None:
    front = {id(p) for p in pareto_front(points)}
    for p in points:
        p.pareto = id(p) in front


# ------------------------------------------------------------------------------------------------ the directory
def _identity(model: nn.Module, example_inputs: tuple, train: DataLoader, val: DataLoader,
              config: CompileConfig) -> dict[str, Any]:
    """What must not change for a sweep to be continued: the fp32 weights, the data and the settings."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "model": type(model).__qualname__,
        "weights_sha256": digest.hexdigest()[:16],
        "example_shapes": [list(x.shape) for x in example_inputs],
        "train_data": {"examples": len(train.dataset), "batch_size": train.batch_size},
        "val_examples": len(val.dataset),
        "config": config.identity(),
    }


def _open_directory(out: Path, identity: dict[str, Any], *, resume: bool, force: bool) -> dict[str, Any] | None:
    """The previous ``sweep.json`` when continuing one, None when starting; refusals as :func:`sweep` says."""
    if force and out.exists():
        shutil.rmtree(out)
    if (out / SWEEP_FILE).exists():
        previous = _read(out / SWEEP_FILE)
        if previous.get("identity") != identity:
            old = previous.get("identity") or {}
            changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise CheckpointError(f"{out} holds a different sweep (differs in: {', '.join(changed)}); choose "
                                  f"another --out or pass --force to start over")
        if not resume:
            raise CheckpointError(f"{out} already holds this sweep; pass --resume (resume=True) to continue it or "
                                  f"--force (force=True) to start over")
        return previous
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} is not empty and holds no mpqc sweep ({SWEEP_FILE}); choose an empty --out")
    return None


def _save(result: SweepResult) -> None:
    result.info["updated"] = _now()
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    atomic_write_bytes(result.path / SWEEP_FILE, text.encode("utf-8"))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read mpqc sweep {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
        raise CheckpointError(f"{path} is not an mpqc sweep (format {data.get('format') if isinstance(data, dict) else None!r}, "
                              f"expected {SWEEP_FORMAT!r})")
    return data


def load_sweep(path: str | Path) -> SweepResult:
    """Read a sweep directory (or its ``sweep.json``); :class:`CheckpointError` if it is not one."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    data = _read(directory / SWEEP_FILE if path.is_dir() else path)
    info = {k: v for k, v in data.items() if k not in ("format", "fp32_top1", "pareto", "points")}
    return SweepResult(directory, [SweepPoint.from_dict(row) for row in data.get("points", [])],
                       data.get("fp32_top1"), info)


def is_sweep_directory(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------ table and plot
def _in_unit(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return human_bytes(value)
    if unit == "bits":
        return f"{value:.3f} bits"
    return f"{human_count(value)} {unit}"


def _status(point: SweepPoint) -> str:
    if point.status == DONE:
        return "met" if point.budget_met else "NOT MET"
    return point.status


def metric_label(data: dict[str, Any]) -> tuple[str, str]:
    """``(name, unit)`` of what a sweep's ``top1`` values measure: ``("top-1", "%")`` unless a task said otherwise."""
    metric = data.get("metric") or {}
    return metric.get("name") or "top-1", metric.get("unit", "%")


def _one_line(point: SweepPoint, label: tuple[str, str] = ("top-1", "%")) -> str:
    if point.status != DONE:
        return f"{point.name}: {point.status}" + (f" ({point.message})" if point.message else "")
    return (f"{point.name}: {label[0]} {point.top1:.2f}{label[1]} (drop {point.drop:.2f}), "
            f"{_in_unit(point.achieved, point.budget_unit)}"
            f" ({_status(point)}), {point.average_weight_bits:.2f} bits/weight, {point.wall_time_s or 0:.0f} s")


def format_sweep(data: dict[str, Any]) -> str:
    """The sweep (a ``sweep.json`` dict) as a table for a terminal: one row per point, fp32 first, then notes for
    the points that did not finish and the Pareto-optimal points."""
    points = [SweepPoint.from_dict(row) for row in data.get("points", [])]
    fp32 = data.get("fp32_top1")
    name, unit = metric_label(data)
    counts = {s: sum(p.status == s for p in points) for s in (DONE, INFEASIBLE, NOT_EXPRESSIBLE, FAILED, PENDING)}
    lines = [f"mpqc sweep: model {data.get('model', '?')}, {len(points)} points ("
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ")"
             + (f", wall time {data['wall_time_s']:.0f} s" if data.get("wall_time_s") else ""), ""]
    headers = ["method", "budget", "A", "status", "achieved", "W bits", "weights", f"{name} {unit}".strip(), "drop",
               "wall s",
               "Pareto"]
    rows = [["fp32", "-", "32", "", "", "32.00", human_bytes(4 * data["params"]) if data.get("params") else "-",
             f"{fp32:.2f}" if fp32 is not None else "-", "", "", ""]]
    for p in points:
        rows.append([
            f"uniform W{p.uniform_bits}" if p.method == UNIFORM else p.method, p.budget, str(p.act_bits), _status(p),
            _in_unit(p.achieved, p.budget_unit), "-" if p.average_weight_bits is None else f"{p.average_weight_bits:.2f}",
            "-" if p.weight_bytes is None else human_bytes(p.weight_bytes),
            "-" if p.top1 is None else f"{p.top1:.2f}", "-" if p.drop is None else f"{p.drop:.2f}",
            "-" if p.wall_time_s is None else f"{p.wall_time_s:.0f}", "*" if p.pareto else ""])
    lines += _table(headers, rows, left={0, 1, 3, 10})
    reasons: dict[tuple[str, str], list[str]] = {}
    for p in points:
        if p.status not in (DONE, PENDING):
            reasons.setdefault((p.status, (p.message or "").split("\n")[0]), []).append(p.name)
    if reasons:
        lines += ["", "not run:"]
        lines += [f"  {', '.join(names)}: {status}: {message}" for (status, message), names in reasons.items()]
    front = [p for p in points if p.pareto]
    lines += ["", f"Pareto-optimal ({name} vs weight memory, per activation bit-width):"]
    lines += [f"  {p.name}: {p.top1:.2f}{unit} at {human_bytes(p.weight_bytes)}"
              f" ({p.average_weight_bits:.2f} bits/weight)"
              for p in sorted(front, key=lambda p: (-p.act_bits, p.weight_bytes))] or ["  (no finished point)"]
    return "\n".join(lines)


_COLORS = ("#3b6fb6", "#e8853d", "#4e9a5f", "#b07aa1", "#c44e52", "#8c6d31", "#17becf")
_LINE_KINDS = ("weight-memory", "avg-bits")  # budgets whose points lie on a method's weight-memory curve


def plot_sweep(data: dict[str, Any], path: str | Path) -> None:
    """Save ``pareto.png``: top-1 against weight memory, one panel per activation bit-width, one line per method
    (through its weight-memory and average-bits points; other budget kinds as open markers) plus uniform QAT
    (black, dashed), the fp32 top-1 dotted, the Pareto front as a red step line with ringed points."""
    points = [SweepPoint.from_dict(row) for row in data.get("points", [])]
    name, unit = metric_label(data)
    done = [p for p in points if p.status == DONE and None not in (p.top1, p.weight_bytes)]
    axes_bits = list(dict.fromkeys(p.act_bits for p in points)) or [None]
    fig = Figure(figsize=(6.0 * len(axes_bits), 4.8), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(axes_bits), squeeze=False)[0]
    methods = list(dict.fromkeys(p.method for p in points if p.method != UNIFORM))
    params = data.get("params")
    for ax, a in zip(axes, axes_bits):
        mine = [p for p in done if p.act_bits == a]
        for index, method in enumerate([UNIFORM, *methods]):
            ours = sorted((p for p in mine if p.method == method), key=lambda p: p.weight_bytes)
            style = dict(color="black", linestyle="--", marker="s") if method == UNIFORM else dict(
                color=_COLORS[(index - 1) % len(_COLORS)], linestyle="-", marker="o")
            on_line = [p for p in ours if p.budget_kind in _LINE_KINDS]
            if on_line:
                ax.plot([p.weight_bytes / 1024 for p in on_line], [p.top1 for p in on_line], label=method,
                        markersize=5, linewidth=1.4, **style)
            others = [p for p in ours if p.budget_kind not in _LINE_KINDS]
            if others:
                ax.scatter([p.weight_bytes / 1024 for p in others], [p.top1 for p in others], facecolors="none",
                           edgecolors=style["color"], marker="D", s=40,
                           label=None if on_line else method)
        front = sorted((p for p in mine if p.pareto), key=lambda p: p.weight_bytes)
        if front:
            ax.step([p.weight_bytes / 1024 for p in front], [p.top1 for p in front], where="post", color="#d62728",
                    alpha=0.5, linewidth=2.5, zorder=1)
            ax.scatter([p.weight_bytes / 1024 for p in front], [p.top1 for p in front], s=160, facecolors="none",
                       edgecolors="#d62728", linewidths=1.5, label="Pareto front", zorder=4)
        if data.get("fp32_top1") is not None:
            ax.axhline(data["fp32_top1"], color="#777777", linestyle=":", linewidth=1,
                       label=f"fp32 {data['fp32_top1']:.2f}{unit}")
        skipped = [p for p in points if p.act_bits == a and p.status != DONE]
        ax.set_title(f"activations {a} bits" + (f" ({len(skipped)} points not run: "
                                                + ", ".join(sorted({p.status for p in skipped})) + ")"
                                                if skipped else ""), fontsize=9)
        ax.set_xlabel("weight memory (KiB)")
        ax.set_ylabel(f"{name} ({unit})" if unit else name)
        if params:
            top = ax.secondary_xaxis("top", functions=(lambda kib: kib * 1024 * 8 / params,
                                                       lambda bpw: bpw * params / 8 / 1024))
            top.set_xlabel("bits per weight", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{data.get('model', '?')}: {name} vs weight memory", x=0.01, ha="left", fontweight="bold")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
