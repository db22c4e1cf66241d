"""The search's cost (issue 18): time per training step of each method's bit-width search against fixed-8-bit QAT of
the same model on the same batches.

    nice python bench/search_cost.py                  # ResNet-20, Fashion-MNIST batches of 128, 12 steps each
    nice python bench/search_cost.py --steps 30 --methods dq,csq

Per method: the ResNet-20 (random weights: the cost of a step does not depend on them) goes through the compiler's
stages up to the search (trace, fold BatchNorm, insert the method's quantizers at 8 bits, calibrate) and runs
``--steps`` search steps under a weight-memory budget of 2 bits per weight (budget penalty on, no KD); the
reference is the same graph frozen at 8 bits everywhere (``FixedQuantizer``s, what fine-tuning trains) trained for
the same steps on the same batches (no KD either). The first ``--warmup`` steps of each are not timed. An epoch is
the same number of steps for both, so the ratio of step times is the ratio of epoch times (the bar: <= 1.5).
Writes ``bench/results/search_cost.json`` with the machine and the command.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 shared cores: no OpenMP busy-waiting

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))  # this checkout's mpqc, not an installed one

import mpqc  # noqa: E402
from mpqc import pipeline  # noqa: E402
from mpqc.cpu import cpu_flags, cpu_model  # noqa: E402
from mpqc.data import loaders  # noqa: E402
from mpqc.passes.freeze import freeze  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402
from mpqc.search import search  # noqa: E402
from mpqc.train import finetune  # noqa: E402
from models import resnet20  # noqa: E402


class StepTimer:
    """Wall time of each training step, read from the progress callbacks the quantizers get (``set_progress`` is
    called once per step, before it)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def hook(self, gm: torch.nn.Module) -> None:
        quantizer = next(m for m in gm.modules() if isinstance(m, mpqc.quantizers.Quantizer))
        original = quantizer.set_progress

        def stamped(fraction: float) -> None:
            self.stamps.append(time.perf_counter())
            original(fraction)

        quantizer.set_progress = stamped

    def step_times(self, end: float, warmup: int) -> list[float]:
        stamps = self.stamps + [end]
        return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def timed(run, gm, warmup: int) -> list[float]:
    timer = StepTimer()
    timer.hook(gm)
    run()
    return timer.step_times(time.perf_counter(), warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="dq,fracbits,fracbits-kernel,sdq,csq")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search_cost.json")
    parser.add_argument("--note", default="", help="how the machine was shared while it ran, recorded with it")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, _ = loaders("fashion-mnist", batch_size=128, subset=128 * (args.steps + 1))
    torch.manual_seed(0)
    model = resnet20().eval()
    example = next(iter(train))[0]
    config = mpqc.TrainConfig(epochs=1, max_steps_per_epoch=args.steps, distill=False, checkpoint_every=10**6)
    rows = {}
    for method in args.methods.split(","):
        gm, layers = pipeline.trace(copy.deepcopy(model), (example[:2],))
        gm = pipeline.quantize(gm, get_method(method), mpqc.QuantizerConfig(), (example,))
        fixed = freeze(copy.deepcopy(gm), mpqc.WeightMemory(1e12))  # every quantizer at its 8 starting bits
        budget = mpqc.WeightMemory(sum(layer.params for layer in layers) * 2 / 8)
        searched = timed(lambda: search(gm, budget, layers, train, config, progress=False), gm, args.warmup)
        qat = timed(lambda: finetune(fixed, train, config, progress=False), fixed, args.warmup)
        rows[method] = {"search_step_s": statistics.median(searched), "fixed8_qat_step_s": statistics.median(qat),
                        "ratio": statistics.median(searched) / statistics.median(qat),
                        "search_steps_s": searched, "fixed8_steps_s": qat}
        print(f"{method}: search {rows[method]['search_step_s']:.3f} s/step, fixed 8-bit QAT "
              f"{rows[method]['fixed8_qat_step_s']:.3f} s/step, ratio {rows[method]['ratio']:.2f}", flush=True)
    flags = cpu_flags()
    payload = {
        "benchmark": "search cost (issue 18): search step vs fixed-8-bit QAT step, ResNet-20, batch 128",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "bar": "search epoch <= 1.5x fixed-8-bit QAT epoch (median step times; the same steps per epoch)",
        "methods": rows,
        "machine": {"cpu": cpu_model(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                    "avx512_vnni": "avx512_vnni" in flags, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "note": args.note},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
