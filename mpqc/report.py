"""The compile report: save/load it as ``report.json``, plot per-layer bits, print it as a terminal table.

The report itself is a plain JSON-able dict built by the compiler (schema ``"format": "mpqc-report/1"``):
``model``, ``method``, ``created``, ``budget``, ``totals``, ``accuracy``, ``layers``, ``wall_time_s`` and an
optional ``cost``. ``accuracy`` holds the task's metric for the fp32, fake-quantized and integer models; the
optional ``metric`` says which (``task``, ``name``, ``unit``, and every value the metric returned under
``values``): classification's top-1 %, or a user's metric, named in the printed table and the plot. This module
only reads it; optional keys may be absent or ``None`` and unknown keys are ignored.

>>> human_bytes(20480), human_count(1.2e9), human_count(4e7)
('20.00 KiB', '1.20 G', '40.0 M')
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mpqc.checkpoint import atomic_write_bytes
from mpqc.errors import CheckpointError, ConfigError

REPORT_FORMAT = "mpqc-report/1"
REPORT_FILE = "report.json"
PLOT_FILE = "bits.png"

_W_COLOR, _A_COLOR, _SHARE_COLOR = "#3b6fb6", "#e8853d", "#8c8c8c"
_CYCLE_COLORS = ("#6a8caf", "#b07aa1")


# ---------------------------------------------------------------------------------------------- save / load
def save_report(report: dict, out_dir: str | Path) -> None:
    """Write ``out_dir/report.json`` (indent 2) and ``out_dir/bits.png``, each atomically (temp file + rename).

    A report without a ``"format"`` key is written with ``REPORT_FORMAT``; any other format is refused.
    """
    fmt = report.get("format", REPORT_FORMAT)
    if fmt != REPORT_FORMAT:
        raise ConfigError(f"report has format {fmt!r}, save_report writes {REPORT_FORMAT!r}")
    report = {"format": REPORT_FORMAT, **report}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=_to_builtin) + "\n"
    atomic_write_bytes(out_dir / REPORT_FILE, text.encode("utf-8"))
    plot_bits(report, out_dir / PLOT_FILE)


def load_report(path: str | Path) -> dict:
    """Read a report from a run directory or a ``report.json`` path; :class:`CheckpointError` if it is unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no mpqc report at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read mpqc report {path}: {e}") from e
    fmt = report.get("format") if isinstance(report, dict) else None
    if fmt != REPORT_FORMAT:
        raise CheckpointError(f"{path} is not an mpqc report: format {fmt!r}, expected {REPORT_FORMAT!r}")
    return report


def _to_builtin(obj):
    """``json.dumps`` fallback for numpy/torch scalars and arrays that slipped into a report."""
    for method in ("tolist", "item"):
        if hasattr(obj, method):
            return getattr(obj, method)()
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


# ---------------------------------------------------------------------------------------------- units
def human_bytes(n: float) -> str:
    """Bytes in binary units with 2 decimals: ``512 B``, ``19.41 KiB``, ``1.03 MiB``, ``2.00 GiB``."""
    if n is None or not math.isfinite(n):
        return "n/a"
    if abs(n) < 1024:
        return f"{n:.0f} B" if n == int(n) else f"{n:.2f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """A count with 3 significant digits and a decimal SI prefix: ``144``, ``270 k``, ``40.0 M``, ``1.20 G``."""
    if n is None or not math.isfinite(n):
        return "n/a"
    if abs(n) < 999.5:
        return str(int(n)) if n == int(n) else f"{n:.3g}"
    for unit in "kMGTP":
        n /= 1000
        if abs(n) < 999.5 or unit == "P":
            digits = 2 if abs(n) < 9.995 else 1 if abs(n) < 99.95 else 0
            return f"{n:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def _human(value: float | None, unit: str | None) -> str:
    """A budget quantity in its own unit: bytes in KiB/MiB, anything else as a count followed by the unit."""
    if value is None:
        return f"n/a {unit}" if unit and unit != "B" else "n/a"
    if unit == "B":
        return human_bytes(value)
    if unit == "ms":  # a latency budget
        return f"{value:.4g} ms"
    return f"{human_count(value)} {unit}".rstrip() if unit else human_count(value)


def _fmt(value, spec: str = "", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _bits(value: float | None) -> str:
    """A layer's bit-width: an integer, or the mean of a table's per-row bit-widths (two decimals)."""
    return "-" if value is None else str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _pct(value: float | None) -> str:
    """Accuracies are percentages (93.1 means 93.1 %)."""
    return _fmt(value, ".2f") + ("%" if value is not None else "")


# ---------------------------------------------------------------------------------------------- summary lines
def _budget_line(report: dict) -> str:
    b = report.get("budget") or {}
    unit = b.get("unit")
    met = {True: "✓ met", False: "✗ NOT MET"}.get(b.get("met"), "? not checked")
    line = f"{b.get('text') or b.get('kind') or 'no budget'}: {_human(b.get('achieved'), unit)}"
    line += f" of {_human(b.get('limit'), unit)} limit, {met}"
    if b.get("search_final") is not None:
        line += f" (search end {_human(b['search_final'], unit)})"
    if b.get("between_layers_ms"):  # a latency budget: the work between the layers, measured once on the model
        line += f", of which {b['between_layers_ms']:.3g} ms between the layers"
    if b.get("floor_only"):
        kinds = " and ".join(f"{kind}s" for kind in b["floor_only"])
        line += f"; {kinds} held at their minimum bits (the budget leaves no room above it: nothing to search)"
    if b.get("weight_start_bits") is not None:
        line += f"; searched weights started at {b['weight_start_bits']} bits (the budget's uniform bits)"
    return line


def metric_name(report: dict) -> str:
    """What ``report["accuracy"]`` measures: ``"accuracy"`` (classification top-1 %, and reports written before
    tasks existed) or the task's metric (``report["metric"]["name"]``, e.g. ``"psnr"``, ``"top-1 agreement"``)."""
    metric = report.get("metric") or {}
    if not metric or metric.get("task") == "classification":
        return "accuracy"
    return metric.get("name") or "metric"


def _accuracy_line(report: dict) -> str | None:
    acc = report.get("accuracy") or {}
    if not any(acc.get(k) is not None for k in ("fp32", "quantized", "integer_reference")):
        return None
    fp32, quant, ref = acc.get("fp32"), acc.get("quantized"), acc.get("integer_reference")
    percent = (report.get("metric") or {}).get("unit", "%") == "%"
    show = _pct if percent else (lambda value: _fmt(value, ".4g"))
    drop = "n/a" if None in (fp32, quant) else f"{fp32 - quant:.2f} pp" if percent else f"{fp32 - quant:.4g}"
    return f"fp32 {show(fp32)}, quantized {show(quant)} (drop {drop}), integer reference {show(ref)}"


# ---------------------------------------------------------------------------------------------- text table
def format_report(report: dict) -> str:
    """The report as a plain-text summary and per-layer table for a terminal."""
    layers = report.get("layers") or []
    totals = report.get("totals") or {}
    lines = [
        f"mpqc report: model {report.get('model', '?')}, method {report.get('method', '?')}"
        + (f", created {report['created']}" if report.get("created") else ""),
        f"budget    {_budget_line(report)}",
        f"{metric_name(report):<9} {_accuracy_line(report) or 'n/a'}",
        "",
    ]
    headers = ["#", "layer", "op", "params", "MACs", "W bits", "A bits", "W search", "A search", "notes"]
    rows = [[str(i), l.get("name", "?"), l.get("op", "?"), _fmt(l.get("params"), ",", "-"),
             "-" if l.get("macs") is None else human_count(l["macs"]),
             _bits(l.get("weight_bits")), _fmt(l.get("activation_bits"), "", "-"),
             _fmt(l.get("weight_bits_search"), ".2f", "-"), _fmt(l.get("activation_bits_search"), ".2f", "-"),
             _notes(l)] for i, l in enumerate(layers)]
    lines += _table(headers, rows, left={1, 2, 9}) if rows else ["(no layers)"]

    wb, fp32b = totals.get("weight_bytes"), totals.get("fp32_weight_bytes")
    ratio = f" ({fp32b / wb:.1f}x smaller than fp32 {human_bytes(fp32b)})" if wb and fp32b else ""
    wall = report.get("wall_time_s") or {}
    lines += [
        "",
        f"weights      {human_bytes(wb) if wb is not None else 'n/a'}{ratio}, "
        f"average {_fmt(totals.get('average_weight_bits'), '.2f')} bits",
        f"activations  max {_human(totals.get('activation_bytes_max'), 'B')}, "
        f"sum {_human(totals.get('activation_bytes_sum'), 'B')}, "
        f"average {_fmt(totals.get('average_activation_bits'), '.2f')} bits",
        f"compute      {_human(totals.get('params'), 'params')}, {_human(totals.get('macs'), 'MACs')}, "
        f"{_human(totals.get('bitops'), 'BitOPs')}"
        + (f", {totals['pruned_channels']} channels pruned" if totals.get("pruned_channels") else "")
        + (f" ({totals['undecided_channels']} gates undecided at the search's end)"
           if totals.get("undecided_channels") else ""),
    ]
    if wall:
        lines.append("wall time    " + ", ".join(f"{k} {v:.1f} s" for k, v in wall.items() if v is not None))
    return "\n".join(lines)


def _notes(layer: dict) -> str:
    notes = ["fixed"] if layer.get("fixed") else []
    if layer.get("predicted_ms") is not None:  # a latency budget's measured table
        notes.append(f"{layer['predicted_ms']:.3f} ms")
    if layer.get("pruned_channels"):
        count = layer["pruned_channels"]
        notes.append(f"{count} channel{'s' if count > 1 else ''} pruned")
    if layer.get("row_bits"):  # a table's rows at their own bit-widths (table_rows="frequency")
        bits = sorted(int(b) for b in layer["row_bits"])
        notes.append(f"rows at {bits[0]}-{bits[-1]} bits" if len(bits) > 1 else f"rows at {bits[0]} bits")
    if (layer.get("channel_gates_search") or {}).get("undecided"):
        notes.append(f"{layer['channel_gates_search']['undecided']} gates undecided")
    return ", ".join(notes)


def _table(headers: list[str], rows: list[list[str]], left: set[int]) -> list[str]:
    """Columns sized to content; text columns (indices in ``left``) left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(headers).rstrip(), "  ".join("-" * w for w in widths), *(fmt(r).rstrip() for r in rows)]


# ---------------------------------------------------------------------------------------------- plot
def plot_bits(report: dict, path: str | Path) -> None:
    """Save a chart of each layer's weight and activation bits (fixed layers hatched) to a PNG at ``path``.

    A narrow top panel shows each layer's share of the parameters. Uses a private ``Figure`` with the Agg
    canvas: no pyplot, no global matplotlib state.
    """
    layers = report.get("layers") or []
    fig = Figure(figsize=(max(8.0, 2.0 + 0.3 * len(layers)), 6.0), dpi=120)
    FigureCanvasAgg(fig)
    fig.suptitle(f"{report.get('model', '?')} · {report.get('method', '?')}", x=0.01, ha="left",
                 fontweight="bold")
    costs = {name: c for name, c in (report.get("cost") or {}).items() if isinstance(c, dict) and c.get("layers")}
    if layers and costs:
        fig.set_figheight(7.5)
        share_ax, cycles_ax, ax = fig.subplots(3, 1, sharex=True, height_ratios=[1, 1.4, 4])
        _draw_share(share_ax, layers)
        _draw_cycles(cycles_ax, layers, costs)
        _draw_bits(ax, layers)
    elif layers:
        share_ax, ax = fig.subplots(2, 1, sharex=True, height_ratios=[1, 4])
        _draw_share(share_ax, layers)
        _draw_bits(ax, layers)
    else:
        share_ax = fig.add_subplot()
        share_ax.text(0.5, 0.5, "no layers", ha="center", va="center")
        share_ax.set_axis_off()
    met = (report.get("budget") or {}).get("met")
    acc = _accuracy_line(report)
    share_ax.set_title(f"budget {_budget_line(report)}" + (f"\n{metric_name(report)} {acc}" if acc else ""), loc="left",
                       fontsize=9, color="#b00020" if met is False else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())


def _draw_share(ax, layers: list[dict]) -> None:
    params = [l.get("params") or 0 for l in layers]
    total = sum(params) or 1
    ax.bar(range(len(layers)), [100 * p / total for p in params], width=0.8, color=_SHARE_COLOR)
    ax.set_ylim(0, 1.15 * max(ax.get_ylim()[1], 1))
    ax.set_ylabel("% of\nparams", fontsize=8)
    ax.tick_params(labelsize=8, bottom=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _draw_cycles(ax, layers: list[dict], costs: dict[str, dict]) -> None:
    """Per layer, modelled accelerator cycles relative to the same layer at 8/8 bits (``report["cost"]``)."""
    width = 0.8 / len(costs)
    for index, (name, cost) in enumerate(costs.items()):
        by_layer = {entry["name"]: entry for entry in cost["layers"]}
        ratios = [by_layer[l["name"]]["cycles"] / by_layer[l["name"]]["cycles_8bit"]
                  if l.get("name") in by_layer and by_layer[l["name"]]["cycles_8bit"] else 0 for l in layers]
        xs = [i - 0.4 + width * (index + 0.5) for i in range(len(layers))]
        ax.bar(xs, ratios, width=width, color=_CYCLE_COLORS[index % len(_CYCLE_COLORS)],
               label=f"{name}: {cost.get('ratio_vs_8bit', float('nan')):.2f}x of 8-bit in all")
    ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 1.35)
    ax.set_ylabel("cycles\nvs 8-bit", fontsize=8)
    ax.tick_params(labelsize=8, bottom=False)
    ax.legend(loc="upper left", ncol=len(costs), fontsize=7, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _tick_label(layer: dict) -> str:
    """The layer's short name, and the channels pruning took from it."""
    pruned = layer.get("pruned_channels")
    return _short(layer.get("name", "?")) + (f" (-{pruned} ch)" if pruned else "")


def _draw_bits(ax, layers: list[dict]) -> None:
    x = range(len(layers))
    hatch = ["////" if l.get("fixed") else "" for l in layers]
    top = 1.0
    for offset, key, color in ((-0.2, "weight_bits", _W_COLOR), (0.2, "activation_bits", _A_COLOR)):
        xs = [i + offset for i in x]
        bits = [l.get(key) or 0 for l in layers]
        ax.bar(xs, bits, width=0.4, color=color, edgecolor="white", hatch=hatch, linewidth=0.5)
        search = [(xi, l[f"{key}_search"]) for xi, l in zip(xs, layers) if l.get(f"{key}_search") is not None]
        if search:
            ax.scatter(*zip(*search), marker="_", s=50, color="black", linewidths=1.2, zorder=3)
        top = max(top, *bits, *(b for _, b in search))
    ax.set_ylim(0, top * 1.2 + 0.5)
    ax.set_ylabel("bits")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xticks(list(x), [_tick_label(l) for l in layers], rotation=60, ha="right", rotation_mode="anchor",
                  fontsize=8)
    for tick, l in zip(ax.get_xticklabels(), layers):
        if l.get("fixed"):
            tick.set_color("#777777")
    handles = [Patch(color=_W_COLOR, label="weight bits"), Patch(color=_A_COLOR, label="activation bits"),
               Patch(facecolor="#bbbbbb", edgecolor="white", hatch="////", label="fixed precision"),
               Line2D([], [], marker="_", markersize=8, linestyle="", color="black", label="bits at search end")]
    ax.legend(handles=handles, loc="upper left", ncol=4, fontsize=8, frameon=False)


def _short(name: str, limit: int = 28) -> str:
    """Long qualified names keep their (most specific) tail: ``…denselayer16.conv2``."""
    return name if len(name) <= limit else "…" + name[-(limit - 1):]
