"""How a sweep (:mod:`mpqc.sweep`, a ``sweep.json`` dict) is shown: the table ``mpqc report`` prints and
``pareto.png``, top-1 (or the task's metric) against weight memory."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mpqc.checkpoint import atomic_write_bytes
from mpqc.report import _table, human_bytes, human_count
from mpqc.sweep_grid import DONE, FAILED, INFEASIBLE, NOT_EXPRESSIBLE, PENDING, UNIFORM, SweepPoint

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


def point_summary(point: SweepPoint, label: tuple[str, str] = ("top-1", "%")) -> str:
    """One line on a point: its metric, drop, cost, budget status, bits per weight and wall time (or why it did not
    finish)."""
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


def plot_sweep(data: dict[str, Any], path: str | Path, references: Mapping[str, float] | None = None) -> None:
    """Save ``pareto.png``: top-1 against weight memory, one panel per activation bit-width, one line per method
    (through its weight-memory and average-bits points; other budget kinds as open markers) plus uniform QAT
    (black, dashed), the fp32 top-1 dotted, the Pareto front as a red step line with ringed points.
    ``references``: more horizontal lines, label to value (e.g. a benchmark's fp32 control), dash-dotted."""
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
        for index, (label, value) in enumerate((references or {}).items()):
            ax.axhline(value, color=_COLORS[-1 - index % len(_COLORS)], linestyle="-.", linewidth=1,
                       label=f"{label} {value:.2f}{unit}")
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
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{data.get('model', '?')}: {name} vs weight memory", x=0.01, ha="left", fontweight="bold")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
