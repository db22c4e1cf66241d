"""How all-MiniLM-L6-v2's frozen weights meet their grids, before any fine-tuning; and what issue 16's bar takes.

1. ``rounding_ptq``: the encoder as ``examples/minilm.py`` compiles it (DQ, A8 from the calibration maximum, GELU
   shifted), frozen at the allocation a 4.0-bit average buys (word table 3 bits, every linear and the other tables
   5: 3.96 bits per weight), then each ``passes/round_weights.py`` rounding: ``nearest`` (the starting 8-bit range
   kept, the step of the frozen bits), ``mse`` (each channel's range re-fitted to its bits), ``gptq`` (those ranges,
   then GPTQ on 8 training batches of 16 texts).
2. ``bar_needs``: fp32 activations, every weight rounded to nearest with MSE-fitted per-channel ranges at uniform
   bits: the mean cosine and top-10 neighbour agreement each precision gives, i.e. what the bar (cosine >= 0.98,
   top-10 >= 90%) asks of the weights.

Fidelity as ``examples/minilm.py`` measures it: 500 held-out fortunes texts of 32 tokens, mean-pooled embeddings
against fp32.

    python3 bench/minilm_rounding.py      # ~5 min on 2 cores; results: bench/results/minilm.json, "rounding_ptq"
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from minilm import embed, fidelity, minilm_directory, minilm_encoder  # noqa: E402
from mpqc import pipeline  # noqa: E402
from mpqc.budgets import WeightMemory  # noqa: E402
from mpqc.config import WEIGHT_ROUNDINGS, QuantizerConfig  # noqa: E402
from mpqc.passes.freeze import freeze  # noqa: E402
from mpqc.passes.insert_quantizers import quantized_layers  # noqa: E402
from mpqc.passes.round_weights import round_weights  # noqa: E402
from mpqc.quantizers import BitRange, get_method  # noqa: E402
from mpqc.quantizers.table_rows import RowBitsQuantizer, mse_row_clip  # noqa: E402
from mpqc.text_data import fortunes, load_tokenizer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "minilm.json"
TABLE_BITS, LAYER_BITS = 3, 5
BAR_NEEDS = ((8, 8), (6, 6), (6, 4), (5, 5), (5, 4), (5, 3), (4, 4), (4, 3))  # (linears, word table) bits


def rounded_to_nearest(model: torch.nn.Module, linear_bits: int, table_bits: int | torch.Tensor) -> torch.nn.Module:
    """``model`` with every linear's and the word table's weight rounded to nearest on the grid mpqc freezes to
    (symmetric, MSE-fitted range per output channel, as ``round_weights`` and ``allocate_table_rows`` fit them).
    ``table_bits``: one bit-width, or one per row."""
    with torch.no_grad():
        for name, module in model.named_modules():
            bits = (linear_bits if isinstance(module, torch.nn.Linear)
                    else table_bits if isinstance(module, torch.nn.Embedding) and "word" in name else None)
            if bits is None:
                continue
            per_row = torch.as_tensor(bits, dtype=torch.float32).expand(module.weight.shape[0])
            quantizer = RowBitsQuantizer(per_row, signed=True, scale=torch.ones(len(per_row)))
            quantizer.init_weight_clip_(module.weight, mse_row_clip(module.weight, per_row))
            module.weight.copy_(quantizer(module.weight))
    return model


def main() -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    started = time.perf_counter()
    tokenizer = load_tokenizer(minilm_directory())
    held_out = DataLoader(fortunes(tokenizer, train=False, labelled=False, max_length=32, subset=500), batch_size=16)
    train = DataLoader(fortunes(tokenizer, train=True, labelled=False, max_length=32, subset=128), batch_size=16)
    model = minilm_encoder().eval()
    with torch.no_grad():
        teacher = embed(model, held_out)
    calibration = [(batch["input_ids"], batch["attention_mask"]) for batch in train]

    input_ids, attention_mask = calibration[0]
    traced, _ = pipeline.trace(model, {"input_ids": input_ids[:2], "attention_mask": attention_mask[:2]})
    config = QuantizerConfig(activation_bits=BitRange(8, 8), activation_percentile=100.0)
    gm = pipeline.quantize(traced, get_method("dq"), config, calibration[0])
    for layer in quantized_layers(gm):
        if layer.weight_quantizer.learnable_bits:
            layer.weight_quantizer.set_bits(TABLE_BITS if "word_embeddings" in layer.name else LAYER_BITS)
    gm = freeze(gm, WeightMemory(1e12)).eval()
    layers = quantized_layers(gm)
    average = sum(layer.info.params * float(layer.weight_quantizer.bits()) for layer in layers) / sum(
        layer.info.params for layer in layers)
    found: dict = {"allocation": f"word table {TABLE_BITS} bits, the rest {LAYER_BITS}, A8",
                   "avg_weight_bits": round(average, 3), "held_out_texts": 500, "gptq_batches": len(calibration)}
    for how in WEIGHT_ROUNDINGS:
        began = time.perf_counter()
        rounded = round_weights(copy.deepcopy(gm), calibration, how)
        with torch.no_grad():
            student = embed(rounded, held_out)
        found[how] = {**fidelity(student, teacher),
                      "seconds": round(time.perf_counter() - began, 1)}
        print(how, found[how], flush=True)

    needs = {}
    for linear_bits, table_bits in BAR_NEEDS:
        rounded = rounded_to_nearest(minilm_encoder().eval(), linear_bits, table_bits)
        with torch.no_grad():
            needs[f"linears {linear_bits}, word table {table_bits}"] = fidelity(embed(rounded, held_out), teacher)
        print(linear_bits, table_bits, needs[f"linears {linear_bits}, word table {table_bits}"], flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["rounding_ptq"] = found
    results["bar_needs"] = {"what": "fp32 activations, weights rounded to nearest with MSE-fitted ranges, no training",
                            "fidelity": needs}
    results["rounding_ptq"]["wall_s"] = round(time.perf_counter() - started, 1)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return found


if __name__ == "__main__":
    main()
