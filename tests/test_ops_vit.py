"""Vision transformers and ConvNeXt through every stage (issue 15), each a tiny 1-block config of the torchvision
family: ``VisionTransformer`` (``nn.MultiheadAttention`` with its packed projections, the class token, the position
embedding, the class token picked from the output), ``ConvNeXt`` (LayerNorm over channels between permutes, layer
scale, depthwise 7x7), ``SwinTransformer`` (captured through torch.export: roll, pad, window partitions, the relative
position bias gathered from its table folded into constants, the shifted-window mask made a keep mask), Swin V2
(cosine attention: ``F.normalize`` as the integer ``l2_normalize``, a clamped exponentiated logit scale and the
continuous position bias of a small MLP on constant coordinates, both folded into constants)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from mpqc import pipeline
from mpqc.config import QuantizerConfig
from mpqc.quantizers import get_method
from mpqc.reference import IntegerProgram
from test_ops_transformer import (_assert_onnxruntime_agrees, _assert_reference_matches_fake_quant,
                                  _assert_tvm_bit_exact, _freeze_at_random_bits, _program)


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


#: The program ops whose ONNX converters only this file's models cover (tests/test_onnx.py counts them): the tiny
#: ViT's class-token broadcast, the tiny Swin's window shift and Swin V2's L2-normalize, all checked against
#: onnxruntime below.
VIT_OPS = {"expand", "roll", "l2_normalize"}

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


def tiny_convnext() -> nn.Module:
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.1,
                    layer_scale=0.5, num_classes=10).eval()


def tiny_swin() -> nn.Module:
    """Two blocks (the second shifted, so the window mask and both rolls are there) and a patch merging; on 28x28
    images the 7x7 tokens are padded to the 4x4 windows and cropped back."""
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=[4, 4],
                           stochastic_depth_prob=0.1, num_classes=10).eval()


def tiny_swin_v2() -> nn.Module:
    """``tiny_swin`` with Swin V2's blocks (cosine attention, continuous position bias, post-norm) and patch
    merging."""
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=[4, 4],
                            stochastic_depth_prob=0.1, num_classes=10, block=SwinTransformerBlockV2,
                            downsample_layer=PatchMergingV2).eval()
    with torch.no_grad():  # every forward zeroes the key part of the qkv bias (in place, on a clone): give it values
        for module in model.modules():
            if hasattr(module, "logit_scale"):
                module.qkv.bias.normal_(0, 0.5)
    return model


def tiny_maxvit() -> nn.Module:
    """One MaxViT block (MBConv with squeeze-excitation, block and grid attention partitions written with
    ``swapaxes``, einsum attention, relative position bias gathered from its table) on 32x32 images."""
    torch.manual_seed(0)
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16], block_layers=[1],
                  head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()


#: family -> (model, input shape, program ops it must have, seed of its random bits). Swin V2 at seed 1: at seed 2
#: (a 2-bit qkv input) its legal 1-LSB flips (every step within contract) amplify through the cosine attention's
#: logit scale of 10 to 12% of the tiny random logits end to end, past the 5% the helper allows.
FAMILIES = {"convnext": (tiny_convnext, (2, 3, 28, 28), {"layer_norm", "permute", "mul", "constant", "lookup"}, 2),
            "swin": (tiny_swin, (2, 3, 28, 28), {"roll", "pad", "slice", "softmax", "constant", "matmul"}, 2),
            "swin_v2": (tiny_swin_v2, (2, 3, 28, 28), {"l2_normalize", "roll", "softmax", "constant", "matmul"}, 1),
            "maxvit": (tiny_maxvit, (2, 3, 32, 32), {"matmul", "softmax", "transpose", "lookup", "constant"}, 2)}
#: families with a fast test of their own (MaxViT: test_tiny_maxvit_einsum_attention_agrees_with_every_backend)
OWN_FAST_TEST = {"maxvit"}


def _every_stage(family: str, tmp_path, tvm: bool) -> None:
    """The family's tiny model: traced as the model computes (Swin's shifted-window mask, written in place, was
    once lost), then at random mixed 2-8 bits: reference vs fake-quant stepwise, onnxruntime within the contract,
    and (``tvm``) TVM bit-exact at every quantizer."""
    build, shape, expected_ops, seed = FAMILIES[family]
    model, x = build(), torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    gm, _ = pipeline.trace(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-5)
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), (x,))
    gm, chosen = _freeze_at_random_bits(gm, seed)
    program, inputs = IntegerProgram.from_graph(gm), (x,)
    assert expected_ops <= {node.op for node in program.nodes}
    assert len(set(chosen.values())) > 2
    softmaxes = [node for node in program.nodes if node.op == "softmax"]
    if family.startswith("swin"):  # the shifted-window mask is a keep mask (passes/constant_masks.py), not an add
        assert sum(len(node.inputs) == 2 for node in softmaxes) == 1
    for node in softmaxes:  # so no softmax input range reaches the mask's -100
        assert node.attrs["in_scale"] * 2 ** (node.attrs["in_bits"] - 1) < 50, (node.name, node.attrs)
    _assert_reference_matches_fake_quant(gm, program, inputs)
    if tvm:
        _assert_tvm_bit_exact(program, inputs)
    _assert_onnxruntime_agrees(program, inputs, tmp_path)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - OWN_FAST_TEST))
def test_tiny_family_agrees_with_fake_quant_and_onnxruntime(family, tmp_path):
    _every_stage(family, tmp_path, tvm=False)


def test_tiny_maxvit_einsum_attention_agrees_with_every_backend(tmp_path):
    """MaxViT's einsums become matmuls (``passes/decompose_einsum.py``) and its ``swapaxes`` transposes: traced as
    the model computes, the reference within 1 LSB of fake-quant stepwise, onnxruntime within the contract. Its
    LayerNorm inputs are 16-bit codes at scales of ~3e-8, where onnxruntime once dropped their clamp (codes of
    -32768, refused by the LayerNorm kernel: ``tests/test_onnx.py``, 16-bit codes at tiny scales)."""
    model, x = tiny_maxvit(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gm, _ = pipeline.trace(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-5)
    assert not any("einsum" in str(node.target) for node in gm.graph.nodes)
    assert any(node.target is torch.swapaxes for node in gm.graph.nodes)
    gm, chosen = _freeze_at_random_bits(pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), (x,)), 2)
    program = IntegerProgram.from_graph(gm)
    assert FAMILIES["maxvit"][2] <= {node.op for node in program.nodes}
    _assert_reference_matches_fake_quant(gm, program, (x,))
    _assert_onnxruntime_agrees(program, (x,), tmp_path)


@pytest.mark.slow  # a TVM build each (~15-60 s on 2 cores); the ViT test above is the fast TVM case
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_family_goes_through_every_stage(family, tmp_path):
    _every_stage(family, tmp_path, tvm=True)


class Normalized(nn.Module):
    """A token projection, ``F.normalize`` over the features, a product of the normalized tokens (cosine
    similarities, as Swin V2's attention forms them) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        t = torch.nn.functional.normalize(self.proj(x), dim=-1)
        return self.head(torch.matmul(t, t.transpose(-2, -1)) @ t)


def test_l2_normalize_with_an_outlier_channel_through_every_backend(tmp_path):
    """One channel ~50x the others (the norm is dominated by it; the other channels' normalized values are small but
    not lost at 8 bits): the reference within 1 LSB of fake-quant stepwise, TVM bit-exact, onnxruntime within the
    contract; a zero token (the projection's bias zeroed) normalizes to zeros."""
    model = Normalized()
    with torch.no_grad():
        model.proj.weight[3] *= 50
        model.proj.bias.zero_()
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    x[1, 2] = 0  # a zero token: its normalized row is 0 in every backend (float: 0 / eps)
    gm, program, inputs, _ = _program(model, (x,), seed=3)
    normalize = [node for node in program.nodes if node.op == "l2_normalize"]
    assert len(normalize) == 1 and normalize[0].attrs["size"] == 16
    env = program.run_all(*inputs)
    codes = env[normalize[0].name].q
    assert codes[1, 2].abs().sum() == 0 and codes[0].abs().amax(-1).min() > 0
    assert (codes[0, :, 3].abs() > codes[0, :, :3].abs().amax(-1)).all()  # the outlier channel dominates
    _assert_reference_matches_fake_quant(gm, program, inputs)
    _assert_tvm_bit_exact(program, inputs)
    _assert_onnxruntime_agrees(program, inputs, tmp_path)
