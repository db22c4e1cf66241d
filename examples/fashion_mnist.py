"""Compile a Fashion-MNIST model to mixed precision under an average weight-bits budget.

    python examples/fashion_mnist.py --out runs/fmnist                 # quick start: under 10 minutes on 2 cores
    python examples/fashion_mnist.py --out runs/fmnist-full --full     # the full recipe (~30-60 minutes)
    python examples/fashion_mnist.py --out runs/smoke --smoke          # a few minutes, small subset
    python examples/fashion_mnist.py --model mobilenet-se --avg-bits 4 --act-bits 8 --full --out runs/mbse
    python examples/fashion_mnist.py --model vit --avg-bits 4 --act-bits 8 --fp32-epochs 5 --steps 250 --out runs/vit

The models (``MODELS``): ``resnet20`` (the default, at 2.25 bits per weight), ``mobilenet-se``, a
MobileNetV3-style net (hardswish as lookup tables, squeeze-excitation products, depthwise convs), and ``vit``, a
4-block vision transformer on 7x7 patches (integer LayerNorm and softmax, GELU as a lookup table, matmuls between
activations; see ``examples/models.py``). ``--act-bits 8`` fixes every activation at 8 bits (A8) instead of learning 2-8.

Trains the fp32 baseline once (cached under ~/.cache/mpqc/fp32), then runs mpqc.compile with DQ under
WeightMemory(params * avg_bits / 8), saves the run (report.json, bits.png, program.json/.pt, checkpoints) and
prints fp32 vs quantized accuracy. Re-running with --resume continues an interrupted compile.

The recipes (``RECIPES``): ``quick-start`` (the default) trains fp32 for one epoch over 30,000 of the training
images and gives the search and the fine-tuning 70 steps of 128 images each; ``full`` is 8 fp32 epochs, 3 search and
2 fine-tuning epochs over all 60,000 images. Both evaluate on the whole 10,000-image test set.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mpqc
from mpqc.config import WEIGHT_ROUNDINGS
from mpqc.cpu import describe_cpu
from mpqc.data import loaders
from mpqc.pretrain import cached_fp32
from mpqc.report import format_report, human_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import mobilenet_se, resnet20, vit  # noqa: E402

MODELS = {"resnet20": resnet20, "mobilenet-se": mobilenet_se, "vit": vit}
FP32_LR = {"vit": 0.05}  # SGD's learning rate for the fp32 baseline where 0.1 (the default) is too high


@dataclass(frozen=True)
class Recipe:
    """How much training each phase gets."""

    fp32_epochs: int
    search_epochs: int
    finetune_epochs: int
    steps_per_epoch: int | None = None  # None: every batch of the training set
    subset: int | None = None  # training images (None: all 60,000)
    val_subset: int | None = None  # test images (None: all 10,000)


RECIPES = {
    "quick-start": Recipe(fp32_epochs=1, search_epochs=1, finetune_epochs=1, steps_per_epoch=70, subset=30000),
    "full": Recipe(fp32_epochs=8, search_epochs=3, finetune_epochs=2),
    "smoke": Recipe(fp32_epochs=2, search_epochs=1, finetune_epochs=1, steps_per_epoch=60, subset=6000,
                    val_subset=2000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/fmnist"))
    parser.add_argument("--avg-bits", type=float, default=2.25,
                        help="weight budget as average bits per weight (2.0 would force every layer to 2 bits)")
    parser.add_argument("--method", default="dq", choices=sorted(mpqc.METHODS))
    parser.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    parser.add_argument("--act-bits", type=int, default=None,
                        help="fix every activation quantizer at this many bits (default: learn 2-8)")
    recipe = parser.add_mutually_exclusive_group()
    recipe.add_argument("--full", dest="recipe", action="store_const", const="full",
                        help="the full recipe: 8 fp32, 3 search and 2 fine-tuning epochs over all the data")
    recipe.add_argument("--smoke", "--quick", dest="recipe", action="store_const", const="smoke",
                        help="smoke run: 2 fp32 epochs, 60 steps per phase, subset")
    parser.add_argument("--fp32-epochs", type=int, default=None, help="override the recipe's fp32 epochs")
    parser.add_argument("--steps", type=int, default=None,
                        help="override the recipe's steps per search / fine-tuning epoch")
    parser.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default="mse",
                        help="how the frozen weights meet their grids before fine-tuning (mpqc.RoundingConfig)")
    parser.add_argument("--penalty-ramp", type=float, default=0.0,
                        help="grow the budget penalty's weight to (1 + R) times its start over the search "
                             "(mpqc.TrainConfig.penalty_ramp)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    name = args.recipe or "quick-start"
    r = RECIPES[name]
    if args.fp32_epochs is not None or args.steps is not None:
        r = replace(r, fp32_epochs=args.fp32_epochs or r.fp32_epochs,
                    steps_per_epoch=args.steps if args.steps is not None else r.steps_per_epoch)

    started = time.perf_counter()
    print(f"recipe {name}: {r}\non {describe_cpu()}")
    model = cached_fp32(MODELS[args.model], "fashion-mnist", epochs=r.fp32_epochs, subset=r.subset,
                        lr=FP32_LR.get(args.model, 0.1))
    train_loader, val_loader = loaders("fashion-mnist", batch_size=128, subset=r.subset, val_subset=r.val_subset)
    params = sum(p.numel() for n, p in model.named_parameters()  # conv/linear weights (MHA's in_proj_weight too)
                 if n.endswith("weight") and p.dim() > 1)
    budget = mpqc.WeightMemory(params * args.avg_bits / 8)
    print(f"{args.model}: {params:,} weights; budget {human_bytes(budget.limit)} = {args.avg_bits} bits/weight")
    quantizers = mpqc.QuantizerConfig() if args.act_bits is None else mpqc.QuantizerConfig(
        activation_bits=mpqc.BitRange(args.act_bits, args.act_bits), residual_bits=args.act_bits)

    config = mpqc.CompileConfig(
        search=mpqc.TrainConfig(epochs=r.search_epochs, max_steps_per_epoch=r.steps_per_epoch,
                                penalty_ramp=args.penalty_ramp),
        finetune=mpqc.TrainConfig(epochs=r.finetune_epochs, max_steps_per_epoch=r.steps_per_epoch,
                                  lr=0.005, penalty_weight=0.0, distill=True),
        quantizers=quantizers,
        rounding=mpqc.RoundingConfig(how=args.weight_rounding),
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
