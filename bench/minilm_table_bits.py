"""What per-row bit-widths in all-MiniLM-L6-v2's word table, allocated by token frequency, buy (issue 16).

Half of the encoder's 22.7 M weights are the word table (30,522 rows of 384), so at a 4.0-bit average the table
gets 3 bits and the linears 5 (``bench/minilm_rounding.py``), and the table is where most of the remaining loss
is. But a row costs only where its token occurs: in the fortunes training texts 15,291 of the 30,522 tokens occur
at all, and a handful of them make most of the text. The allocation of ``mpqc.quantizers.table_rows`` (what
``table_rows="frequency"`` compiles with) puts the table's bits where its tokens are read. This measures it against
the uniform one at the same average, the way ``bar_needs`` does: fp32 activations, every weight rounded to nearest with MSE-fitted per-row
ranges, no training; 500 held-out fortunes texts of 32 tokens (frequencies from training texts only), mean cosine
and top-10 neighbour agreement with the fp32 embeddings. The position and token-type tables stay fp32 and are
counted at 8 bits.

    python3 bench/minilm_table_bits.py    # ~4 min on 2 cores; results: bench/results/minilm.json, "table_bits"
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

from minilm import embed, fidelity, minilm_directory, minilm_encoder, record_result  # noqa: E402
from minilm_rounding import rounded_to_nearest  # noqa: E402
from mpqc.quantizers import BitRange  # noqa: E402
from mpqc.quantizers.table_rows import rows_by_frequency  # noqa: E402
from mpqc.text_data import fortunes, load_tokenizer  # noqa: E402

AVERAGE_BITS = 4.0
LINEAR_BITS = (5, 4)
FREQUENCY_TEXTS = (4000, None)  # the example's training sample; every training text
ROW_BITS = BitRange(2, 8)


def token_frequencies(dataset, vocab_size: int) -> torch.Tensor:
    """How often each token occurs in ``dataset``'s texts (padding left out)."""
    counts = torch.zeros(vocab_size)
    for index in range(len(dataset)):
        item = dataset[index]
        ids = item["input_ids"][item["attention_mask"].bool()]
        counts.index_add_(0, ids, torch.ones(len(ids)))
    return counts


def main() -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    tokenizer = load_tokenizer(minilm_directory())
    held_out = DataLoader(fortunes(tokenizer, train=False, labelled=False, max_length=32, subset=500), batch_size=16)
    reference = minilm_encoder().eval()
    with torch.no_grad():
        teacher = embed(reference, held_out)
    table = next(m.weight for name, m in reference.named_modules() if isinstance(m, torch.nn.Embedding)
                 and "word" in name)
    linears = sum(m.weight.numel() for m in reference.modules() if isinstance(m, torch.nn.Linear))
    other_tables = sum(m.weight.numel() for m in reference.modules() if isinstance(m, torch.nn.Embedding)) - table.numel()
    params = linears + other_tables + table.numel()

    def measure(linear_bits: int, row_bits: torch.Tensor) -> dict:
        model = rounded_to_nearest(minilm_encoder().eval(), linear_bits, row_bits)
        with torch.no_grad():
            found = fidelity(embed(model, held_out), teacher)
        average = (linear_bits * linears + 8 * other_tables + float(row_bits.sum()) * table.shape[1]) / params
        histogram = {int(b): int((row_bits == b).sum()) for b in row_bits.unique()}
        return {**{k: round(v, 4) for k, v in found.items()}, "avg_weight_bits": round(average, 3),
                "table_rows_at_bits": histogram}

    results: dict = {"what": "fp32 activations, weights rounded to nearest with MSE-fitted per-row ranges, no "
                             "training; the word table's rows at bits by token frequency (c + log2(f)/2, 2..8) or "
                             "uniform, at the same average", "average_bits": AVERAGE_BITS}
    for linear_bits in LINEAR_BITS:
        # the table's whole bits within the average (as freezing gives it), uniform or per row at that mean
        table_bits = int((AVERAGE_BITS * params - linear_bits * linears - 8 * other_tables) / table.numel())
        uniform = torch.full((table.shape[0],), float(table_bits))
        results[f"linears {linear_bits}, table uniform {table_bits}"] = measure(linear_bits, uniform)
        for texts in FREQUENCY_TEXTS:
            train = fortunes(tokenizer, train=True, labelled=False, max_length=32, subset=texts)
            counts = token_frequencies(train, table.shape[0])
            key = f"linears {linear_bits}, table per row by frequency in {len(train)} training texts"
            results[key] = {**measure(linear_bits, rows_by_frequency(counts, table_bits, ROW_BITS)),
                            "tokens_seen": int((counts > 0).sum())}
        for key in [k for k in results if k.startswith(f"linears {linear_bits},")]:
            print(key, results[key], flush=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    record_result("table_bits", results)
    return results


if __name__ == "__main__":
    main()
