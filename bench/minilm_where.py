"""Where all-MiniLM-L6-v2 loses fidelity to quantization, before any training.

The encoder with quantizers inserted (DQ, every quantizer at its 8-bit start, activation ranges from the calibration
maximum, LayerNorm inputs at 16 bits, as ``examples/minilm.py`` compiles it), measured as the mean cosine of its
mean-pooled embeddings to the fp32 model's on held-out fortunes texts, with one group of quantizers changed at a time:

* each group of activation quantizers restored to fp32 (grouped by the tensor they quantize: FFN inputs, GELU
  outputs, attention operands, ...);
* the two FFN inputs (attention LayerNorm output into ``intermediate.dense``, GELU output into ``output.dense``) at 8
  bits with one scale per channel (an upper bound: scales from the measured batch), or asymmetric per tensor;
* activations in fp32 and the weights at fewer bits: the word-embedding table alone, the linears alone, and the two
  allocations a 4-bit average allows.

All of these on the graph without ``passes/shift_activations.py`` (GELU outputs signed, as measured first);
``w8a8_gelu_shift`` is the W8A8 cosine with it (GELU + 0.17, unsigned codes, the shift in ``output.dense``'s bias:
what ``mpqc.compile`` does by default).

    python3 bench/minilm_where.py          # ~2 min on 2 cores; results: bench/results/minilm.json, "where_ptq"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from minilm import mean_pool, minilm_directory, minilm_encoder, record_result  # noqa: E402
from mpqc import pipeline  # noqa: E402
from mpqc.config import QuantizerConfig  # noqa: E402
from mpqc.passes.insert_quantizers import quantized_layers  # noqa: E402
from mpqc.quantizers import get_method  # noqa: E402
from mpqc.text_data import fortunes, load_tokenizer  # noqa: E402

#: Activation quantizer groups, by the first of these found in the quantizer's name (order matters).
GROUPS = ("layer_norm", "softmax", "intermediate_dense_out", "attention_output_dense", "intermediate_dense",
          "output_dense", "query", "transpose", "mul", "add", "embedding")
FFN_INPUTS = {"intermediate_dense": "FFN input (attention LayerNorm output)", "output_dense": "GELU output"}


class PerChannel8(nn.Module):
    """8-bit fake quantization with one asymmetric range per channel (last dimension), from this tensor."""

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().flatten(0, -2)
        low = flat.amin(0)
        step = (flat.amax(0) - low).clamp_min(1e-8) / 255
        return ((x - low) / step).round().clamp(0, 255) * step + low


class Asymmetric8(nn.Module):
    """8-bit fake quantization with one asymmetric range per tensor (a zero point), from this tensor."""

    def forward(self, x: Tensor) -> Tensor:
        low, high = x.detach().min(), x.detach().max()
        step = (high - low).clamp_min(1e-8) / 255
        return ((x - low) / step).round().clamp(0, 255) * step + low


def _group(name: str) -> str:
    plain = re.sub(r"_\d+", "", name)
    return next((key for key in GROUPS if key in plain), plain)


def _is_ffn_input(name: str, kind: str) -> bool:
    return name.endswith(kind) and "attention" not in name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=64, help="held-out texts measured")
    parser.add_argument("--max-length", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    tokenizer = load_tokenizer(minilm_directory())
    texts = fortunes(tokenizer, train=False, labelled=False, max_length=args.max_length, subset=args.texts)
    batch = next(iter(DataLoader(texts, batch_size=args.texts)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = minilm_encoder()
    with torch.no_grad():
        fp32 = mean_pool(model(**inputs), batch["attention_mask"])
    example = {name: value[:16] for name, value in inputs.items()}

    def quantized(shift: bool):
        traced, _ = pipeline.trace(model, example)
        config = QuantizerConfig(init_bits=8, activation_percentile=100.0, shift_activations=shift)
        return pipeline.quantize(traced, get_method("dq"), config, pipeline.positional_inputs(traced, example))

    gm = quantized(shift=True)
    positional = pipeline.positional_inputs(gm, inputs)

    def cosine() -> float:
        with torch.no_grad():
            pooled = mean_pool(gm(*positional), batch["attention_mask"])
        return round(float(F.cosine_similarity(pooled, fp32).mean()), 4)

    shifted = cosine()
    gm = quantized(shift=False)
    quantizers = gm.get_submodule("act_quantizers")
    saved = dict(quantizers.items())

    def swap(names, make) -> None:
        for name in names:
            quantizers[name] = make() if make is not None else saved[name]

    found: dict = {"texts": args.texts, "w8a8": cosine(), "w8a8_gelu_shift": shifted,
                   "activation_group_in_fp32": {}, "ffn_inputs": {},
                   "activations_fp32_weights": {}}
    groups: dict[str, list[str]] = {}
    for name in saved:
        groups.setdefault(_group(name), []).append(name)
    for group, names in groups.items():
        swap(names, nn.Identity)
        found["activation_group_in_fp32"][f"{group} ({len(names)})"] = cosine()
        swap(names, None)
    swap(saved, nn.Identity)
    found["activation_group_in_fp32"]["all"] = cosine()
    swap(saved, None)
    both = [name for name in saved if any(_is_ffn_input(name, kind) for kind in FFN_INPUTS)]
    for kind, what in FFN_INPUTS.items():
        names = [name for name in saved if _is_ffn_input(name, kind)]
        for label, make in (("per-channel 8-bit", PerChannel8), ("asymmetric per-tensor 8-bit", Asymmetric8)):
            swap(names, make)
            found["ffn_inputs"][f"{what}: {label}"] = cosine()
            swap(names, None)
    swap(both, PerChannel8)
    found["ffn_inputs"]["both per-channel 8-bit"] = cosine()
    swap(both, None)

    swap(saved, nn.Identity)
    weights = found["activations_fp32_weights"]
    weights["all 8 bits"] = cosine()
    layers = quantized_layers(gm)
    table = next(layer for layer in layers if "word_embeddings" in layer.name).weight_quantizer
    linears = [layer.weight_quantizer for layer in layers if "embeddings" not in layer.name]
    for bits in (5, 4, 3, 2):
        table.set_bits(bits)
        weights[f"word table {bits} bits"] = cosine()
    table.set_bits(8)
    for bits in (6, 5, 4, 3):
        for quantizer in linears:
            quantizer.set_bits(bits)
        weights[f"linears {bits} bits"] = cosine()
    for table_bits, linear_bits in ((4, 4), (3, 5)):
        table.set_bits(table_bits)
        for quantizer in linears:
            quantizer.set_bits(linear_bits)
        weights[f"word table {table_bits} + linears {linear_bits} bits"] = cosine()
    swap(saved, None)
    found["allocation_3_5_with_a8"] = cosine()

    print(json.dumps(found, indent=1))
    record_result("where_ptq", found)
    return found


if __name__ == "__main__":
    main()
