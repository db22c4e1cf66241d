"""What the transformer ops (``norm``, ``softmax``, ``matmul``) share to run the integer kernels of
``mpqc/integer_kernels`` inside the integer program and its two backends.

* :func:`frozen_codes`: the bits, sign and scale of the codes an fx node holds (its frozen activation quantizer,
  seen through ops that keep integers) and of the quantizer reading an op's output; ``describe`` stores them in the
  program node's attrs (``in_bits``/``in_signed``/``in_scale``, ``bits``/``signed``/``scale``).
* TVM: :func:`relax_codes` (an integer value's 8-bit storage as int64 codes) and :func:`relax_output_codes` (int64
  codes back to 8-bit storage, an ``_Int`` at the output scale).
* ONNX: the program's values between ops are fp32 (QDQ); an input's exact codes are ``QuantizeLinear`` of its
  value at its own scale (the value is ``fp32(q * s)``, which ``QuantizeLinear`` maps back to ``q`` exactly, as the
  lookup tables rely on), and an output's value is ``fp32(q_out) * fp32(s_out)`` (:func:`onnx_value`).
  :class:`BuilderGraph` lets the kernels' ONNX emitters (written against ``integer_kernels.backends.OnnxGraph``)
  append to ``targets/onnx.py``'s builder.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.fx import GraphModule, Node

from mpqc.ops.registry import IntNode, Unsupported, has_property
from mpqc.quantizers.base import FixedQuantizer, Quantizer, integer_range


# --------------------------------------------------------------------------------------------- describe
def quantizer_node_behind(gm: GraphModule, node: Node) -> Node | None:
    """The activation quantizer's node whose codes ``node`` holds, seen through ops that keep integers."""
    while True:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Quantizer):
            return node
        if not has_property(gm, node, "keeps_integers") or not node.args or not isinstance(node.args[0], Node):
            return None
        node = node.args[0]


def quantizer_behind(gm: GraphModule, node: Node) -> FixedQuantizer | None:
    """The frozen activation quantizer whose codes ``node`` holds, seen through ops that keep integers."""
    found = quantizer_node_behind(gm, node)
    quantizer = None if found is None else gm.get_submodule(found.target)
    return quantizer if isinstance(quantizer, FixedQuantizer) else None


def codes_of(quantizer: FixedQuantizer) -> tuple[int, bool, float]:
    """``(bits, signed, scale)`` of a frozen activation quantizer's codes."""
    frozen = quantizer.frozen()
    return int(frozen.bits), bool(frozen.signed), float(frozen.scale.reshape(-1)[0])


def frozen_codes(gm: GraphModule, source: Node, what: str) -> tuple[int, bool, float]:
    """``(bits, signed, scale)`` of the codes ``source`` holds; :class:`Unsupported` naming ``what`` if none."""
    quantizer = quantizer_behind(gm, source)
    if quantizer is None:
        raise Unsupported(f"{what} needs a frozen activation quantizer on {source.name} (insert_quantizers puts "
                          "one there)")
    return codes_of(quantizer)


def output_codes(gm: GraphModule, node: Node, what: str) -> tuple[int, bool, float]:
    """``(bits, signed, scale)`` of the frozen quantizer that is ``node``'s only user (an op whose kernel makes
    output codes itself: its output quantizer then passes them through with multiplier 1)."""
    users = list(node.users)
    module = gm.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
    if not isinstance(module, FixedQuantizer):
        raise Unsupported(f"{what} needs a frozen activation quantizer as the only user of its output "
                          "(insert_quantizers puts one there)")
    return codes_of(module)


def missing_attrs(node: IntNode, names: Sequence[str]) -> str | None:
    """Why a program node cannot run its kernel: the frozen attributes it lacks (a hand-built program, or a graph
    described before freezing), or None."""
    missing = [name for name in names if name not in node.attrs]
    return f"{node.op} {node.name!r} has no {', '.join(missing)} (describe a frozen graph)" if missing else None


def require_attrs(node: IntNode, names: Sequence[str]) -> None:
    """:class:`Unsupported` with :func:`missing_attrs`'s reason."""
    reason = missing_attrs(node, names)
    if reason:
        raise Unsupported(reason)


def relax_check_codes(node: IntNode, names: Sequence[str]) -> str | None:
    """``OpDef.relax_check`` of a kernel op: its frozen attributes, and outputs the TVM target stores (8 bits)."""
    reason = missing_attrs(node, names)
    if reason is None and node.attrs.get("bits", 0) > 8:
        reason = f"{node.attrs['bits']}-bit outputs (the TVM target stores activations in 8 bits)"
    return reason


def input_attrs(bits: int, signed: bool, scale: float, prefix: str = "in") -> dict[str, Any]:
    return {f"{prefix}_bits": bits, f"{prefix}_signed": signed, f"{prefix}_scale": scale}


# --------------------------------------------------------------------------------------------- TVM
def relax_codes(lowering, name: str, what: str, layout: str | None = None):
    """The int64 codes of the program value ``name`` (an integer value in 8-bit storage, per-tensor scale), in
    ``layout`` where given (else in the layout the value has), and the value."""
    from tvm.relax import op as R

    from mpqc.targets.tvm import _Int

    value = lowering.env[name]
    if not isinstance(value, _Int) or value.scale.numel() != 1:
        raise Unsupported(f"{what} reads {name}, which is not a per-tensor quantized value")
    if layout is not None:
        value = lowering.in_layout(value, layout)
    return lowering.emit(R.astype(value.expr, "int64")), value


def relax_output_codes(lowering, codes, bits: int, signed: bool, scale: float, layout: str):
    """int64 codes (in the b-bit range) as an ``_Int`` in 8-bit storage at ``scale``."""
    from tvm.relax import op as R

    from mpqc.targets.tvm import _Int

    if bits > 8:
        raise Unsupported(f"{bits}-bit outputs (the TVM target stores activations in 8 bits)")
    stored = lowering.emit(R.astype(codes, "int8" if signed else "uint8"))
    return _Int(stored, torch.tensor(float(scale), dtype=torch.float64), layout)


# --------------------------------------------------------------------------------------------- ONNX
class BuilderGraph:
    """``integer_kernels.backends.OnnxGraph``'s interface (``node``, ``const``) over ``targets/onnx.py``'s
    builder: tensor and node names under ``label``."""

    def __init__(self, builder, label: str) -> None:
        self.builder = builder
        self.label = label
        self._ids = itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{self.label}/{hint}_{next(self._ids)}"

    def const(self, value: Any, hint: str = "c") -> str:
        from onnx import numpy_helper

        return self.builder.initializer(numpy_helper.from_array(np.asarray(value), self.fresh(hint)))

    def node(self, op: str, inputs: Sequence[str], *, outputs: int = 1, name: str | None = None, **attrs) -> Any:
        outs = [self.fresh(op) for _ in range(outputs)]
        self.builder.add(op, list(inputs), outs, name or outs[0], **attrs)
        return outs[0] if outputs == 1 else outs


def onnx_storage_codes(graph: BuilderGraph, value: str, bits: int, signed: bool, scale: float) -> tuple[str, int]:
    """The QuantizeLinear storage of the fp32 value ``value`` = ``q * s`` and its zero point: UINT8 (``q + 128`` for
    signed codes, ``q`` for unsigned) up to 8 bits, INT16/UINT16 (``q``) up to 16 (opset 21). ``q`` is already
    within its b-bit range (``value`` is a quantizer's output), so the storage type's saturation never acts."""
    from onnx import helper

    from mpqc.targets.onnx import _float_tensor, activation_storage

    storage = activation_storage(bits, signed, graph.builder.opset)
    dtype = helper.tensor_dtype_to_np_dtype(storage.elem_type)
    scale_name = graph.builder.initializer(_float_tensor(float(scale), graph.fresh("scale")))
    zero = graph.const(dtype.type(storage.zero_point), "zero_point")
    return graph.node("QuantizeLinear", [value, scale_name, zero]), storage.zero_point


def onnx_kernel(builder: Any, node: IntNode, kernel: Callable[[BuilderGraph, str], str]) -> None:
    """The ONNX of an op computed by one integer kernel: its input's codes (``attrs`` ``in_bits``, ``in_signed``,
    ``in_scale``), ``kernel(graph, codes)`` -> output codes, dequantized at ``attrs["scale"]`` as ``node.name``."""
    graph = BuilderGraph(builder, builder.label(node))
    a = node.attrs
    codes = onnx_codes(graph, node.inputs[0], a["in_bits"], a["in_signed"], a["in_scale"])
    onnx_value(graph, kernel(graph, codes), a["scale"], node.name)
    builder.rank[node.name] = builder.rank.get(node.inputs[0])


def onnx_codes(graph: BuilderGraph, value: str, bits: int, signed: bool, scale: float) -> str:
    """The int64 codes ``q`` of the fp32 value ``value`` = ``q * s``."""
    from mpqc.integer_kernels.backends import codes_from_storage_onnx

    return codes_from_storage_onnx(graph, *onnx_storage_codes(graph, value, bits, signed, scale))


def onnx_value(graph: BuilderGraph, codes: str, scale: float, output: str) -> None:
    """``output`` = ``fp32(codes) * fp32(scale)`` (one rounding, as the reference dequantizes) for integer codes.
    ``Cast`` and ``Mul`` rather than ``DequantizeLinear`` of int32: onnxruntime's QDQ propagation moved such a
    DequantizeLinear past a Reshape and made an int32 QuantizeLinear it then refused."""
    from mpqc.targets.onnx import _float_tensor

    scale_name = graph.builder.initializer(_float_tensor(float(scale), graph.fresh("out_scale")))
    graph.builder.add("Mul", [graph.node("Cast", [codes], to=1), scale_name], [output], f"{graph.label}/Mul")


def check_range(node: IntNode, codes: torch.Tensor, bits: int, signed: bool) -> None:
    """The reference refuses input codes outside the b-bit range its attrs name (a kernel's tables assume it)."""
    low, high = integer_range(bits, signed)
    if codes.numel() and (int(codes.min()) < low or int(codes.max()) > high):
        raise ValueError(f"{node.op} {node.name!r}: input codes outside the {bits}-bit range [{low}, {high}]")
