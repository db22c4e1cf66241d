"""onnxruntime against the integer reference on several kinds of x86 CPU: the host and QEMU-emulated ones.

    python bench/onnx_cpus.py                       # host + emulated Haswell (AVX2) and Nehalem (SSE4.2), ~5 min
    python bench/onnx_cpus.py --cpus Haswell --seeds 1 2

For ResNet-20 (Fashion-MNIST size), torchvision ResNet-18 and MobileNetV2 (64x64) with random weights frozen at
random mixed 2-8 bits (several draws), the exported QDQ model (``targets/onnx.py``, default and
``compact_weights``) is run by onnxruntime's CPU provider with its default options, on this CPU and under
``qemu-x86_64 -cpu NAME`` (``targets/onnx_check.py``), and compared with the reference: per quantizer stepwise and
end to end, and at the output. Writes ``bench/results/onnx_cpus.json`` with the host's CPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mpqc.config import QuantizerConfig
from mpqc.cpu import describe_cpu
from mpqc.passes.analyze_layers import analyze_layers
from mpqc.passes.capture import capture
from mpqc.passes.fold_batchnorm import fold_batchnorm
from mpqc.passes.insert_quantizers import insert_quantizers
from mpqc.quantizers import get_method
from mpqc.reference import IntegerProgram
from mpqc.targets.onnx import export_onnx
from mpqc.targets.onnx_check import compare_with_reference, contract_violations

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _module("mpqc_bench_zoo", ROOT / "bench" / "zoo.py")
examples = _module("mpqc_example_models", ROOT / "examples" / "models.py")


def models() -> dict[str, tuple]:
    import torchvision

    return {"resnet20": (examples.resnet20, (8, 1, 28, 28)),
            "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
            "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64))}


def frozen_program(build, shape: tuple[int, ...], seed: int) -> IntegerProgram:
    torch.manual_seed(seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    gm = fold_batchnorm(capture(zoo.randomize_batchnorm(build(), seed), (x,)))
    analyze_layers(gm, (x,))
    gm = insert_quantizers(gm, get_method("dq"), QuantizerConfig(), (x,))
    gm, _ = zoo.freeze_at_random_bits(gm, seed=seed)
    return IntegerProgram.from_graph(gm.eval())


def summary(agreement: dict) -> dict:
    quantizers = agreement["quantizers"].values()
    outputs = [s for s in agreement["outputs"].values() if "within_1_lsb" in s]
    return {
        "codes_exact_stepwise": agreement["overall"]["exact"],
        "codes_within_1_lsb_end_to_end": agreement["overall"]["end_to_end_within_1_lsb"],
        "codes_exact_end_to_end": agreement["overall"]["end_to_end_exact"],
        "worst_quantizer_within_1_lsb_end_to_end": min(s["end_to_end_within_1_lsb"] for s in quantizers),
        "output_within_1_lsb_stepwise": min((s["within_1_lsb"] for s in outputs), default=None),
        "output_within_1_lsb_end_to_end": min((s["end_to_end_within_1_lsb"] for s in outputs), default=None),
        "output_max_lsb_end_to_end": max((s["end_to_end_max_lsb"] for s in outputs), default=None),
        "contract_violations": contract_violations(agreement),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", nargs="*", default=["Haswell", "Nehalem"], help="QEMU CPU models besides the host")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "onnx_cpus.json")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="mpqc-onnx-cpus-") as tmp:
        for name, (build, shape) in models().items():
            for seed in args.seeds:
                program = frozen_program(build, shape, seed)
                x = 1.5 * torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed))
                for compact in (False, True):
                    path = export_onnx(program, Path(tmp) / f"{name}-{seed}-{compact}.onnx",
                                       input_shapes=[shape], compact_weights=compact).path
                    for cpu in [None, *args.cpus]:
                        started = time.perf_counter()
                        agreement = compare_with_reference(program, path, x, cpu=cpu)
                        row = {"model": name, "seed": seed, "weights": "INT4 <= 4 bits" if compact else "UINT8",
                               "cpu": agreement["cpu"], **summary(agreement),
                               "seconds": round(time.perf_counter() - started, 1)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    result = {"host": {"cpu": describe_cpu(), "machine": platform.machine(), "python": sys.version.split()[0]},
              "onnxruntime": __import__("onnxruntime").__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
