"""Accuracy against modelled BitFusion cycles: a cycle budget, a weight-memory budget, uniform 4 and 8 bits.

    python bench/cost.py            # quick: small_cnn on the 8x8 digits, 3 seeds (~1-2 minutes on 2 cores)
    python bench/cost.py --full     # ResNet-20 on Fashion-MNIST (fp32 baseline cached under ~/.cache/mpqc/fp32)

Four compiles of the same fp32 model with DQ:

* ``bitfusion``     ``TargetCost("bitfusion", C4)``: C4 = the BitFusion cycles of the model at uniform 4/4 bits;
* ``weight-memory`` ``WeightMemory(P * 4 / 8)``: the weight bytes of uniform 4-bit weights (P weights);
* ``uniform-4``     every weight and activation fixed at 4 bits (``BitRange(4, 4)``), loose budget;
* ``uniform-8``     the same at 8 bits.

So (a) and (b) get the resources of uniform 4-bit, each counted its own way. For every run the table shows the
accuracies and the modelled BitFusion cycles of the frozen bits (``mpqc.targets.fpga``, default BitFusion:
16x32 fusion units at 500 MHz), their ratio to uniform 8/8, and the weight bytes. Writes
``bench/results/cost.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 shared cores: no OpenMP busy-waiting

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import mpqc  # noqa: E402
from mpqc.data import loaders  # noqa: E402
from mpqc.passes.analyze_layers import analyze_layers  # noqa: E402
from mpqc.passes.capture import capture  # noqa: E402
from mpqc.passes.fold_batchnorm import fold_batchnorm  # noqa: E402
from mpqc.pretrain import cached_fp32, train_fp32  # noqa: E402
from mpqc.quantizers import BitRange  # noqa: E402
from mpqc.report import _table, human_bytes, human_count  # noqa: E402
from mpqc.targets.fpga import COST_MODELS, cost_report  # noqa: E402
from models import resnet20, small_cnn  # noqa: E402

COST_MODEL = "bitfusion"


def _settings(full: bool) -> dict:
    if full:
        return {"data": "fashion-mnist", "model": "resnet20", "batch_size": 128, "fp32_epochs": 8,
                "search_epochs": 3, "finetune_epochs": 2, "steps_per_epoch": None, "quantizer_lr": 0.01,
                "seeds": [0]}
    return {"data": "digits", "model": "small_cnn", "batch_size": 64, "fp32_epochs": 20, "search_epochs": 6,
            "finetune_epochs": 3, "steps_per_epoch": None, "quantizer_lr": 0.05, "seeds": [0, 1, 2]}


def _fp32_model(settings: dict, seed: int) -> torch.nn.Module:
    if settings["model"] == "resnet20":
        return cached_fp32(resnet20, "fashion-mnist", epochs=settings["fp32_epochs"], seed=seed, progress=False)
    torch.manual_seed(seed)
    model = small_cnn(num_classes=10, in_channels=1)
    train_fp32(model, *loaders("digits", batch_size=settings["batch_size"], seed=seed),
               epochs=settings["fp32_epochs"], seed=seed, progress=False)
    return model.eval()


def _layers(model: torch.nn.Module, example: torch.Tensor):
    gm = fold_batchnorm(capture(copy.deepcopy(model).eval(), (example,)))
    return analyze_layers(gm, (example,))


def _runs(layers) -> dict[str, tuple[mpqc.Budget, mpqc.QuantizerConfig]]:
    uniform4 = COST_MODELS[COST_MODEL].uniform_cycles(layers, 4)
    params = sum(layer.params for layer in layers)
    loose = mpqc.AverageBits(32)
    fixed = lambda b: mpqc.QuantizerConfig(weight_bits=BitRange(b, b), activation_bits=BitRange(b, b),  # noqa: E731
                                           init_bits=b)
    return {
        "bitfusion": (mpqc.TargetCost(COST_MODEL, cycles=uniform4), mpqc.QuantizerConfig()),
        "weight-memory": (mpqc.WeightMemory(params * 4 / 8), mpqc.QuantizerConfig()),
        "uniform-4": (loose, fixed(4)),
        "uniform-8": (loose, fixed(8)),
    }


def _compile(model, example, data, layers, budget, quantizers, settings, seed) -> dict:
    config = mpqc.CompileConfig(
        quantizers=quantizers,
        search=mpqc.TrainConfig(epochs=settings["search_epochs"], max_steps_per_epoch=settings["steps_per_epoch"],
                                quantizer_lr=settings["quantizer_lr"], checkpoint_every=10_000),
        finetune=mpqc.TrainConfig(epochs=settings["finetune_epochs"], max_steps_per_epoch=settings["steps_per_epoch"],
                                  lr=0.005, penalty_weight=0.0, checkpoint_every=10_000),
        seed=seed, progress=False,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mpqc-bench-cost-") as tmp:  # the run's checkpoints, then gone
        result = mpqc.compile(copy.deepcopy(model), example, budget=budget, data=data, method="dq", config=config,
                              out=Path(tmp) / "run")
    report = result.report
    layers_bits = {layer["name"]: (layer["weight_bits"], layer["activation_bits"]) for layer in report["layers"]}
    costs = {name: cost_report(layers, layers_bits, name) for name in COST_MODELS}
    return {
        "seed": seed,
        "budget": report["budget"]["text"],
        "budget_met": report["budget"]["met"],
        "accuracy": report["accuracy"],
        "bits": layers_bits,
        "weight_bytes": report["totals"]["weight_bytes"],
        "average_weight_bits": report["totals"]["average_weight_bits"],
        "average_activation_bits": report["totals"]["average_activation_bits"],
        "cycles": {name: cost["total_cycles"] for name, cost in costs.items()},
        "ratio_vs_8bit": {name: cost["ratio_vs_8bit"] for name, cost in costs.items()},
        "latency_s": {name: cost["latency_s"] for name, cost in costs.items()},
        "wall_s": time.perf_counter() - started,
    }


def _summary(rows: list[dict]) -> dict:
    def stats(values):
        values = [v for v in values if v is not None]
        return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}

    return {
        "quantized_accuracy": stats([r["accuracy"]["quantized"] for r in rows]),
        "integer_accuracy": stats([r["accuracy"]["integer_reference"] for r in rows]),
        "fp32_accuracy": stats([r["accuracy"]["fp32"] for r in rows]),
        "bitfusion_cycles": stats([r["cycles"]["bitfusion"] for r in rows]),
        "bitfusion_ratio_vs_8bit": stats([r["ratio_vs_8bit"]["bitfusion"] for r in rows]),
        "bitserial_cycles": stats([r["cycles"]["bitserial"] for r in rows]),
        "weight_bytes": stats([r["weight_bytes"] for r in rows]),
        "budget_met": all(r["budget_met"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ResNet-20 on Fashion-MNIST instead of the quick run")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2 quick, 0 full)")
    parser.add_argument("--steps-per-epoch", type=int, help="cut every search/fine-tune epoch to N batches (smoke)")
    parser.add_argument("--val-subset", type=int, help="validate on N examples (smoke)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cost.json")
    args = parser.parse_args()
    settings = _settings(args.full)
    if args.seeds:
        settings["seeds"] = args.seeds
    settings["steps_per_epoch"] = args.steps_per_epoch or settings["steps_per_epoch"]
    settings["val_subset"] = args.val_subset
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()

    data = loaders(settings["data"], batch_size=settings["batch_size"], val_subset=settings["val_subset"], seed=0)
    example = next(iter(data[1]))[0][:2]
    results: dict[str, list[dict]] = {}
    budgets: dict[str, str] = {}
    layers = None
    for seed in settings["seeds"]:
        model = _fp32_model(settings, seed)
        layers = layers or _layers(model, example)  # the same graph for every seed
        for name, (budget, quantizers) in _runs(layers).items():
            row = _compile(model, example, data, layers, budget, quantizers, settings, seed)
            results.setdefault(name, []).append(row)
            budgets[name] = row["budget"]
            print(f"seed {seed} {name:<14} {row['budget']:<28} quantized {row['accuracy']['quantized']:6.2f}%  "
                  f"{COST_MODEL} {human_count(row['cycles'][COST_MODEL])} cycles  {row['wall_s']:.1f} s", flush=True)

    summary = {name: _summary(rows) for name, rows in results.items()}
    headers = ["run", "budget", "fp32 %", "quantized %", "integer %", "BitFusion cycles", "vs 8/8",
               "bit-serial cycles", "weights", "met"]
    table = [[name, budgets[name], f"{s['fp32_accuracy']['mean']:.2f}",
              f"{s['quantized_accuracy']['mean']:.2f} ± {s['quantized_accuracy']['std']:.2f}",
              f"{s['integer_accuracy']['mean']:.2f}",
              human_count(s["bitfusion_cycles"]["mean"]), f"{s['bitfusion_ratio_vs_8bit']['mean']:.3f}x",
              human_count(s["bitserial_cycles"]["mean"]), human_bytes(s["weight_bytes"]["mean"]),
              "yes" if s["budget_met"] else "NO"]
             for name, s in summary.items()]
    print()
    print(f"{settings['model']} on {settings['data']}, DQ, seeds {settings['seeds']}; cycles per sample "
          f"({COST_MODELS[COST_MODEL].describe()})")
    print("\n".join(_table(headers, table, left={0, 1, 9})))

    payload = {
        "benchmark": "cost",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        "cost_models": {name: model.describe() for name, model in COST_MODELS.items()},
        "layers": [layer.to_dict() for layer in layers],
        "uniform8_cycles": {name: model.uniform_cycles(layers, 8) for name, model in COST_MODELS.items()},
        "summary": summary,
        "runs": results,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
