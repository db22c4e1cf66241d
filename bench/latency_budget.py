"""The latency budget's prediction against the lowered module's measured latency (issue 17: within 10%).

    OMP_WAIT_POLICY=PASSIVE TVM_NUM_THREADS=2 python3 bench/latency_budget.py --model resnet20 --json out.json
    ... bench/latency_budget.py --model resnet18 --search-ms 60     # searched under the budget, then measured

For a model frozen at random mixed 2-8 bits (seeded; ``bench/latency.py``'s ``frozen_program``) or, with
``--search-ms``, compiled by ``mpqc.compile`` under ``mpqc.Latency(MS)`` (random images, label-free distillation
from the fp32 model, ``--search-steps`` DQ steps, no fine-tuning: the bits are what this measures), batch 1:

* ``predicted_ms``: the budget's cost, ``mpqc.Latency(...).cost`` at the frozen bits, and per layer (the table of
  ``mpqc/targets/tvm/latency.py``: each layer's kernel measured alone, kept in ``--tuning-db``) plus
  ``between_layers_ms``, the work between the layers measured once on the model (``Latency.measured_on``, as
  ``mpqc.compile`` does; ``mpqc/targets/tvm/between_layers.py``);
* ``measured_ms``: ``mpqc.targets.tvm.lower`` of the same program (same ISA, same ``--tuning-db``: the tiles the
  table was measured at), the whole ``main`` timed with the
  VM's ``time_evaluator`` (fastest of ``--repeat``, as the table), and its functions one by one with the VM's
  instrument hook (``bench/latency.py``'s ``function_times``): the layers' kernel functions and the rest;
* the ratios measured / predicted, for the whole module and for the layers' kernels alone; with ``--search-ms``
  also measured / budget (the issue's bar: a model searched under a latency budget meets it within 10% measured);
* ``--rounds N``: the layers' entries and the module measured again, side by side, N - 1 more times, and the median
  ratio over all rounds (on a VM whose speed moves between minutes, one ratio of a table measured earlier and a
  module measured now is one draw); and the module's fastest over the rounds against the budget's prediction (the
  steady speed the VM returns to between its slow phases, against the table the compile measured).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import MODELS, frozen_program, function_times  # noqa: E402

import mpqc  # noqa: E402
from mpqc import pipeline  # noqa: E402
from mpqc.budgets import LayerBits  # noqa: E402
from mpqc.config import QuantizerConfig  # noqa: E402
from mpqc.cpu import ISA_CHOICES  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402


def searched_program(model: torch.nn.Module, x: torch.Tensor, budget: mpqc.Latency, steps: int, seed: int):
    """``mpqc.compile`` under ``budget`` on random images (label-free distillation), ``steps`` search steps at
    batch 4, no fine-tuning; the compiled program and its report's budget entry."""
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4 * steps, *x.shape[1:], generator=generator)
    loader = DataLoader(TensorDataset(images), batch_size=4)
    config = mpqc.CompileConfig(
        search=mpqc.TrainConfig(epochs=1, lr=1e-3, quantizer_lr=0.05, penalty_ramp=4.0),
        finetune=mpqc.TrainConfig(epochs=0), seed=seed, progress=False)
    compiled = mpqc.compile(model, (x,), budget=budget, data=(loader, None), config=config)
    return compiled.program, compiled.report["budget"]


def _remeasured(layers, kernels: list[str], isa: str, tuning_db, repeat: int) -> list[float]:
    """Each layer's table entry (its kernel at its bits) measured again now."""
    from mpqc.targets.tvm.latency import TABLE_PASSES, LayerGeometry, distinct, measure_blocks, measuring_target

    unique, position = distinct([(LayerGeometry.of(layer), kernel) for layer, kernel in zip(layers, kernels)])
    timings = measure_blocks(unique, measuring_target("llvm", isa)[0], repeat, TABLE_PASSES,
                             tuning_dir=Path(tuning_db))
    return [timings[i] for i in position]


def run(model_name: str = "resnet20", *, isa: str = "auto", seed: int = 0, repeat: int = 20,
        tuning_db: str | Path = "bench/tuning", search_ms: float | None = None, search_steps: int = 8,
        rounds: int = 1) -> dict:
    """Predicted vs measured ms of ``model_name`` (batch 1) at random mixed bits, or searched under
    ``search_ms``; ``rounds`` > 1: the layers' entries and the module measured again that many times more, one
    after the other, and the median ratio over all rounds."""
    from mpqc.targets.tvm import lower
    from mpqc.targets.tvm.kernels import is_kernel_block

    build, shape = MODELS[model_name]
    torch.manual_seed(seed)
    model = build().eval()
    x = torch.randn(1, *shape)
    budget = mpqc.Latency(search_ms or 1.0, isa=isa, tuning_db=str(tuning_db))
    searched = None
    if search_ms is None:
        program = frozen_program(model, x, seed)
    else:
        program, searched = searched_program(model, x, budget, search_steps, seed)
    graph, layers = pipeline.trace(model, (x,))
    # the work between the layers, measured once on this model (cached in the tuning db: a search above did it)
    budget = budget.measured_on(pipeline.quantize(graph, get_method("dq"), QuantizerConfig(), (x,)), (x,))
    bits = program.layer_bits()
    integer = {layer.name: LayerBits(torch.tensor(float(bits[layer.name][0])), torch.tensor(float(bits[layer.name][1])))
               for layer in layers}
    predicted = budget.per_layer(layers, integer).tolist()
    table = budget.table(layers)
    # the lowering runs the tiles the table was measured at: the same tuning database
    lowered = lower(program, input_shape=tuple(x.shape), isa=isa, tuning_db=tuning_db)
    assert torch.equal(lowered(x), program.run(x)), "the lowered module is not bit-exact"
    module = lowered.timer(x.numpy(), repeat=repeat, min_repeat_ms=5)
    whole = module()
    functions = function_times(lowered, x.numpy(), repeat)
    kernels = sum(ms for name, ms in functions.items() if is_kernel_block(name) or "conv" in name or "matmul" in name)
    total = sum(predicted) + budget.between_layers_ms
    kernel_of = [block for block, _ in table.at_each([bits[layer.name] for layer in layers])]
    later_rounds = []
    for _ in range(rounds - 1):  # the table's entries measured again beside the module: the same machine state
        again = sum(_remeasured(layers, kernel_of, isa, tuning_db, repeat)) + budget.between_layers_ms
        now = module()
        later_rounds.append({"predicted_ms": again, "measured_ms": now, "ratio": now / again})
    ratios = sorted([whole / total] + [r["ratio"] for r in later_rounds])
    fastest = min([whole] + [r["measured_ms"] for r in later_rounds])
    return {
        "model": model_name, "isa": lowered.meta["isa"], "threads": os.environ.get("TVM_NUM_THREADS"),
        "load_average": list(os.getloadavg()), "host": table.host,
        "predicted_ms": total, "between_layers_ms": budget.between_layers_ms, "measured_ms": whole,
        "ratio_measured_to_predicted": whole / total,
        **({} if not later_rounds else {"later_rounds": later_rounds,
                                        "median_ratio_over_rounds": ratios[(len(ratios) - 1) // 2],
                                        "fastest_measured_ms": fastest,
                                        "ratio_fastest_measured_to_predicted": fastest / total}),
        "measured_layer_functions_ms": kernels,
        "ratio_layer_functions_to_predicted_layers": kernels / (total - budget.between_layers_ms),
        **({} if searched is None else {
            "budget_ms": search_ms, "search_steps": search_steps, "budget_report": searched,
            "ratio_measured_to_budget": whole / search_ms, "met_within_10_percent": whole <= 1.1 * search_ms}),
        "layers": [{"name": layer.name, "bits": list(bits[layer.name]), "predicted_ms": ms, "kernel": kernel}
                   for layer, ms, kernel in zip(layers, predicted, kernel_of)],
        "functions_ms": functions,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    parser.add_argument("--isa", default="auto", choices=ISA_CHOICES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tuning-db", default="bench/tuning")
    parser.add_argument("--search-ms", type=float, help="compile under mpqc.Latency(MS) instead of random bits")
    parser.add_argument("--search-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the layers' entries and the module again, side by side, this many rounds in "
                             "all; the median ratio is reported")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run(args.model, isa=args.isa, seed=args.seed, repeat=args.repeat, tuning_db=args.tuning_db,
                 search_ms=args.search_ms, search_steps=args.search_steps, rounds=args.rounds)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("layers", "functions_ms")}, indent=1))
    return result


if __name__ == "__main__":
    main()
