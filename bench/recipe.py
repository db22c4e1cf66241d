"""Issue 18's recipe against the one before it, at one point, on Fashion-MNIST ResNet-20: a short measured comparison.

    nice python bench/recipe.py                    # defaults below: ~20-25 minutes on a shared 2-core AVX2 host
    nice python bench/recipe.py --steps 20 --subset 4000 --val-subset 500 --fp32-epochs 1   # a smoke run

Each recipe trains its own fp32 ResNet-20 (cached, ``mpqc.pretrain.cached_fp32``) and compiles it at two points,
uniform W2A8 (every weight at 2 bits, DQ's quantizers at fixed bits: step size and range learned) and DQ at 2 bits
per weight with 8-bit activations, each with ``--steps`` search and ``--steps`` fine-tuning steps of 128 images
(fine-tuning with KD from the fp32 model, learning rates 0.002 / 0.001 as ``bench/sweep.py``'s full recipe):

* ``old``: the recipe before issue 18: no augmentation, SGD momentum 0.9 without Nesterov, weight decay 5e-5 in
  QAT, weight ranges at each channel's largest magnitude, activation ranges at the calibration batch's maximum;
* ``new``: augmentation (random crop pad 2 + horizontal flip), Nesterov, weight decay 5e-4, per-channel weight
  clipping by the MSE search, activation ranges at the 99.99th percentile;
* ``init-only``: the old optimizer and data with the new range initialisation (mpqc's defaults: measured best for
  the mixed-precision point and close to ``new`` at uniform W2A8).

Writes ``bench/results/recipe.json``: per recipe the fp32 top-1 and each point's top-1, integer-reference top-1,
average weight bits and wall time, with the machine (CPU model, AVX2 / AVX-512 flags) and the command.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 shared cores: no OpenMP busy-waiting

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))  # this checkout's mpqc, not an installed one

import mpqc  # noqa: E402
from mpqc.cpu import cpu_flags, cpu_model  # noqa: E402
from mpqc.data import loaders  # noqa: E402
from mpqc.pretrain import cached_fp32  # noqa: E402
from mpqc.train import evaluate  # noqa: E402
from models import resnet20  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """The settings issue 18 changed."""

    augment: bool
    nesterov: bool
    weight_decay: float
    weight_init: str
    activation_percentile: float


RECIPES = {
    "old": Recipe(augment=False, nesterov=False, weight_decay=5e-5, weight_init="max", activation_percentile=100.0),
    "new": Recipe(augment=True, nesterov=True, weight_decay=5e-4, weight_init="mse", activation_percentile=99.99),
    # Ablation: the old optimizer and data (and so the old fp32 model), the new range initialisation.
    "init-only": Recipe(augment=False, nesterov=False, weight_decay=5e-5, weight_init="mse",
                        activation_percentile=99.99),
}
#: (name, method, weight bit range, bits per weight of the budget): uniform W2A8 and DQ at 2 bits per weight, A8.
POINTS = [("uniform W2A8", "dq", (2, 2), 2.0), ("dq 2bpw A8", "dq", (2, 8), 2.0)]


def default_recipe() -> str | None:
    """The name of the recipe mpqc's defaults are (``TrainConfig``, ``QuantizerConfig``, ``loaders``), or None."""
    train, quantizers = mpqc.TrainConfig(), mpqc.QuantizerConfig()
    augment = inspect.signature(loaders).parameters["augment"].default
    defaults = Recipe(augment=bool(augment), nesterov=train.nesterov, weight_decay=train.weight_decay,
                      weight_init=quantizers.weight_init, activation_percentile=quantizers.activation_percentile)
    return next((name for name, recipe in RECIPES.items() if recipe == defaults), None)


def compile_point(model, data, recipe: Recipe, method: str, weight_bits: tuple[int, int], bits_per_weight: float,
                  steps: int, out: Path) -> dict:
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    phase = dict(epochs=1, max_steps_per_epoch=steps, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    config = mpqc.CompileConfig(
        quantizers=mpqc.QuantizerConfig(weight_bits=mpqc.BitRange(*weight_bits),
                                        activation_bits=mpqc.BitRange(8, 8), weight_init=recipe.weight_init,
                                        activation_percentile=recipe.activation_percentile),
        search=mpqc.TrainConfig(lr=0.002, distill=False, **phase),
        finetune=mpqc.TrainConfig(lr=0.001, distill=True, penalty_weight=0.0, **phase),
        progress=sys.stderr.isatty(),
    )
    started = time.perf_counter()
    example = next(iter(data[1]))[0][:2]
    result = mpqc.compile(model, example, budget=mpqc.WeightMemory(params * bits_per_weight / 8), data=data,
                          method=method, config=config, out=out, force=True)
    report = result.report
    return {"top1": report["accuracy"]["quantized"], "top1_integer": report["accuracy"]["integer_reference"],
            "average_weight_bits": report["totals"]["average_weight_bits"], "budget_met": report["budget"]["met"],
            "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="search steps, and again fine-tuning steps")
    parser.add_argument("--fp32-epochs", type=int, default=1)
    parser.add_argument("--subset", type=int, default=30000, help="training images")
    parser.add_argument("--val-subset", type=int, default=2000, help="test images")
    parser.add_argument("--recipes", default="old,new", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--points", default=",".join(point for point, *_ in POINTS),
                        help="comma-separated, of the default")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench" / "recipe")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recipe.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    results: dict[str, dict] = {}
    if args.out.is_file():  # run in parts: keep the recipes measured before
        results = json.loads(args.out.read_text()).get("recipes", {})
    for name in args.recipes.split(","):
        recipe = RECIPES[name]
        t0 = time.perf_counter()
        model = cached_fp32(resnet20, "fashion-mnist", epochs=args.fp32_epochs, subset=args.subset,
                            augment=recipe.augment, nesterov=recipe.nesterov, progress=False)
        fp32_wall = time.perf_counter() - t0
        data = loaders("fashion-mnist", batch_size=128, subset=args.subset, val_subset=args.val_subset,
                       augment=recipe.augment)
        earlier = results.get(name, {}).get("points", {})  # points of this recipe measured by an earlier command
        row = {"settings": recipe.__dict__, "command": "nice python " + " ".join(sys.argv),
               "fp32_top1": evaluate(model, data[1]), "fp32_wall_s": fp32_wall, "points": dict(earlier)}
        for point, method, weight_bits, bits in [p for p in POINTS if p[0] in args.points.split(",")]:
            row["points"][point] = compile_point(model, data, recipe, method, weight_bits, bits, args.steps,
                                                 args.runs / name / point.replace(" ", "-"))
            row["points"][point]["command"] = row["command"]
            print(f"{name} {point}: {row['points'][point]}", flush=True)
        results[name] = row
    flags = cpu_flags()
    payload = {
        "benchmark": "recipe (issue 18): old vs new training recipe at one point",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "nice python " + " ".join(sys.argv),
        "settings": {"steps": args.steps, "fp32_epochs": args.fp32_epochs, "subset": args.subset,
                     "val_subset": args.val_subset, "batch_size": 128, "search_lr": 0.002, "finetune_lr": 0.001,
                     "finetune_distill": True},
        "recipes": results,
        "mpqc_defaults": default_recipe(),
        "machine": {"cpu": cpu_model(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                    "avx512_vnni": "avx512_vnni" in flags, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "note": "2 cores shared with other jobs: wall times are indicative only"},
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload["recipes"], indent=1))


if __name__ == "__main__":
    main()
