"""The grid of a sweep (:mod:`mpqc.sweep`): its budgets as written (``weight-memory=1.5b``, ``bitops=W3A8``), its
points (method x budget x activation bits, plus the uniform-QAT reference points), and the Pareto front of the
finished ones. Nothing here trains; :func:`mpqc.sweep.sweep` runs the points.

>>> [b.label for b in parse_sweep_budgets("weight-memory=1.5b,2bpw,20KiB")]
['weight-memory=1.5bpw', 'weight-memory=2bpw', 'weight-memory=20KiB']
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Iterable, Sequence

import torch

from mpqc.budgets import Budget, LayerBits, parse_budget
from mpqc.errors import ConfigError
from mpqc.layers import LayerInfo

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
    ``penalty_power`` is the budget penalty's power its search used (``TrainConfig.penalty_power`` or the method's
    default); None for uniform points, and in rows written before it was recorded (which used 2, every method's
    default then).
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
    penalty_power: float | None = None

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
