"""Embedding lookups from a per-row quantized table, and constant tensors of the graph.

``embedding`` (program op, a quantized ``nn.Embedding``: ``mpqc.qmodules.QuantEmbedding``)
    The table is a weight like a layer's: ``insert_quantizers`` gives it the method's weight quantizer with one scale
    per row (the per-output-channel scales of a ``[V, D]`` weight are per row), its bit-width learned and counted in
    weight memory (``analyze_layers`` records it as a layer with ``params = V * D``, no MACs and no quantized input).
    Frozen: codes ``W`` (b-bit signed, ``tensors["weight"]``) and row scales ``s_v`` (``tensors["weight_scale"]``).
    Its value is the float value ``fp32(W[ids]) * fp32(s[ids])`` (one rounding: exact and the same in every
    backend): the embeddings of a token add in fp32 and are requantized by the next quantizer, as any float value.
    Indices arrive as the program's fp32 inputs (exact below 2^24) or constants; an index outside the table is an
    error in the reference and in onnxruntime (``Gather`` checks it), clipped by TVM's ``take``.
    TVM: the codes are a bit-packed weight of the artifact (``oihw`` layout: as stored), ``take`` of rows and
    scales, an exact multiply. ONNX: ``DequantizeLinear(axis=0)`` of the UINT8 table (zero point 128) with the row
    scales, then ``Gather``: the same fp32 products.
``constant`` (a ``get_attr`` tensor: one that ``passes/fold_constants.py`` folded, e.g. HF's position ids, or a
    parameter read as a value, e.g. a ViT's class token and position embedding) Its values as fp32 (the program's float values; integer-valued constants such as indices are exact below 2^24).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node

from mpqc.errors import MpqcError
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, dequantize, register_op
from mpqc.qmodules import QuantEmbedding
from mpqc.quantizers.base import FixedQuantizer

TESTS = ("tests/test_ops_transformer.py::test_transformer_ops_are_bit_exact_on_tvm",
         "tests/test_ops_transformer.py::test_transformer_ops_agree_with_onnxruntime",
         "tests/test_ops_transformer.py::test_hf_bert_goes_through_every_stage",
         "tests/test_ops_transformer.py::test_reference_agrees_with_fake_quant")


@register_op
class Embedding(OpDef):
    """A quantized embedding table read by indices (see the module docstring); an unquantized one is refused."""

    names = ("embedding",)
    modules = (QuantEmbedding, nn.Embedding)
    #: the module types analyze_layers records as (weight-only) layers, and their program op
    layer_types: dict[type[nn.Module], str] = {nn.Embedding: "embedding"}
    numerics_tests = TESTS

    def describe(self, gm, node, frozen):
        module = gm.get_submodule(node.target)
        ids = node.args[0] if node.args else None
        if not isinstance(module, QuantEmbedding):
            raise Unsupported("embedding was not quantized")
        if not isinstance(ids, Node):
            raise Unsupported("embedding of constant indices")
        if module.max_norm is not None:
            raise Unsupported("embedding with max_norm (it renormalizes the table at run time)")
        if not frozen:
            return IntNode(node.name, "embedding", [ids.name])
        if not isinstance(module.weight_quantizer, FixedQuantizer):
            raise Unsupported("embedding is not frozen: freeze the graph before building the integer program")
        frozen_q = module.weight_quantizer.frozen()
        codes = frozen_q.quantize(module.weight.detach())
        scale = frozen_q.scale.reshape(-1).to(torch.float32)
        if scale.numel() == 1:
            scale = scale.expand(codes.shape[0]).clone()
        storage = torch.int8 if frozen_q.bits <= 8 else torch.int16
        attrs = {"module": node.target, "weight_bits": frozen_q.bits}  # per-row bits: their largest (the storage)
        if frozen_q.row_bits is not None:  # and their mean, what budgets count (passes/allocate_table_rows.py)
            attrs["average_weight_bits"] = float(frozen_q.row_bits.mean())
            bits, rows = frozen_q.row_bits.int().unique(return_counts=True)
            attrs["row_bits"] = {str(b): int(n) for b, n in zip(bits.tolist(), rows.tolist())}  # bits -> rows
        return IntNode(node.name, "embedding", [ids.name], attrs, {"weight": codes.to(storage), "weight_scale": scale})

    @staticmethod
    def indices(node: IntNode, value) -> Tensor:
        ids = dequantize(value)
        rows = node.tensors["weight"].shape[0]
        if ids.numel() and (float(ids.min()) < 0 or float(ids.max()) >= rows or bool((ids != ids.round()).any())):
            raise MpqcError(f"embedding {node.name!r}: indices must be integers in [0, {rows})")
        return ids.to(torch.int64)

    def evaluate(self, program, node, env):
        table = node.tensors["weight"].to(torch.float32) * node.tensors["weight_scale"].to(torch.float32)[:, None]
        return F.embedding(self.indices(node, env[node.inputs[0]]), table)

    def relax(self, lowering, node):
        from tvm.relax import op as R

        from mpqc.ops.arith import exact_product
        from mpqc.targets.tvm import _Float

        ids = lowering.emit(R.astype(lowering.dequantize(lowering.env[node.inputs[0]]), "int64"))
        rows = lowering.emit(R.astype(R.take(lowering.weight(node, "oihw"), ids, axis=0, mode="clip"), "float32"))
        scale = lowering.const(node.tensors["weight_scale"].to(torch.float32))
        row_scale = lowering.emit(R.expand_dims(R.take(scale, ids, axis=0, mode="clip"), axis=-1))
        return _Float(exact_product(lowering, rows, row_scale))

    def relax_check(self, node):
        bits = node.attrs["weight_bits"]
        return None if bits <= 8 else f"{bits}-bit embedding tables (the TVM target stores weights in int8)"

    def onnx(self, builder, node):
        from onnx import TensorProto

        from mpqc.targets.onnx import _dequantized_parameter, weight_storage

        label = builder.label(node)
        bits = node.attrs["weight_bits"]
        table = _dequantized_parameter(builder, label, "weight", node.tensors["weight"], weight_storage(bits),
                                       node.tensors["weight_scale"].to(torch.float32).numpy())
        builder.add("Cast", [node.inputs[0]], [f"{label}.ids"], f"{label}/Cast", to=TensorProto.INT64)
        builder.add("Gather", [table, f"{label}.ids"], [node.name], f"{label}/Gather", axis=0)
        builder.bits[f"{label}.weight"] = bits
        rank = builder.rank.get(node.inputs[0])
        builder.rank[node.name] = None if rank is None else rank + 1


@register_op
class Constant(OpDef):
    """A constant tensor of the graph (``get_attr``), as fp32 values: a folded buffer computation
    (``passes/fold_constants.py``: position ids) or a parameter read as a value (a ViT's class token and position
    embedding: trained as parameters, frozen into the program as fp32 tables). The ops reading it decide whether
    a float operand is allowed (an add: yes, a float leaf of the region; a product: refused)."""

    names = ("constant",)
    constant = True
    numerics_tests = TESTS

    def describe(self, gm, node, frozen):
        owner, _, name = node.target.rpartition(".")
        value = getattr(gm.get_submodule(owner) if owner else gm, name, None)
        if not isinstance(value, Tensor):
            raise Unsupported(f"get_attr {node.target!r} is not a tensor")
        return IntNode(node.name, "constant", [], {}, {"value": value.detach().to(torch.float32).clone()})

    def evaluate(self, program, node, env):
        return node.tensors["value"]

    def relax(self, lowering, node):
        from mpqc.targets.tvm import _Float

        return _Float(lowering.const(node.tensors["value"]))

    def onnx(self, builder, node):
        from mpqc.targets.onnx import _float_tensor

        value = node.tensors["value"].numpy()
        builder.initializer(_float_tensor(value.astype(np.float32), node.name))
        builder.rank[node.name] = value.ndim
