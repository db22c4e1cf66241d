"""Requantisation regions exported to ONNX in units of ``s_out``, exactly as the reference computes them.

A ``quantize`` node whose region does arithmetic (a residual ``add`` / ``sub``, an unfoldable ``batch_norm``) is
exported on real values by default: ``DequantizeLinear -> Conv -> Add -> Relu -> QuantizeLinear``. onnxruntime cannot
fuse a conv that is summed before its requantisation into its integer QLinearConv, so it runs that conv in fp32 on
dequantized values, and it computes the sum its own way: about one code in 10^6 flips at a rounding tie
(bench/zoo.py: RegNetX-800MF at random 2-8 bits, 98.0% of all codes within 1 LSB end to end after the flips spread).

:func:`region_in_units` writes such a region the way ``mpqc/ops/quantize.py`` defines it instead, every operation an
IEEE fp32 or exact integer one that onnxruntime computes exactly like PyTorch:

* a leaf holding quantizer codes ``q`` (storage ``q + z``): ``Cast(float) - z``, times ``M = fp32(s / s_out)``;
  a leaf holding codes moved, concatenated at one scale or max-pooled (an identity shortcut): ``Round(x / s)`` of its
  dequantized tensor (``x = fp32(q * s)`` is within half an ulp of ``q * s``, so the quotient is within about
  ``|q| * 2**-23`` of ``q``: exact after rounding for codes of up to 16 bits), times ``M``;
* a conv / linear leaf: its exact int32 accumulator, ``ConvInteger`` / ``MatMulInteger`` of the UINT8 codes and
  weights with their zero points (onnxruntime's u8 x u8 kernels are exact on every x86 CPU), plus the int32 bias,
  ``Cast(float)``, times ``M[c] = fp32((s_in * s_w[c]) / s_out)`` per output channel; a linear on tokens (rank 3
  or more) too (MatMulInteger broadcasts over the leading dims: the float Gemm it was summed from flipped swin_t's
  codes at rounding ties), and a leaf that is such a value behind ``identity`` (dropout) is that value;
* a leaf holding accumulators passed through ReLU or max pooling, or concatenated along the channels (DenseNet's
  features before a BatchNorm): the same ops replayed on the exact ``fp32(acc)`` tensors (ReLU and max commute with
  the monotone fp32 rounding), times the concatenated per-channel ``M[c]``; average pooled (DenseNet's
  transitions): the reference's exact window sums, in int32 (strided ``Slice``s of the zero-padded accumulators,
  added) before the cast to fp32, times ``fp32(s[c] / divisor / s_out)`` — only where the divisor is the same at
  every position (no ``ceil_mode``; padding counted or absent), else the region stays on real values;
* the steps: ``add`` / ``sub`` -> Add / Sub, ``relu`` -> Relu, ``batch_norm`` -> Mul by ``fp32(a)`` then Add
  ``fp32(b / s_out)``;
* a product of two code tensors (a squeeze-excitation gate ``x * sigmoid(...)``): the exact int32 product of the
  codes that ``mul``'s converter computes, ``Cast(float)`` (exact below 2**24, as the reference's fp32 of it),
  times ``M = fp32(s_a * s_b / s_out)``. Dequantized first (``q * fp32(s_a s_b)``, then ``QuantizeLinear``'s
  division by ``s_out``) it rounds twice: RegNetY-128GF at random bits flipped 43 codes of a gated feature map
  at ties, and 89.5% of all codes were within 1 LSB end to end once the flips spread;
* a float leaf (a graph input ``x``): ``x`` times ``fp32(1 / s_out)``, as the reference computes it. onnxruntime's
  ``QuantizeLinear(x, s)`` divides instead, and ``x / s`` and ``x * fp32(1 / s)`` differ by an ulp often enough
  to flip a code where the quotient is within an ulp of a half (mobilenet_v2 at random bits, a 6-bit input
  quantizer: ``2.2875917 / s`` is 19.499998, ``2.2875917 * fp32(1 / s)`` is 19.5, codes 19 and 20), and one
  flipped input code spreads end to end; so every region with a float leaf is written in units;
* then ``QuantizeLinear`` at scale 1 (the value is already in units of ``s_out``: round half to even, saturate) and
  the clamp to b bits, as for every quantizer (``targets/onnx.py``: an integer Clip of 8-bit codes; for 16-bit
  codes, a LayerNorm's input such as BERT's ``norm(x + dense(h))``, Max/Min at ``qmin``/``qmax`` units before it).

Regions with other leaves or steps (lookups, other pools, products of other values) stay on real values.
The real-valued nodes a region no longer reads are dropped by :func:`without_unused`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from mpqc import ops
from mpqc.ops.layers import accumulator_scale
from mpqc.reference import IntNode

#: Steps this module writes in units of s_out.
UNIT_STEPS = ("add", "sub", "relu", "batch_norm")
#: Steps that do arithmetic: a region holding one is worth writing in units (relu alone fuses exactly).
ARITHMETIC_STEPS = ("add", "sub", "batch_norm")
#: Program ops whose value is a float tensor (graph inputs): a region reading one is always written in units.
FLOAT_LEAVES = ("input",)
LAYER_LEAVES = ("conv1d", "conv2d", "linear")
#: Program ops whose integer value keeps the per-tensor scale of its inputs.
SCALE_KEEPING = ("identity", "cat", "stack", "reshape", "flatten", "permute", "transpose", "getitem", "slice",
                 "channel_shuffle", "max_pool1d", "max_pool2d", "relu")


def _float(value: Any, name: str) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _channel_shape(rank: int, channel_dim: int) -> list[int]:
    shape = [1] * rank
    shape[channel_dim] = -1
    return shape


def _layer_entries(b: Any) -> dict[str, dict[str, Any]]:
    return {entry["output"]: entry for entry in b.layers}


def static_scale(b: Any, name: str) -> float | None:
    """The per-tensor scale of the integer value ``name`` where it is known before running: a quantizer's, or that
    of quantizer codes moved, concatenated at one scale or max-pooled; ``None`` otherwise."""
    if name in b.quantizers:
        return float(b.quantizers[name]["scale"])
    node = b.by_name.get(name)
    if node is None or node.op not in SCALE_KEEPING or not node.inputs:
        return None
    scales = {static_scale(b, source) for source in node.inputs}
    return scales.pop() if len(scales) == 1 and None not in scales else None


#: Ops replayed on exact per-channel integers (accumulators): ReLU, max pools, identity, channel concatenation,
#: average pools (exact int32 window sums).
CHANNEL_KEEPING = ("relu", "identity", "max_pool1d", "max_pool2d", "cat", "avg_pool2d")
#: Of those, the ops replayed on int32 (an average pool's window sum must be exact before the cast to fp32).
INT32_KEEPING = ("identity", "cat", "avg_pool2d")


def channel_scales(b: Any, name: str, layers: dict[str, dict[str, Any]]) -> torch.Tensor | None:
    """The per-channel scale (float64, the reference's) of ``name`` where it is layer accumulators, passed through
    ReLU / max pooling / identity / average pooling or concatenated along dim 1; ``None`` otherwise."""
    node = b.by_name.get(name)
    if node is None:
        return None
    if node.op in ("conv1d", "conv2d") and name in layers and _leaf_supported(b, node, layers):
        return _layer_scale(b, node)
    if node.op not in CHANNEL_KEEPING or not node.inputs:
        return None
    if node.op == "cat" and node.attrs.get("dim") != 1:
        return None
    if node.op == "avg_pool2d":  # the reference's s / divisor (exact: the divisor is the same at every position)
        divisor = uniform_divisor(node)
        if divisor is None or not _int32_replayable(b, node.inputs[0], layers):
            return None
        inner = channel_scales(b, node.inputs[0], layers)
        return None if inner is None else inner / divisor
    scales = [channel_scales(b, source, layers) for source in node.inputs]
    return None if any(s is None for s in scales) else torch.cat(scales)


def uniform_divisor(node: IntNode) -> int | None:
    """The divisor of an average pool where PyTorch uses the same one at every output position whatever the input
    size (no ``ceil_mode``, padding counted or absent: ``kh * kw``); ``None`` otherwise."""
    a = node.attrs
    if a["ceil_mode"] or (any(a["padding"]) and not a.get("count_include_pad", True)):
        return None
    return int(np.prod(a["kernel"]))


def _int32_replayable(b: Any, name: str, layers: dict[str, dict[str, Any]]) -> bool:
    """Whether ``name``'s exact integers can be computed in int32 (conv accumulators concatenated / average pooled)."""
    node = b.by_name.get(name)
    if node is None:
        return False
    if node.op in ("conv1d", "conv2d"):
        return name in layers and _leaf_supported(b, node, layers)
    if node.op not in INT32_KEEPING or (node.op == "cat" and node.attrs.get("dim") != 1):
        return False
    if node.op == "avg_pool2d" and uniform_divisor(node) is None:
        return False
    return all(_int32_replayable(b, source, layers) for source in node.inputs)


def _exact_channel_integers(b: Any, name: str, layers: dict[str, dict[str, Any]]) -> str:
    """The fp32 tensor of ``name``'s exact integers (see :func:`channel_scales`), the ops replayed (once per value,
    named after it)."""
    node = b.by_name[name]
    out = f"{name}.exact_integers"
    if node.op in ("conv1d", "conv2d"):
        return exact_accumulator(b, node, layers[name])
    if out in b.rank:  # once per value, whichever regions read it
        return out
    if node.op == "avg_pool2d":  # fp32(exact int32 window sums), as the reference casts its int64 sums
        b.add("Cast", [_exact_int32(b, name, layers)], [out], f"{name}/exact/Cast", to=TensorProto.FLOAT)
        b.rank[out] = b.rank.get(name)
        return out
    inputs = [_exact_channel_integers(b, source, layers) for source in node.inputs]
    if node.op == "identity":
        return inputs[0]
    if node.op == "relu":
        b.add("Relu", inputs, [out], f"{name}/exact/Relu")
    elif node.op == "cat":
        b.add("Concat", inputs, [out], f"{name}/exact/Concat", axis=1)
    else:  # a max pool: the op's own converter on the integers
        replayed = IntNode(out, node.op, inputs, node.attrs, node.tensors)
        b.rank[inputs[0]] = b.rank.get(node.inputs[0])
        ops.op_named(node.op).onnx(b, replayed)
    b.rank[out] = b.rank.get(name)
    return out


def _exact_int32(b: Any, name: str, layers: dict[str, dict[str, Any]]) -> str:
    """The int32 tensor of ``name``'s exact integers (:func:`_int32_replayable`), the ops replayed once per value.
    An average pool's window sums: the input padded with zeros, then for each kernel offset ``(u, v)`` the strided
    slice ``x[..., u : H - (kh - 1 - u) : sh, v : W - (kw - 1 - v) : sw]`` (exactly the output's size, for any
    input size), added in int32."""
    node = b.by_name[name]
    if node.op in ("conv1d", "conv2d"):
        exact_accumulator(b, node, layers[name])
        return f"{layers[name]['node']}.biased"
    out = f"{name}.exact_int32"
    if out in b.rank:
        return out
    inputs = [_exact_int32(b, source, layers) for source in node.inputs]
    if node.op == "identity":
        return inputs[0]
    if node.op == "cat":
        b.add("Concat", inputs, [out], f"{name}/exact/Concat_int32", axis=1)
    else:  # avg_pool2d
        a, x = node.attrs, inputs[0]
        if any(a["padding"]):
            (ph, pw), pads = a["padding"], f"{name}.exact_pads"
            b.initializer(numpy_helper.from_array(np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64), pads))
            b.add("Pad", [x, pads], [f"{name}.exact_padded"], f"{name}/exact/Pad")
            x = f"{name}.exact_padded"
        (kh, kw), (sh, sw) = a["kernel"], a["stride"]
        terms = []
        for u in range(kh):
            for v in range(kw):
                term = f"{name}.exact_window_{u}_{v}"
                ends = [-(kh - 1 - u) if kh - 1 - u else 2**62, -(kw - 1 - v) if kw - 1 - v else 2**62]
                consts = [b.initializer(numpy_helper.from_array(np.array(values, np.int64), f"{term}.{key}"))
                          for key, values in (("starts", [u, v]), ("ends", ends), ("axes", [2, 3]),
                                              ("steps", [sh, sw]))]
                b.add("Slice", [x, *consts], [term], f"{name}/exact/Slice_{u}_{v}")
                terms.append(term)
        total = terms[0]
        for i, term in enumerate(terms[1:], 1):
            b.add("Add", [total, term], [f"{name}.exact_sum_{i}"], f"{name}/exact/Add_{i}")
            total = f"{name}.exact_sum_{i}"
        b.add("Identity", [total], [out], f"{name}/exact/Sum")
    b.rank[out] = b.rank.get(name)
    return out


def _leaf_supported(b: Any, leaf: IntNode, layers: dict[str, dict[str, Any]]) -> bool:
    if leaf.op in FLOAT_LEAVES or leaf.name in b.products:
        return True
    if leaf.name in b.quantizers:
        return b.quantizers[leaf.name]["storage"] == "UINT8"
    if static_scale(b, leaf.name) is not None:
        return True
    if leaf.op in CHANNEL_KEEPING and channel_scales(b, leaf.name, layers) is not None:
        return True
    entry = layers.get(leaf.name)
    if leaf.op not in LAYER_LEAVES or entry is None:
        return False
    return exact_output_supported(b, leaf, entry)


def _through_identities(b: Any, leaf: IntNode) -> IntNode:
    """The node an ``identity`` chain (dropout, a no-op at inference) reads, or ``leaf`` itself: a region's leaf
    ``dropout(linear(x))`` is the linear's accumulator (Swin's MLP before its residual add)."""
    while leaf.op == "identity" and leaf.inputs:
        leaf = b.by_name[leaf.inputs[0]]
    return leaf


def region_in_units(b: Any, node: IntNode, label: str, s_out: float) -> str | None:
    """The fp32 tensor holding ``node``'s region in units of ``s_out`` (nodes added to ``b``), or ``None`` where
    the region is left on real values (see the module docstring)."""
    region = node.attrs.get("region") or {}
    steps = [b.by_name[name] for name in region.get("steps", [])]
    leaves = [b.by_name[name] for name in region.get("leaves", [])]
    arithmetic = any(step.op in ARITHMETIC_STEPS for step in steps) or any(
        leaf.op in FLOAT_LEAVES or leaf.name in b.products for leaf in leaves)
    if not arithmetic or any(step.op not in UNIT_STEPS for step in steps):
        return None
    layers = _layer_entries(b)
    if not leaves or not all(_leaf_supported(b, _through_identities(b, leaf), layers) for leaf in leaves):
        return None
    known = {leaf.name for leaf in leaves}
    for step in steps:
        if not set(step.inputs) <= known:
            return None
        known.add(step.name)

    units: dict[str, str] = {}
    for leaf in leaves:
        prefix = f"{label}/units/{leaf.name}"
        integers, scale = _leaf_integers(b, _through_identities(b, leaf), layers, prefix)
        multiplier = b.initializer(_float((scale / s_out).float().numpy(), f"{prefix}.multiplier"))  # fp32(s / s_out)
        b.add("Mul", [integers, multiplier], [f"{prefix}.units"], f"{prefix}/Mul")
        units[leaf.name] = f"{prefix}.units"
        b.rank[units[leaf.name]] = b.rank.get(leaf.name)
    for step in steps:
        out, inputs = f"{label}/units/{step.name}", [units[name] for name in step.inputs]
        if step.op in ("add", "sub"):
            b.add("Add" if step.op == "add" else "Sub", inputs, [out], out)
        elif step.op == "relu":
            b.add("Relu", inputs, [out], out)
        else:  # batch_norm: x * fp32(a) + fp32(b / s_out), the reference's order
            shape = _channel_shape(b.rank[inputs[0]], 1)
            a = b.initializer(_float(step.tensors["multiplier"].float().reshape(shape).numpy(), f"{out}.multiplier"))
            shift = (step.tensors["shift"] / s_out).float().reshape(shape).numpy()
            c = b.initializer(_float(shift, f"{out}.shift"))
            b.add("Mul", [inputs[0], a], [f"{out}.scaled"], f"{out}/Mul")
            b.add("Add", [f"{out}.scaled", c], [out], f"{out}/Add")
        units[step.name] = out
        b.rank[out] = max(b.rank.get(name) or 0 for name in inputs) or None
    return units[node.inputs[0]]


def _leaf_integers(b: Any, leaf: IntNode, layers: dict[str, dict[str, Any]], prefix: str) -> tuple[str, torch.Tensor]:
    """The fp32 tensor of the exact integers ``leaf`` holds and their scale (float64, the reference's: one value, or
    one per channel shaped to broadcast)."""
    if leaf.op in FLOAT_LEAVES:  # a float tensor: x * fp32(1 / s_out), the reference's order
        return leaf.name, torch.tensor(1.0, dtype=torch.float64)
    if leaf.name in b.products:  # the exact int32 product of two code tensors
        product, scale = b.products[leaf.name]
        b.add("Cast", [product], [f"{prefix}.float"], f"{prefix}/Cast", to=TensorProto.FLOAT)
        return f"{prefix}.float", scale
    if leaf.name in b.quantizers:  # codes: Cast - z
        info = b.quantizers[leaf.name]
        b.add("Cast", [info["tensor"]], [f"{prefix}.float"], f"{prefix}/Cast", to=TensorProto.FLOAT)
        integers = f"{prefix}.float"
        if info["zero_point"]:
            zero = b.initializer(_float(info["zero_point"], f"{prefix}.zero_point"))
            b.add("Sub", [integers, zero], [f"{prefix}.codes"], f"{prefix}/Sub")
            integers = f"{prefix}.codes"
        return integers, torch.tensor(float(info["scale"]), dtype=torch.float64)
    rank = b.rank.get(leaf.name)
    if leaf.name in layers:  # an accumulator
        shape = _channel_shape(rank, rank - 1 if leaf.op == "linear" else 1)
        return exact_accumulator(b, leaf, layers[leaf.name]), _layer_scale(b, leaf).reshape(shape)
    scale = static_scale(b, leaf.name)
    if scale is not None:  # codes moved: Round(x / s) of the dequantized tensor
        s = b.initializer(_float(scale, f"{prefix}.scale"))
        b.add("Div", [leaf.name, s], [f"{prefix}.ratio"], f"{prefix}/Div")
        b.add("Round", [f"{prefix}.ratio"], [f"{prefix}.codes"], f"{prefix}/Round")
        return f"{prefix}.codes", torch.tensor(scale, dtype=torch.float64)
    scales = channel_scales(b, leaf.name, layers).reshape(_channel_shape(rank, 1))  # accumulators moved
    return _exact_channel_integers(b, leaf.name, layers), scales


def _layer_scale(b: Any, layer: IntNode) -> torch.Tensor:
    """The reference's per-channel scale of a layer's accumulator."""
    s_in = torch.tensor(float(b.quantizers[layer.inputs[0]]["scale"]), dtype=torch.float64)
    return accumulator_scale(s_in, layer.tensors["weight_scale"])


def exact_accumulator(b: Any, leaf: IntNode, entry: dict[str, Any]) -> str:
    """The fp32 tensor ``fp32(acc)`` of a layer (once per layer, named after it: ``<layer>/ConvInteger`` or
    ``<layer>/MatMulInteger``): the UINT8 codes and weights with their zero points, plus the int32 bias, cast as the
    reference casts it."""
    prefix = entry["node"]
    out = f"{prefix}.accumulator"
    if out in b.rank:
        return out
    x = entry["input"]
    x_zero = b.initializer(numpy_helper.from_array(np.array(entry["input_zero_point"], np.uint8), f"{prefix}.x_zero"))
    w_zero = b.initializer(numpy_helper.from_array(np.array(entry["weight_zero_point"], np.uint8), f"{prefix}.w_zero"))
    rank = b.rank.get(leaf.name)
    if leaf.op == "linear":
        b.add("Transpose", [entry["weight"]], [f"{prefix}.weight_t"], f"{prefix}/Transpose", perm=[1, 0])
        b.add("MatMulInteger", [x, f"{prefix}.weight_t", x_zero, w_zero], [f"{prefix}.acc"], f"{prefix}/MatMulInteger")
        channel_dim = rank - 1
    else:
        a, weight = leaf.attrs, leaf.tensors["weight"]
        b.add("ConvInteger", [x, entry["weight"], x_zero, w_zero], [f"{prefix}.acc"], f"{prefix}/ConvInteger",
              kernel_shape=list(weight.shape[2:]), strides=list(a["stride"]), pads=list(a["padding"]) * 2,
              dilations=list(a["dilation"]), group=a["groups"])
        channel_dim = 1
    shape = _channel_shape(rank, channel_dim)
    bias = b.initializer(numpy_helper.from_array(leaf.tensors["bias"].to(torch.int32).reshape(shape).numpy(),
                                                 f"{prefix}.bias_int32"))
    b.add("Add", [f"{prefix}.acc", bias], [f"{prefix}.biased"], f"{prefix}/AddBias")
    b.add("Cast", [f"{prefix}.biased"], [out], f"{prefix}/Cast", to=TensorProto.FLOAT)
    b.rank[out] = rank
    return out


def exact_output_supported(b: Any, layer: IntNode, entry: dict[str, Any]) -> bool:
    """Whether the layer's exact int32 accumulator (:func:`exact_accumulator`) can be taken, as a region's leaf or
    by :func:`exact_layer_output`: UINT8 codes and weights (onnxruntime's exact u8 x u8 kernels)."""
    return entry["weight_storage"] == "UINT8" and entry["input_storage"] == "UINT8"


def exact_layer_output(b: Any, layer: IntNode, entry: dict[str, Any]) -> str:
    """The layer's value as a program output, ``fp32(acc) * fp32(scale)`` exactly as the reference dequantizes it,
    from its exact int32 accumulator (:func:`exact_accumulator`), named after the layer's node."""
    acc = exact_accumulator(b, layer, entry)
    rank = b.rank[layer.name]
    shape = _channel_shape(rank, rank - 1 if layer.op == "linear" else 1)
    scale = _layer_scale(b, layer).to(torch.float32).reshape(shape).numpy()
    name = b.initializer(numpy_helper.from_array(scale, f"{entry['node']}.output_scale"))
    b.add("Mul", [acc, name], [layer.name], f"{entry['node']}/OutputScale")
    return layer.name


def without_unused(nodes: list[onnx.NodeProto], initializers: list[TensorProto],
                   outputs: Sequence[str]) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The nodes some graph output depends on, and the initializers they read."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1], [tensor for tensor in initializers if tensor.name in needed]
