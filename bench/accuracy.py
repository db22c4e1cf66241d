"""Accuracy at a budget (issues 4 and 18): every method side by side with uniform QAT, one ``mpqc.sweep`` of
ResNet-20 on Fashion-MNIST, drops measured against an fp32 control trained as long as the whole compile.

    python bench/accuracy.py --quick   # smoke: 10+10 steps per point on a subset, under 10 minutes on 2 cores
    python bench/accuracy.py           # the measurement: full epochs (hours), run by hand, JSON committed

The full run (issue 18's compute: fp32 15 epochs, each point 6 search + 4 fine-tuning epochs, the fp32 control
25 epochs; ``bench/sweep.py``'s ``FULL``) is run in parts, each continuing where it stopped when re-run, then merged:

    nice python bench/accuracy.py --runs runs/bench/acc-a8      # A8 at 2, 3, 4 bits/weight, BitOPs W3A8, uniform
                                                                # W2A8, W3A8, W4A8 (a 4 bits/weight budget is what
                                                                # puts uniform W4A8 in the sweep)
    nice python bench/accuracy.py --runs runs/bench/acc-a4 --act-bits 4 --budgets weight-memory=2b --uniform 2
    nice python bench/accuracy.py --runs runs/bench/acc-1.5 --methods fracbits-kernel \
        --budgets weight-memory=1.5b --uniform none
    python bench/accuracy.py --merge runs/bench/acc-a8 runs/bench/acc-a4 runs/bench/acc-1.5   # JSON + pareto.png

(a part may also be split further with ``--methods``; ``--seed 1`` repeats any of them with another seed into
``runs/bench/...-seed1`` directories given with ``--runs`` and ``--out bench/results/accuracy_seed1.json``).

Parts run on other days or machines, whose run directories are gone, merge from their result files instead: every
part starts from the fp32 weights committed in ``bench/fp32/`` (trained once, then shared: a sweep's identity holds
the weights' hash, so parts from other weights are refused), writes its own ``--out``, committed under
``bench/results/accuracy_parts/``, and

    python bench/accuracy.py --merge-results bench/results/accuracy_parts/*.json   # JSON + pareto.png, no data

Rows: the fp32 start and the fp32 control; uniform QAT with 2-, 3- and 4-bit weights; DQ, FracBits (layer- and
kernel-wise), SDQ and CSQ at the weight-memory budgets of uniform 2, 3 and 4 bits per weight, and one BitOPs row per
method at the BitOPs of uniform W3A8. Columns: top-1, drop vs the fp32 control, achieved cost, budget met, wall
time (the ``mpqc report`` table of the sweep). The goals it measures (not tests):

1. at <= 2.0 average weight bits and 8-bit activations, a drop of at most 0.3 points (best method);
2. at 2 bits per weight and 4-bit activations, a drop of at most 0.6 points (best method);
3. at 1.5 bits per weight and 8-bit activations, a drop of at most 0.7 points (best method);
4. at every budget, the best mixed-precision point at least as accurate as uniform QAT with the same activation
   bits and no less weight memory (``bench/sweep.py: mixed_at_least_uniform``);
5. at 3 bits per weight (the weight memory and the BitOPs of uniform W3A8), every method at least as accurate as
   uniform W3A8 QAT.

Writes ``bench/results/accuracy.json`` (its plot beside it, ``accuracy_pareto.png``) and keeps the runs in
``runs/bench/accuracy-<mode>/`` (re-running continues an interrupted run; ``--fresh`` starts over). Quick and full
differ only in training length and data size (``quick_means`` in the JSON); the helpers are ``bench/sweep.py``'s.
"""
from __future__ import annotations

from typing import Any, Sequence

from sweep import benchmark, best, goal, mixed_at_least_uniform, not_run

from mpqc.sweep import UNIFORM, SweepPoint

METHODS = ["dq", "fracbits", "fracbits-kernel", "sdq", "csq"]
UNIFORM_BITS = [2, 3, 4]
UNIFORM_POINTS = [(2, 8), (3, 8), (4, 8), (2, 4)]  # (weight bits, activation bits): the A8 part's and the A4 part's
BUDGETS = ["weight-memory=2b,3b,4b", "bitops=W3A8"]


def accuracy_goals(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """The goals of issues 4 and 18 (module docstring); drops are against the fp32 control where there is one."""
    drop_goals = [_drop_goal(points, "weight-memory=2bpw", 8, 0.3), _drop_goal(points, "weight-memory=2bpw", 4, 0.6),
                  _drop_goal(points, "weight-memory=1.5bpw", 8, 0.7)]

    same_budget = {"weight-memory=3bpw": 3, "bitops=W3A8": 3}  # where every method must match uniform QAT
    uniform = {(p.uniform_bits, p.act_bits): p for p in points if p.method == UNIFORM and p.top1 is not None}
    comparisons = [(p, uniform.get((same_budget[p.budget], p.act_bits))) for p in points
                   if p.method != UNIFORM and p.budget in same_budget and p.act_bits == 8]
    margins = [p.top1 - u.top1 for p, u in comparisons if u and p.top1 is not None]
    behind = [f"{p.name} {p.top1:.2f}% < uniform W{u.uniform_bits}A{u.act_bits} {u.top1:.2f}%" for p, u in comparisons
              if u and p.top1 is not None and p.top1 < u.top1]
    measured = {(p.method, p.budget) for p, u in comparisons if u and p.top1 is not None}
    missing = [f"{method} {budget}" for budget in same_budget for method in METHODS if (method, budget) not in measured]
    every_method = goal("every method >= uniform QAT at 3 bits/weight", _partial(bool(behind), missing),
                        min(margins, default=None), 0.0,
                        "; ".join(behind + ([f"not measured: {', '.join(missing)}"] if missing else []))
                        or "every method matched or beat uniform QAT")

    mixed = mixed_at_least_uniform(points)  # over the uniform points measured; the grid's others are named
    unmeasured = [f"uniform W{bits}A{act}" for bits, act in UNIFORM_POINTS if (bits, act) not in uniform]
    if unmeasured:
        mixed = {**mixed, "met": _partial(mixed["met"] is False, unmeasured),
                 "note": f"{mixed['note']}; not measured: {', '.join(unmeasured)}"}
    return drop_goals + [mixed, every_method]


def _partial(failed: bool, unmeasured: Sequence[str]) -> bool | None:
    """A comparison goal over the grid: one point behind fails it whatever is unmeasured; otherwise it is met only
    when nothing is left unmeasured (None: not measured yet)."""
    return False if failed else None if unmeasured else True


def _drop_goal(points: Sequence[SweepPoint], budget: str, act_bits: int, threshold: float) -> dict[str, Any]:
    """The best method's drop at ``budget`` with ``act_bits``-bit activations at most ``threshold`` points."""
    at = lambda p: p.method != UNIFORM and p.budget == budget and p.act_bits == act_bits  # noqa: E731
    top = best(points, at)
    per_method = ", ".join(f"{p.method} {p.drop:.2f}" for p in points if at(p) and p.drop is not None)
    return goal(f"drop <= {threshold} points at {budget.partition('=')[2]}, A{act_bits} (best method)",
                None if top is None else top.drop <= threshold, None if top is None else top.drop, threshold,
                f"best {top.name}; drops: {per_method}" if top else "not measurable: " + not_run(points, at))


def main() -> None:
    benchmark("accuracy", __doc__, lambda quick: {"budgets": BUDGETS, "methods": METHODS, "act_bits": [8],
                                                  "uniform_bits": UNIFORM_BITS},
              accuracy_goals, "goals (issues 4 and 18)")


if __name__ == "__main__":
    main()
