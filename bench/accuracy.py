"""Accuracy at a budget (issue 4): every method side by side with uniform QAT, one ``mpqc.sweep`` of ResNet-20 on
Fashion-MNIST.

    python bench/accuracy.py --quick   # smoke: 10+10 steps per point on a subset, under 10 minutes on 2 cores
    python bench/accuracy.py           # the measurement: full epochs (hours), run by hand, JSON committed

Rows: the fp32 baseline; uniform QAT with 2-, 3- and 4-bit weights and 8-bit activations; DQ, FracBits (layer- and
kernel-wise), SDQ and CSQ at the weight-memory budgets of those uniform models (2, 3 and 4 bits per weight) with
8-bit activations; and one BitOPs row per method, at the BitOPs of uniform W3A8. Columns: top-1, drop vs fp32,
achieved cost, budget met, wall time (the ``mpqc report`` table of the sweep). The goals it measures (not tests):

1. at <= 2.0 average weight bits and 8-bit activations, a drop of at most 0.3 points vs fp32 (best method);
2. every method at least as accurate as uniform QAT at the same budget (W2, W3, W4 weight memory and W3A8 BitOPs).

Writes ``bench/results/accuracy.json`` and keeps the runs in ``runs/bench/accuracy-<mode>/`` (re-running
continues an interrupted run; ``--fresh`` starts over). Quick and full differ only in training length and data
size (``quick_means`` in the JSON); the helpers are ``bench/sweep.py``'s.
"""
from __future__ import annotations

from typing import Any, Sequence

from sweep import benchmark, best, goal, not_run

from mpqc.sweep import UNIFORM, SweepPoint

METHODS = ["dq", "fracbits", "fracbits-kernel", "sdq", "csq"]
UNIFORM_BITS = [2, 3, 4]
BUDGETS = ["weight-memory=" + ",".join(f"{b}b" for b in UNIFORM_BITS), "bitops=W3A8"]


def accuracy_goals(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """The two goals of issue 4 (module docstring)."""
    at_2 = lambda p: p.method != UNIFORM and p.budget == "weight-memory=2bpw" and p.act_bits == 8  # noqa: E731
    top = best(points, at_2)
    per_method = ", ".join(f"{p.method} {p.drop:.2f}" for p in points if at_2(p) and p.drop is not None)
    goal1 = goal("drop <= 0.3 points at <= 2.0 bits per weight, A8 (best method)",
                 None if top is None else top.drop <= 0.3, None if top is None else top.drop, 0.3,
                 f"best {top.name}; drops: {per_method}" if top else "not measurable: " + not_run(points, at_2))

    same_budget = {f"weight-memory={b}bpw": b for b in UNIFORM_BITS} | {"bitops=W3A8": 3}
    uniform = {p.uniform_bits: p for p in points if p.method == UNIFORM and p.act_bits == 8 and p.top1 is not None}
    comparisons = [(p, uniform.get(same_budget[p.budget])) for p in points
                   if p.method != UNIFORM and p.budget in same_budget]
    margins = [p.top1 - u.top1 for p, u in comparisons if u and p.top1 is not None]
    behind = [f"{p.name} {p.top1:.2f}% < uniform W{u.uniform_bits}A8 {u.top1:.2f}%" for p, u in comparisons
              if u and p.top1 is not None and p.top1 < u.top1]
    missing = [p.name for p, u in comparisons if u is None or p.top1 is None]
    goal2 = goal("every method >= uniform QAT at the same budget", None if missing else not behind,
                 min(margins, default=None), 0.0,
                 "; ".join(behind + ([f"not measured: {', '.join(missing)}"] if missing else []))
                 or "every method matched or beat uniform QAT")
    return [goal1, goal2]


def main() -> None:
    benchmark("accuracy", __doc__, lambda quick: {"budgets": BUDGETS, "methods": METHODS, "act_bits": [8],
                                                  "uniform_bits": UNIFORM_BITS}, accuracy_goals, "goals (issue 4)")


if __name__ == "__main__":
    main()
