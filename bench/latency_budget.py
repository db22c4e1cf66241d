"""The latency budget's prediction against the lowered module's measured latency (issue 17: within 10%).

    OMP_WAIT_POLICY=PASSIVE TVM_NUM_THREADS=2 python3 bench/latency_budget.py --model resnet20 --json out.json

For a model frozen at random mixed 2-8 bits (seeded; ``bench/latency.py``'s ``frozen_program``), batch 1:

* ``predicted_ms``: the budget's cost, ``mpqc.Latency(...).cost`` at the frozen bits, and per layer (the table of
  ``mpqc/targets/tvm/latency.py``: each layer's kernel measured alone, kept in ``--tuning-db``);
* ``measured_ms``: ``mpqc.targets.tvm.lower`` of the same program (same ISA), the whole ``main`` timed with the
  VM's ``time_evaluator`` (fastest of ``--repeat``, as the table), and its functions one by one with the VM's
  instrument hook (``bench/latency.py``'s ``function_times``): the layers' kernel functions and the rest;
* the ratios measured / predicted, for the whole module and for the layers' kernels alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import MODELS, frozen_program, function_times  # noqa: E402

import mpqc  # noqa: E402
from mpqc import pipeline  # noqa: E402
from mpqc.budgets import LayerBits  # noqa: E402
from mpqc.cpu import ISA_CHOICES  # noqa: E402


def run(model_name: str = "resnet20", *, isa: str = "auto", seed: int = 0, repeat: int = 20,
        tuning_db: str | Path = "bench/tuning") -> dict:
    """Predicted vs measured ms of ``model_name`` at random mixed bits (batch 1)."""
    import tvm
    from tvm import relax

    from mpqc.targets.tvm import lower
    from mpqc.targets.tvm.kernels import is_kernel_block

    build, shape = MODELS[model_name]
    torch.manual_seed(seed)
    model = build().eval()
    x = torch.randn(1, *shape)
    program = frozen_program(model, x, seed)
    _, layers = pipeline.trace(model, (x,))
    bits = program.layer_bits()
    budget = mpqc.Latency(1.0, isa=isa, tuning_db=str(tuning_db))
    integer = {layer.name: LayerBits(torch.tensor(float(bits[layer.name][0])), torch.tensor(float(bits[layer.name][1])))
               for layer in layers}
    predicted = budget.per_layer(layers, integer).tolist()
    lowered = lower(program, input_shape=tuple(x.shape), isa=isa)
    assert torch.equal(lowered(x), program.run(x)), "the lowered module is not bit-exact"
    lowered._machine()
    vm = relax.VirtualMachine(lowered.executable, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy())] + list(lowered._param_tensors)
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=5)
    timer(*args)
    whole = float(min(timer(*args).results)) * 1e3
    functions = function_times(lowered, x.numpy(), repeat)
    kernels = sum(ms for name, ms in functions.items() if is_kernel_block(name) or "conv" in name or "matmul" in name)
    total = sum(predicted)
    return {
        "model": model_name, "isa": lowered.meta["isa"], "threads": os.environ.get("TVM_NUM_THREADS"),
        "load_average": list(os.getloadavg()), "host": budget.table(layers).host,
        "predicted_ms": total, "measured_ms": whole, "ratio_measured_to_predicted": whole / total,
        "measured_layer_functions_ms": kernels, "ratio_layer_functions_to_predicted": kernels / total,
        "layers": [{"name": layer.name, "bits": list(bits[layer.name]), "predicted_ms": ms,
                    "kernel": budget.table(layers).blocks[i][tuple(min(max(b, 2), 8) for b in bits[layer.name])]}
                   for i, (layer, ms) in enumerate(zip(layers, predicted))],
        "functions_ms": functions,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    parser.add_argument("--isa", default="auto", choices=ISA_CHOICES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tuning-db", default="bench/tuning")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.model, isa=args.isa, seed=args.seed, repeat=args.repeat, tuning_db=args.tuning_db)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("layers", "functions_ms")}, indent=1))
    return result


if __name__ == "__main__":
    main()
