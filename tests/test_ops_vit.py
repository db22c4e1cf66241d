"""Vision transformers through every stage (issue 15): torchvision's ``VisionTransformer`` (``nn.MultiheadAttention``
with its packed projections, the class token, the position embedding, the class token picked from the output)."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from mpqc import pipeline
from test_ops_transformer import (_assert_onnxruntime_agrees, _assert_reference_matches_fake_quant,
                                  _assert_tvm_bit_exact, _program)


def tiny_vit(layers: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=28, patch_size=7, num_layers=layers, num_heads=2, hidden_dim=16,
                              mlp_dim=32, num_classes=10).eval()
    with torch.no_grad():  # torchvision zero-initialises these: random values exercise them
        model.class_token.normal_()
        model.heads.head.weight.normal_(0, 0.2)
    return model


def vit_input(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_multihead_attention_becomes_linears_around_a_softmax():
    model, x = tiny_vit(), vit_input()
    gm, layers = pipeline.trace(model, (x,))
    modules = [type(m) for m in gm.modules()]
    assert nn.MultiheadAttention not in modules
    attention = model.encoder.layers[0].self_attention
    projections = {name: gm.get_submodule(f"encoder_layers_encoder_layer_0_self_attention_mha.{name}")
                   for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):  # the packed in_proj, split in three
        assert torch.equal(projections[name].weight, attention.in_proj_weight[16 * i:16 * (i + 1)])
        assert torch.equal(projections[name].bias, attention.in_proj_bias[16 * i:16 * (i + 1)])
    assert {layer.name for layer in layers} >= {f"encoder_layers_encoder_layer_0_self_attention_mha.{n}"
                                                for n in projections}
    assert sum(n.target is torch.softmax for n in gm.graph.nodes) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gm(vit_input(1)[:1]), model(vit_input(1)[:1]), atol=1e-5, rtol=1e-5)


def test_tiny_vit_goes_through_every_stage(tmp_path):
    """A 1-block ViT frozen at random mixed 2-8 bits: the reference within 1 LSB of fake-quant stepwise, TVM
    bit-exact at every quantizer, onnxruntime within the contract."""
    gm, program, inputs, chosen = _program(tiny_vit(), (vit_input(),), seed=2)
    ops = {node.op for node in program.nodes}
    assert {"expand", "constant", "cat", "softmax", "matmul", "layer_norm"} <= ops, ops
    assert len(set(chosen.values())) > 2
    _assert_reference_matches_fake_quant(gm, program, inputs)
    _assert_tvm_bit_exact(program, inputs)
    _assert_onnxruntime_agrees(program, inputs, tmp_path)
