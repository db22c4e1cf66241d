"""``mpqc.sweep``: accuracy against budget over a grid of methods, budgets and activation bit-widths.

A sweep compiles one fp32 model at every point of a grid (method x budget x activation bits) and, as the reference
curve, with uniform QAT at the uniform bit-widths whose cost falls in the range of the budgets. Every point is an
ordinary :func:`mpqc.compile` run in its own directory ``OUT/points/<slug>/`` (checkpoints, report, frozen model),
so an interrupted sweep continues where it stopped (``resume=True``) and a finished point is read back, never
recomputed. ``OUT/sweep.json`` (schema ``"mpqc-sweep/1"``) is rewritten atomically after every point and
``OUT/pareto.png`` (top-1 against weight memory, one line per method plus uniform, the Pareto front marked) at the
end; ``format_sweep`` is the table ``mpqc report OUT`` prints. This module runs the sweep and keeps its directory;
the grid (budgets, points, the Pareto front) is :mod:`mpqc.sweep_grid`, the table and the plot are
:mod:`mpqc.sweep_report` (their public names are importable from here too).

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
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mpqc.budgets import Budget, parse_budget
from mpqc.checkpoint import atomic_write_bytes
from mpqc.compile import CompiledModel, compile, prepare_task
from mpqc.config import CompileConfig
from mpqc.errors import CheckpointError, ConfigError, DataError, InfeasibleBudgetError, MpqcError
from mpqc import pipeline
from mpqc.quantizers import BitRange, get_method
from mpqc.report import load_report
# The grid (budgets, points, Pareto front) and the table and plot live in their own modules; their public names
# are mpqc.sweep's too.
from mpqc.sweep_grid import (DONE, FAILED, INFEASIBLE, NOT_EXPRESSIBLE, PENDING, UNIFORM,
                             UNIFORM_BITS, UNIFORM_QUANTIZER, SweepBudget, SweepPoint, _as_sweep_budgets,
                             pareto_front, parse_sweep_budgets, plan_points, uniform_cost)
from mpqc.sweep_report import format_sweep, metric_label, plot_sweep, point_summary
from mpqc.train import evaluate

__all__ = [
    "sweep", "merge_sweeps", "load_sweep", "is_sweep_directory", "identity_differences", "SweepResult",
    "SWEEP_FORMAT", "SWEEP_FILE", "PLOT_FILE", "POINTS_DIR",
    # mpqc.sweep_grid
    "SweepBudget", "SweepPoint", "parse_sweep_budgets", "plan_points", "pareto_front", "uniform_cost", "UNIFORM",
    "UNIFORM_BITS", "UNIFORM_QUANTIZER", "DONE", "INFEASIBLE", "NOT_EXPRESSIBLE", "FAILED", "PENDING",
    # mpqc.sweep_report
    "format_sweep", "plot_sweep", "metric_label", "point_summary",
]

log = logging.getLogger(__name__)

SWEEP_FORMAT = "mpqc-sweep/1"
SWEEP_FILE = "sweep.json"
PLOT_FILE = "pareto.png"
POINTS_DIR = "points"

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
    if not (methods or uniform_bits) or not act_axis:
        raise ConfigError("a sweep needs a method or a uniform bit-width, and an activation bit-width")
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
                tqdm.write(point_summary(point, metric_label(result.info)))
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
        changed = identity_differences(result.info.get("identity"), identity)
        if changed:
            raise CheckpointError(f"{part} is another sweep than {parts[0]} (differs in: {', '.join(changed)})")
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
    try:  # with the method's defaults filled in, as the compile run records it
        point_config = get_method(_method(point)).configure(_point_config(point, config))
    except ConfigError as error:
        point.status, point.message = NOT_EXPRESSIBLE, str(error)
        return
    if point.method != UNIFORM:
        point.penalty_power = point_config.search.effective_penalty_power
    if (directory / "report.json").is_file():
        report = load_report(directory)
        if (report.get("method"), (report.get("budget") or {}).get("text")) != (_method(point), point.budget_text):
            point.status, point.message = FAILED, (f"{directory} holds a run of {report.get('method')} at "
                                                   f"{(report.get('budget') or {}).get('text')}, not this point")
            return
        changed = _settings_changed(directory, point_config)
        if changed:  # e.g. a method's default changed since the run: reading it back would mislabel it
            point.status, point.message = FAILED, (f"{directory} holds a run with other settings than this point's "
                                                   f"({', '.join(changed)}); delete it to rerun the point")
            return
        point.record(report)
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


def _settings_changed(directory: Path, config: CompileConfig) -> list[str]:
    """The config settings (``part.key``) in which the finished run in ``directory`` differs from ``config``."""
    try:
        earlier = json.loads((directory / "run.json").read_text())["identity"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["no readable run.json"]
    now = config.identity()
    changed = []
    for part in identity_differences(earlier, now):
        a, b = earlier.get(part), now.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{part}.{key}: {a.get(key, '(unset)')} there, {b.get(key, '(unset)')} now"
                        for key in identity_differences(a, b)]
        else:
            changed.append(f"{part}: {a} there, {b} now")
    return changed


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


def identity_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """The keys in which two sweeps' identities (``sweep.json``'s ``identity``: weights, data, config) differ;
    empty when they are the same sweep."""
    a, b = a or {}, b or {}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _open_directory(out: Path, identity: dict[str, Any], *, resume: bool, force: bool) -> dict[str, Any] | None:
    """The previous ``sweep.json`` when continuing one, None when starting; refusals as :func:`sweep` says."""
    if force and out.exists():
        shutil.rmtree(out)
    if (out / SWEEP_FILE).exists():
        previous = _read(out / SWEEP_FILE)
        changed = identity_differences(previous.get("identity"), identity)
        if changed:
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
