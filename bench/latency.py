"""Latency of the TVM target against PyTorch, on models frozen at random mixed 2-8 bits (random weights).

    OMP_WAIT_POLICY=PASSIVE TVM_NUM_THREADS=2 python bench/latency.py --models resnet20 resnet18 mobilenet_v2
    python bench/latency.py --models resnet18 --trials 256 --tuning-db runs/tune-r18   # MetaSchedule first

For each model it prints, in milliseconds (median of ``--repeat`` runs after a warm-up): the TVM module
(default schedules, or the tuning database), the mpqc integer reference (``IntegerProgram.run``, float64 convs)
and PyTorch fp32 eager on the original model, and checks the TVM outputs equal the reference bit for bit.
``--json FILE`` also writes the numbers. Set ``TVM_NUM_THREADS`` (TVM's pool otherwise starts one thread here) and
``OMP_WAIT_POLICY=PASSIVE`` on shared machines; torch uses ``torch.get_num_threads()`` threads.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torchvision  # noqa: E402

from mpqc.budgets import WeightMemory  # noqa: E402
from mpqc.config import QuantizerConfig  # noqa: E402
from mpqc.passes.analyze_layers import analyze_layers  # noqa: E402
from mpqc.passes.capture import capture  # noqa: E402
from mpqc.passes.fold_batchnorm import fold_batchnorm  # noqa: E402
from mpqc.passes.freeze import freeze  # noqa: E402
from mpqc.passes.insert_quantizers import insert_quantizers, quantized_layers  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402
from mpqc.quantizers.base import positive_levels  # noqa: E402
from mpqc.reference import IntegerProgram  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _examples():
    spec = importlib.util.spec_from_file_location("mpqc_bench_models", ROOT / "examples" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODELS = {
    "resnet20": (lambda: _examples().resnet20(), (1, 1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 224, 224)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (1, 3, 224, 224)),
}


def frozen_program(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> IntegerProgram:
    """capture -> fold BN -> quantizers (calibrated on x) -> random integer bits in [2, 8] -> freeze."""
    gm = fold_batchnorm(capture(model.eval(), (x,)))
    analyze_layers(gm, (x,))
    gm = insert_quantizers(gm, get_method("dq"), QuantizerConfig(), (x,))
    rng = random.Random(seed)
    for layer in quantized_layers(gm):
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if q.learnable_bits:
                with torch.no_grad():
                    q.log_step.copy_(torch.log(q.log_range.exp() / positive_levels(rng.randint(2, 8), q.signed)))
    return IntegerProgram.from_graph(freeze(gm, WeightMemory(1e12)))


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"], choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, help="input height and width (default: the model's)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--trials", type=int, default=0, help="MetaSchedule trials (needs --tuning-db)")
    parser.add_argument("--tuning-db", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from mpqc.targets.tvm import lower

    rows = {}
    print(f"{'model':14s} {'input':>16s} {'build s':>8s} {'tvm ms':>8s} {'ref ms':>8s} {'fp32 ms':>8s}  exact")
    for name in args.models:
        build, shape = MODELS[name]
        shape = (args.batch, shape[1], *(2 * [args.resolution] if args.resolution else shape[2:]))
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(shape)
        program = frozen_program(model, x)
        db = args.tuning_db / name if args.tuning_db else None
        lowered = lower(program, input_shape=shape, trials=args.trials, tuning_db=db)
        exact = torch.equal(lowered(x), program.run(x))
        with torch.no_grad():
            row = {
                "input": list(shape),
                "build_s": lowered.build_seconds,
                "tvm_ms": median_ms(lambda: lowered(x), args.repeat),
                "reference_ms": median_ms(lambda: program.run(x), max(3, args.repeat // 4)),
                "fp32_eager_ms": median_ms(lambda: model(x), args.repeat),
                "bit_exact": exact,
                "schedules": lowered.schedules,
                "tvm_threads": os.environ.get("TVM_NUM_THREADS", "(unset: 1 here)"),
                "torch_threads": torch.get_num_threads(),
            }
        rows[name] = row
        print(f"{name:14s} {'x'.join(map(str, shape)):>16s} {row['build_s']:8.1f} {row['tvm_ms']:8.2f} "
              f"{row['reference_ms']:8.2f} {row['fp32_eager_ms']:8.2f}  {exact}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
