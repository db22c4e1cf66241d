"""Training throughput of the bit-width search on 1 and on 2 processes (torchrun, DDP, gloo on loopback).

    python3 bench/scaling.py                        # ResNet-20, Fashion-MNIST, global batch 128, 20 timed steps
    python3 bench/scaling.py --processes 1 2 4 --steps 50 --method sdq

For each process count N it launches ``torchrun --standalone --nproc_per_node=N`` on this file; every process
builds the same ResNet-20 (seeded), inserts the method's quantizers (calibrated on the first global batch), runs
``--warmup`` search steps, then times ``--steps`` more (``mpqc.search``, so DDP, the sharded loader and the
all-reduced metrics are all in the measurement; rank 0 writes checkpoints as usual, every ``--checkpoint-every``
steps). The global batch is the same for every N, each process gets ``batch / N`` of it, and the machine's cores
are divided between the processes (``OMP_NUM_THREADS = cores // N``), so the comparison is the same hardware
used two ways. It prints samples per second for each N and the speed-up over one process, and writes
``bench/results/scaling.json`` (with the machine's load average before and after: the numbers mean little on a
machine busy with other work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scaling.json"


def _worker(args: argparse.Namespace) -> None:
    """One process of a torchrun launch: warm up, time ``args.steps`` search steps, rank 0 writes the numbers."""
    import importlib.util

    import torch

    from mpqc.budgets import parse_budget
    from mpqc.config import QuantizerConfig, TrainConfig
    from mpqc.data import loaders
    from mpqc.distributed import setup, teardown
    from mpqc.passes.analyze_layers import analyze_layers
    from mpqc.passes.capture import capture
    from mpqc.passes.fold_batchnorm import fold_batchnorm
    from mpqc.passes.insert_quantizers import insert_quantizers
    from mpqc.quantizers import get_method
    from mpqc.search import search
    from mpqc.train import epoch_batches

    world = setup()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = importlib.util.spec_from_file_location("mpqc_bench_models", ROOT / "examples" / "models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)

    steps = args.warmup + args.steps
    train, _ = loaders(args.data, batch_size=args.batch_size, subset=steps * args.batch_size, seed=0)
    torch.manual_seed(0)
    model = getattr(models, args.model)(num_classes=10, in_channels=1).eval()
    first_batch = next(epoch_batches(train, 0))[0]
    gm = fold_batchnorm(capture(model, (first_batch[:2],)))
    layers = analyze_layers(gm, (first_batch[:2],))
    gm = insert_quantizers(gm, get_method(args.method), QuantizerConfig(), (first_batch,))
    budget = parse_budget(args.budget)
    with tempfile.TemporaryDirectory(prefix="mpqc-scaling-") as scratch:
        def run(max_steps: int, name: str) -> float:
            config = TrainConfig(epochs=1, max_steps_per_epoch=max_steps, checkpoint_every=args.checkpoint_every)
            world.barrier()
            started = time.perf_counter()
            search(gm, budget, layers, train, config, checkpoint=Path(scratch) / f"{name}.pt", progress=False)
            world.barrier()
            return time.perf_counter() - started

        run(args.warmup, "warmup")
        seconds = run(args.steps, "timed")
    if world.is_main:
        Path(args.json).write_text(json.dumps({
            "processes": world.size, "threads_per_process": torch.get_num_threads(), "steps": args.steps,
            "seconds": seconds, "samples_per_second": args.steps * args.batch_size / seconds,
            "step_ms": 1e3 * seconds / args.steps,
        }))
    teardown()


def _launch(processes: int, args: argparse.Namespace, cores: int) -> dict:
    threads = max(1, cores // processes)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   __file__, "--worker", "--json", str(out), *_forwarded(args)]
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
                       "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
        done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"torchrun with {processes} processes failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def _forwarded(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--data", args.data, "--method", args.method, "--budget", args.budget,
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--checkpoint-every", str(args.checkpoint_every)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="resnet20", help="a builder in examples/models.py")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--method", default="dq")
    parser.add_argument("--budget", default="avg-bits=3")
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch (split between processes)")
    parser.add_argument("--steps", type=int, default=20, help="timed search steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores to divide between the processes")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}

    load_before = os.getloadavg()
    runs = [_launch(n, args, args.cores) for n in args.processes]
    baseline = next((run for run in runs if run["processes"] == 1), runs[0])
    for run in runs:
        run["speedup"] = run["samples_per_second"] / baseline["samples_per_second"]
        print(f"{run['processes']} process(es) x {run['threads_per_process']} thread(s): "
              f"{run['samples_per_second']:8.1f} samples/s ({run['step_ms']:.0f} ms per step), "
              f"speed-up {run['speedup']:.2f}")
    result = {
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "setup": {"model": args.model, "data": args.data, "method": args.method, "budget": args.budget,
                  "global_batch": args.batch_size, "timed_steps": args.steps, "warmup_steps": args.warmup,
                  "cores": args.cores, "backend": "gloo (loopback)"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
