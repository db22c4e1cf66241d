"""Per-bit speed of the AVX2 kernels: one ResNet conv layer (56x56x64 -> 64, 3x3, 8-bit unsigned activations) at
8/7/4/2-bit weights, each on the micro-kernel ``targets/tvm/kernels/avx2.micro_kernel`` chooses for its bits (8x8: wide;
7-bit: narrow; 4- and 2-bit: 8 int16 steps), built for x86-64-v3 and timed interleaved (ABCD ABCD ...: a shared
machine's load falls on all of them alike), minimum over ``--repeat`` rounds.

    PYTHONPATH=. TVM_NUM_THREADS=1 python3 bench/perbit.py --json bench/results/perbit_avx2.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import s_tir, te  # noqa: E402

from mpqc.targets.tvm.kernels import avx2 as tvm_avx2  # noqa: E402
from mpqc.targets.tvm.kernels import implicit_gemm as tvm_vnni  # noqa: E402

C, CO, H = 64, 64, 56


def build(micro, target):
    x = te.placeholder((1, H, H, C), "uint8", name="x")
    w = te.placeholder((CO // 16, 9 * C // 4, 16, 4), "int8", name="w")
    geometry = tvm_vnni.ConvGeometry("NHWC", False, C, (3, 3), (1, 1), (1, 1))
    out = tvm_vnni.conv2d_te(x, w, geometry, name=micro.block)
    sch = s_tir.Schedule(te.create_prim_func([x, w, out]).with_attr("global_symbol", "main"))
    assert tvm_vnni.schedule_conv(sch, None, micro)
    return tvm.compile(sch.mod, target=target)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})
    cases = {f"w{bits}a8": tvm_avx2.micro_kernel(bits, 8, C) for bits in (8, 7, 4, 2)}
    kernels = {name: build(micro, target) for name, micro in cases.items()}
    rng = np.random.default_rng(0)
    x = tvm.runtime.tensor(rng.integers(0, 256, (1, H, H, C)).astype(np.uint8))
    w = tvm.runtime.tensor(rng.integers(-7, 8, (CO // 16, 9 * C // 4, 16, 4)).astype(np.int8))
    out = tvm.runtime.tensor(np.zeros((1, H, H, CO), np.int32))
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(args.repeat):
        for name, kernel in kernels.items():
            start = time.perf_counter()
            kernel(x, w, out)
            best[name] = min(best[name], time.perf_counter() - start)
    macs = H * H * CO * C * 9
    result = {"layer": f"{H}x{H}x{C} -> {CO}, 3x3, batch 1", "threads": os.environ["TVM_NUM_THREADS"],
              "load_average": list(os.getloadavg()),
              "cases": {name: {"micro_kernel": cases[name].block, "ms": best[name] * 1e3,
                               "gops": 2 * macs / best[name] / 1e9} for name in kernels},
              "w4_speedup_over_w8": best["w8a8"] / best["w4a8"],
              "w4_speedup_over_w7": best["w7a8"] / best["w4a8"]}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
