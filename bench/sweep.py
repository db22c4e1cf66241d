"""The accuracy-budget trade-off of issue 9: an ``mpqc.sweep`` of ResNet-20 on Fashion-MNIST, and the bar it measures.

    python bench/sweep.py --quick     # smoke: fewer budgets, 10+10 steps per point on a subset (~5-10 min, 2 cores)
    python bench/sweep.py             # the measurement: full epochs; hours, run by hand, JSON committed

The grid: methods dq, fracbits, fracbits-kernel, sdq, csq at weight-memory budgets of 1.0, 1.25, 1.5, 2, 3, 4 bits
per weight (quick: 1.5, 2, 3) with activations at 8 and at 4 bits, plus uniform QAT (W1 is reported as not
expressible: weights are signed symmetric, at least 2 bits). Budgets below 2.0 bits per weight are reachable only
by pruning channels (fracbits-kernel: 0 bit = pruned channel); the other methods' points there are infeasible and
reported so. The bar, evaluated from the finished points (``bars`` in the JSON):

1. at 1.5 weight bits per weight with 8-bit activations, a drop of at most 0.5 points vs fp32 (best method);
2. at 2 bits per weight with 4-bit activations, at least 0.3 points above uniform W2A4 QAT (best method);
3. the best mixed-precision curve at or above the uniform curve at every budget: for each uniform point, some
   method's point with the same activation bits and at most its weight memory is at least as accurate.

Writes ``bench/results/sweep.json`` (the settings, what quick means, the sweep's points, the bars; its plot beside
it, ``sweep_pareto.png``) and keeps the runs in ``runs/bench/sweep-<mode>/`` (``sweep.json``, ``pareto.png``, one
compile run per point): re-running continues an interrupted sweep, ``--fresh`` starts over. ``bench/accuracy.py``
reuses the helpers below.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 shared cores: no OpenMP busy-waiting

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))  # this checkout's mpqc, not an installed one

import mpqc  # noqa: E402
import mpqc.train  # noqa: E402
from mpqc.budgets import SQUARED_PENALTY  # noqa: E402
from mpqc.cli_inputs import bits_or_budget  # noqa: E402
from mpqc.data import loaders  # noqa: E402
from mpqc.pretrain import cached_fp32  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402
from mpqc.sweep import (DONE, UNIFORM, SweepPoint, SweepResult, identity_differences, merge_sweeps,  # noqa: E402
                        plot_sweep)
from models import resnet20  # noqa: E402

#: The recipe of a full run (issue 18): fp32 15 epochs, then each point 10 epochs in all (search 6, fine-tuning 4 with
#: KD) with mpqc's training recipe (augmentation, Nesterov SGD + cosine, weight decay 5e-4, MSE-initialised
#: per-channel weight scales, percentile activation ranges), the weights' learning rates smaller than the defaults
#: (search 0.002, fine-tuning 0.001; at the defaults uniform 2-bit QAT diverged on this BN-folded model before
#: issue 18) and no KD in the search. ``control_epochs``: the fp32 control trained as long as the whole compile
#: (fp32 + search + fine-tuning epochs), against which drops are reported.
FULL = {"model": "resnet20", "data": "fashion-mnist", "fp32_epochs": 15, "batch_size": 128, "subset": None,
        "val_subset": None, "search_epochs": 6, "finetune_epochs": 4, "steps_per_epoch": None, "search_lr": 0.002,
        "finetune_lr": 0.001, "quantizer_lr": 0.01, "search_distill": False, "finetune_distill": True, "seed": 0,
        "augment": True, "nesterov": True, "weight_decay": 5e-4, "weight_init": "mse",
        "activation_percentile": 99.99, "control_epochs": 25}
#: Quick: the same model, fp32 weights and recipe, each phase cut to 10 steps, a training and a validation subset;
#: no fp32 control (it would train 25 epochs): drops are against the fp32 starting point.
QUICK = {**FULL, "subset": 4000, "val_subset": 500, "search_epochs": 1, "finetune_epochs": 1, "steps_per_epoch": 10,
         "control_epochs": None}
#: Where the full and quick runs keep their fp32 weights (the 15-epoch start and the 25-epoch control): in the
#: repository, so that parts of a full run made on other days or machines start from the same weights and merge
#: (``--merge-results``; a sweep's identity includes the weights' hash). Missing files are trained and saved here.
FP32_DIR = ROOT / "bench" / "fp32"
QUICK_MEANS = ("the same ResNet-20 (cached 15-epoch fp32 weights), grid and recipe, but each point trains for 10 "
               "search + 10 fine-tuning steps of 128 images from a seeded 4,000-image subset of the Fashion-MNIST "
               "training set (full: 6 + 4 epochs of 469 steps over all 60,000), is validated on 500 test images "
               "(full: 10,000), and drops are against the fp32 start (full: against the 25-epoch fp32 control)")


def settings(quick: bool) -> dict[str, Any]:
    return dict(QUICK if quick else FULL)


def prepare(s: dict[str, Any]) -> tuple[torch.nn.Module, torch.Tensor, tuple, mpqc.CompileConfig]:
    """The cached fp32 ResNet-20, example inputs, the loaders and the compile config that ``s`` describes."""
    model = cached_fp32(resnet20, s["data"], epochs=s["fp32_epochs"], seed=s["seed"], progress=False,
                        augment=s["augment"], nesterov=s["nesterov"], cache_dir=FP32_DIR)
    data = loaders(s["data"], batch_size=s["batch_size"], subset=s["subset"], val_subset=s["val_subset"],
                   seed=s["seed"], augment=s["augment"])
    phase = dict(max_steps_per_epoch=s["steps_per_epoch"], quantizer_lr=s["quantizer_lr"], nesterov=s["nesterov"],
                 weight_decay=s["weight_decay"])
    config = mpqc.CompileConfig(
        quantizers=mpqc.QuantizerConfig(weight_init=s["weight_init"], weight_init_bits=s.get("weight_init_bits"),
                                        activation_percentile=s["activation_percentile"]),
        search=mpqc.TrainConfig(epochs=s["search_epochs"], lr=s["search_lr"], distill=s["search_distill"],
                                penalty_power=s.get("penalty_power"), **phase),
        finetune=mpqc.TrainConfig(epochs=s["finetune_epochs"], lr=s["finetune_lr"], distill=s["finetune_distill"],
                                  penalty_weight=0.0, **phase),
        seed=s["seed"], progress=sys.stderr.isatty(),
    )
    return model, next(iter(data[1]))[0][:2], data, config


def fp32_control(s: dict[str, Any], val_loader) -> dict[str, Any] | None:
    """The fp32 control: ResNet-20 trained ``control_epochs`` (fp32 + compile epochs) with the fp32 recipe, cached
    like the starting point; its validation top-1. None where ``s`` asks for none (quick mode)."""
    if not s.get("control_epochs"):
        return None
    started = time.perf_counter()
    model = cached_fp32(resnet20, s["data"], epochs=s["control_epochs"], seed=s["seed"], progress=False,
                        augment=s["augment"], nesterov=s["nesterov"], cache_dir=FP32_DIR)
    return {"epochs": s["control_epochs"], "top1": mpqc.train.evaluate(model, val_loader),
            "wall_s": time.perf_counter() - started}


def drops_against(points: Sequence[SweepPoint], control: dict[str, Any] | None) -> None:
    """Each finished point's ``drop`` against the fp32 control's top-1, where there is a control."""
    if control is None:
        return
    for point in points:
        if point.top1 is not None:
            point.drop = control["top1"] - point.top1


def merge_results(paths: Sequence[Path], runs: Path
                  ) -> tuple[SweepResult, dict[str, Any] | None, dict[str, Any], bool]:
    """One sweep in ``<runs>-merged`` from the result JSON files of parts run apart (``--out`` of each part): their
    points (the first finished one where parts overlap), the fp32 control they measured, their settings and whether
    they were quick runs. Refused (SystemExit naming the file and what differs) unless every part is the same sweep:
    the same fp32 weights, data, config and mode. Needs neither the data nor the weights; replaces an earlier
    merge's directory, never a sweep's."""
    parts = []
    for path in paths:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--merge-results: cannot read {path}: {exc}") from None
        if "sweep" not in parts[-1]:
            raise SystemExit(f"--merge-results: {path} is not a sweep benchmark's result file (no 'sweep')")
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        changed = identity_differences(_without_penalty_power(part["sweep"].get("identity")),
                                       _without_penalty_power(first["sweep"].get("identity")))
        if part.get("mode") != first.get("mode"):
            changed.append("mode")
        if changed:
            raise SystemExit(f"--merge-results: {path} is another sweep than {paths[0]} ({', '.join(changed)} "
                             "differ); parts merge only from the same fp32 weights (bench/fp32/), data and config")
    powers = _penalty_powers(paths, parts)
    controls = {json.dumps(part["fp32_control"], sort_keys=True): part["fp32_control"]
                for part in parts if part.get("fp32_control")}
    tops = sorted({round(c["top1"], 4) for c in controls.values()})
    if len(tops) > 1:
        raise SystemExit(f"--merge-results: the parts measured different fp32 controls ({tops}): not one control")
    target = runs.with_name(runs.name + "-merged")
    if target.exists():
        kept = sorted({p.name for p in target.iterdir()} - {"sweep.json", "pareto.png"})
        if kept:
            raise SystemExit(f"--merge-results: {target} holds more than an earlier merge ({', '.join(kept)}); "
                             "give another --runs")
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory() as staging:
        directories = [Path(staging) / str(i) for i in range(len(parts))]
        for directory, part in zip(directories, parts):
            directory.mkdir()
            # each point's power checked above: the merged sweep's identity leaves it to settings["penalty_powers"]
            sweep = dict(part["sweep"], identity=_without_penalty_power(part["sweep"].get("identity")))
            (directory / "sweep.json").write_text(json.dumps(sweep))
        result = merge_sweeps(directories, target)
    result.info["merged_from"] = [str(path) for path in paths]
    settings = dict(first["settings"], grid=f"merged from {', '.join(map(str, paths))}", penalty_powers=powers)
    return result, next(iter(controls.values()), None), settings, first.get("mode") == "quick"


def _without_penalty_power(identity: dict[str, Any] | None) -> dict[str, Any]:
    """A sweep's identity less the search's penalty power: which power each point used is checked per point."""
    identity = json.loads(json.dumps(identity or {}))
    (identity.get("config") or {}).get("search", {}).pop("penalty_power", None)
    return identity


def _penalty_powers(paths: Sequence[Path], parts: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The budget penalty's power of each method in a merged table: the first part's ``--penalty-power`` where it
    set one, else the method's registered default. SystemExit naming every finished point searched with another
    (a row without ``penalty_power`` ran before it was recorded, at its part's setting or 2, every method's default
    then): a method's default changing must not relabel its earlier points."""
    def explicit(part: dict[str, Any]) -> float | None:
        return (((part["sweep"].get("identity") or {}).get("config") or {}).get("search") or {}).get("penalty_power")

    chosen = explicit(parts[0])
    powers, stale = {}, []
    for path, part in zip(paths, parts):
        for row in part["sweep"].get("points", []):
            if row.get("method") == UNIFORM or row.get("status") != DONE:
                continue
            expected = powers.setdefault(row["method"], chosen if chosen is not None
                                         else get_method(row["method"]).defaults.penalty_power)
            used = row.get("penalty_power") or explicit(part) or SQUARED_PENALTY
            if used != expected:
                stale.append(f"  {SweepPoint.from_dict(row).name} in {path}: penalty power {used:g}, "
                             f"this table's {row['method']} {expected:g}")
    if stale:
        raise SystemExit("--merge-results: points searched with another budget penalty than the table's (rerun "
                         "them, or keep them apart as variants):\n" + "\n".join(stale))
    return powers


# ------------------------------------------------------------------------------------------------ reading points
def best(points: Sequence[SweepPoint], keep: Callable[[SweepPoint], bool]) -> SweepPoint | None:
    """The most accurate finished point that met its budget among those ``keep`` accepts."""
    done = [p for p in points if p.status == DONE and p.budget_met and p.top1 is not None and keep(p)]
    return max(done, key=lambda p: p.top1, default=None)


def not_run(points: Sequence[SweepPoint], keep: Callable[[SweepPoint], bool]) -> str:
    """Why the points ``keep`` accepts have no result (e.g. ``infeasible: smallest achievable 66.07 KiB``)."""
    reasons = sorted({p.status + (f": smallest achievable {p.smallest_feasible}" if p.smallest_feasible else "")
                      for p in points if keep(p) and p.status != DONE})
    return "; ".join(reasons) or "no such point in the sweep"


def goal(name: str, met: bool | None, value: float | None, threshold: float, note: str) -> dict[str, Any]:
    """One bar/goal: ``met`` is None when it could not be measured (``note`` says why)."""
    return {"goal": name, "met": met, "value": value, "threshold": threshold, "note": note}


def mixed_at_least_uniform(points: Sequence[SweepPoint]) -> dict[str, Any]:
    """For each finished uniform point: the best method point with the same activation bits and at most its weight
    memory must be at least as accurate. Met when every uniform point passes (None if there is none)."""
    checks = []
    for u in [p for p in points if p.method == UNIFORM and p.status == DONE and p.top1 is not None]:
        rival = best(points, lambda p: p.method != UNIFORM and p.act_bits == u.act_bits
                     and p.weight_bytes <= u.weight_bytes * (1 + 1e-9))
        checks.append({"uniform": u.name, "uniform_top1": u.top1, "best_mixed": rival.name if rival else None,
                       "best_mixed_top1": rival.top1 if rival else None,
                       "ok": rival is not None and rival.top1 >= u.top1})
    name = "best mixed-precision curve >= uniform QAT at every budget"
    if not checks:
        return {**goal(name, None, None, 0.0, "no finished uniform point"), "checks": checks}
    margins = [c["best_mixed_top1"] - c["uniform_top1"] for c in checks if c["best_mixed"]]
    failed = [c for c in checks if not c["ok"]]
    note = "; ".join(f"{c['uniform']} {c['uniform_top1']:.2f}% vs "
                     + (f"{c['best_mixed']} {c['best_mixed_top1']:.2f}%" if c["best_mixed"] else "no mixed point")
                     for c in failed)
    result = goal(name, not failed, min(margins, default=None), 0.0, note or "every uniform point matched or beaten")
    result["checks"] = checks
    return result


def format_goals(goals: Sequence[dict[str, Any]]) -> str:
    mark = {True: "MET", False: "NOT MET", None: "not measured"}
    return "\n".join(f"  [{mark[g['met']]}] {g['goal']}: "
                     + (f"{g['value']:.2f} (threshold {g['threshold']:g}); " if g["value"] is not None else "")
                     + g["note"] for g in goals)


def write_results(path: Path, name: str, s: dict[str, Any], quick: bool, result: SweepResult,
                  goals: Sequence[dict[str, Any]], started: float, quick_grid: str = "",
                  control: dict[str, Any] | None = None) -> None:
    payload = {
        "benchmark": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if quick else "full",
        "quick_means": QUICK_MEANS + (f"; {quick_grid}" if quick_grid else "") if quick else None,
        "note": ("quick mode is a smoke run: the goals are evaluated the same way, but only a full run measures "
                 "them") if quick else None,
        "settings": s,
        "goals": list(goals),
        "fp32_control": control,
        "drop_against": "fp32_control" if control else "the fp32 starting point (sweep.fp32_top1)",
        "sweep_dir": str(result.path),
        "sweep": result.to_dict(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads()},
        "wall_s": time.perf_counter() - started,
        "points_wall_s": sum(p.wall_time_s or 0.0 for p in result.points),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    plot = path.with_name(f"{path.stem}_pareto.png")  # next to the JSON, to be committed with it
    references = {f"fp32 control ({control['epochs']} epochs)": control["top1"]} if control else None
    plot_sweep(payload["sweep"], plot, references=references)  # the sweep's plot, with the control drops are against
    print(f"\nwrote {path} and {plot} ({payload['wall_s']:.0f} s)")


def benchmark(name: str, description: str, grid: Callable[[bool], dict[str, Any]],
              measure: Callable[[Sequence[SweepPoint]], list[dict[str, Any]]], heading: str,
              quick_grid: str = "") -> None:
    """The command line of a sweep benchmark: run the sweep ``grid(quick)`` describes (budgets, methods, act_bits,
    uniform_bits), print its table and the goals ``measure`` finds in its points, write the JSON. ``quick_grid``
    says how the quick grid differs from the full one."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (see the JSON's quick_means)")
    parser.add_argument("--fresh", action="store_true", help="delete the runs of an earlier sweep and start over")
    parser.add_argument("--runs", type=Path, help=f"sweep directory (default runs/bench/{name}-<mode>)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"{name}.json")
    parser.add_argument("--methods", help="only these methods of the grid (comma-separated), e.g. to run a part "
                                          "of a full sweep on each of several machines; 'none': uniform QAT only)")
    parser.add_argument("--budgets", help="only these budgets (KIND=V1,V2 as mpqc sweep reads them)")
    parser.add_argument("--act-bits", help="only these activation bit-widths (comma-separated)")
    parser.add_argument("--uniform", help="only these uniform-QAT weight bit-widths (comma-separated; 'none')")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fp32 models, data order and compile "
                                                            "(runs in runs/bench/<name>-<mode>-seed<N> for N > 0)")
    parser.add_argument("--weight-init-bits", type=bits_or_budget,
                        help="where the searched weights start: N bits or 'budget' (QuantizerConfig."
                             "weight_init_bits; default 8). Another config: its parts merge only with each other")
    parser.add_argument("--penalty-power", type=float,
                        help="the search's budget penalty relu(excess) ** POWER (TrainConfig.penalty_power; default: "
                             "the method's, 1 for fracbits-kernel, else 2). Points merge only with points of "
                             "the same power per method")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                        help="run nothing: merge finished parts of this benchmark's sweep (run with --methods etc., "
                             "e.g. on several machines) into --runs, then evaluate and write the JSON")
    parser.add_argument("--merge-results", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: merge the result files (--out) of parts run apart, e.g. on other days, "
                             "from the same fp32 weights (bench/fp32/), then evaluate and write --out")
    args = parser.parse_args()
    seeded = f"-seed{args.seed}" if args.seed else ""
    runs = args.runs or ROOT / "runs" / "bench" / f"{name}-{'quick' if args.quick else 'full'}{seeded}"
    started = time.perf_counter()
    if args.merge_results:
        result, control, s, quick = merge_results(args.merge_results, runs)
        report(name, args.out, s, quick, result, measure, heading, started, quick_grid, control)
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    s = {**settings(args.quick), "seed": args.seed,
         **({"weight_init_bits": args.weight_init_bits} if args.weight_init_bits is not None else {}),
         **({"penalty_power": args.penalty_power} if args.penalty_power is not None else {})}
    model, example, data, config = prepare(s)
    chosen = grid(args.quick)
    if args.methods:
        chosen["methods"] = [] if args.methods == "none" else args.methods.split(",")
    if args.budgets:
        chosen["budgets"] = args.budgets
    if args.act_bits:
        chosen["act_bits"] = [int(bits) for bits in args.act_bits.split(",")]
    if args.uniform:
        chosen["uniform_bits"] = [] if args.uniform == "none" else [int(bits) for bits in args.uniform.split(",")]
    s["grid"] = chosen
    if args.merge:
        s["grid"] = f"merged from {', '.join(map(str, args.merge))}"
        result = merge_sweeps(args.merge, runs)
    else:
        result = mpqc.sweep(model, example, data=data, out=runs, config=config, resume=not args.fresh,
                            force=args.fresh, **chosen)
    report(name, args.out, s, args.quick, result, measure, heading, started, quick_grid, fp32_control(s, data[1]))


def report(name: str, out: Path, s: dict[str, Any], quick: bool, result: SweepResult,
           measure: Callable[[Sequence[SweepPoint]], list[dict[str, Any]]], heading: str, started: float,
           quick_grid: str, control: dict[str, Any] | None) -> None:
    """Drops against ``control``, the goals ``measure`` finds, the table printed and the JSON written."""
    drops_against(result.points, control)
    goals = measure(result.points)
    print(result.table())
    if control:
        print(f"\nfp32 control ({control['epochs']} epochs): {control['top1']:.2f}%; goals' drops are against it")
    print(f"\n{heading}:\n" + format_goals(goals))
    write_results(out, name, s, quick, result, goals, started, quick_grid, control)


# ------------------------------------------------------------------------------------------------ this benchmark
def sweep_bars(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """The three bars of issue 9 (module docstring)."""
    at_1_5 = lambda p: p.method != UNIFORM and p.budget == "weight-memory=1.5bpw" and p.act_bits == 8  # noqa: E731
    low = best(points, at_1_5)
    bar1 = goal("drop <= 0.5 points at 1.5 bits per weight, A8 (best method)",
                None if low is None else low.drop <= 0.5, None if low is None else low.drop, 0.5,
                f"{low.name}: {low.top1:.2f}%" if low else "not measurable: " + not_run(points, at_1_5))
    at_2 = lambda p: p.method != UNIFORM and p.budget == "weight-memory=2bpw" and p.act_bits == 4  # noqa: E731
    mixed = best(points, at_2)
    uniform = best(points, lambda p: p.method == UNIFORM and p.uniform_bits == 2 and p.act_bits == 4)
    margin = mixed.top1 - uniform.top1 if mixed and uniform else None
    bar2 = goal("at 2 bits per weight, A4: >= 0.3 points above uniform W2A4 QAT (best method)",
                None if margin is None else margin >= 0.3, margin, 0.3,
                f"{mixed.name} {mixed.top1:.2f}% vs uniform W2A4 {uniform.top1:.2f}%" if margin is not None
                else "not measurable: " + not_run(points, at_2))
    return [bar1, bar2, mixed_at_least_uniform(points)]


def grid(quick: bool) -> dict[str, Any]:
    budgets = "weight-memory=1.5b,2b,3b" if quick else "weight-memory=1.0b,1.25b,1.5b,2b,3b,4b"
    return {"budgets": budgets, "methods": ["dq", "fracbits", "fracbits-kernel", "sdq", "csq"], "act_bits": [8, 4]}


def main() -> None:
    benchmark("sweep", __doc__, grid, sweep_bars, "bars (issue 9)",
              quick_grid="the budgets are 1.5, 2 and 3 bits per weight (full: 1.0, 1.25, 1.5, 2, 3, 4)")


if __name__ == "__main__":
    main()
