"""Compile the Fashion-MNIST ResNet-20 to mixed precision under a ~2-bit (2.25) average weight budget.

    python examples/fashion_mnist.py --out runs/fmnist            # full run (see --help for the epochs)
    python examples/fashion_mnist.py --out runs/smoke --quick     # a few minutes, small subset

Trains the fp32 baseline once (cached under ~/.cache/mpqc/fp32), then runs mpqc.compile with DQ under
WeightMemory(params * avg_bits / 8), saves the run (report.json, bits.png, program.json/.pt, checkpoints) and
prints fp32 vs quantized accuracy. Re-running with --resume continues an interrupted compile.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mpqc
from mpqc.data import loaders
from mpqc.pretrain import cached_fp32
from mpqc.report import format_report, human_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import resnet20  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/fmnist"))
    parser.add_argument("--avg-bits", type=float, default=2.25,
                        help="weight budget as average bits per weight (2.0 would force every layer to 2 bits)")
    parser.add_argument("--method", default="dq", choices=sorted(mpqc.METHODS))
    parser.add_argument("--fp32-epochs", type=int, default=8)
    parser.add_argument("--search-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 fp32 epochs, 60 steps per phase, subset")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    subset, steps, fp32_epochs = (None, None, args.fp32_epochs) if not args.quick else (6000, 60, 2)
    model = cached_fp32(resnet20, "fashion-mnist", epochs=fp32_epochs, subset=subset)
    train_loader, val_loader = loaders("fashion-mnist", batch_size=128, subset=subset,
                                       val_subset=2000 if args.quick else None)
    params = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight") and m.weight is not None
                 and m.weight.dim() > 1)
    budget = mpqc.WeightMemory(params * args.avg_bits / 8)
    print(f"ResNet-20: {params:,} weights; budget {human_bytes(budget.limit)} = {args.avg_bits} bits/weight")

    config = mpqc.CompileConfig(
        search=mpqc.TrainConfig(epochs=args.search_epochs if not args.quick else 1, max_steps_per_epoch=steps),
        finetune=mpqc.TrainConfig(epochs=args.finetune_epochs if not args.quick else 1, max_steps_per_epoch=steps,
                                  lr=0.005, penalty_weight=0.0, distill=True),
    )
    example = next(iter(val_loader))[0][:2]
    result = mpqc.compile(model, example, budget=budget, data=(train_loader, val_loader), method=args.method,
                          config=config, out=args.out, resume=args.resume, force=args.force)
    print(format_report(result.report))
    accuracy = result.report["accuracy"]
    print(f"\nfp32 {accuracy['fp32']:.2f}%  ->  quantized {accuracy['quantized']:.2f}% "
          f"(integer reference {accuracy['integer_reference']:.2f}%), "
          f"weights {human_bytes(result.report['budget']['achieved'])} of {human_bytes(budget.limit)}, "
          f"{time.perf_counter() - started:.0f} s in all; saved to {args.out}")


if __name__ == "__main__":
    main()
