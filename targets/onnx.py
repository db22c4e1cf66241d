"""Export an integer program to ONNX in QDQ form that onnxruntime computes exactly on every x86 CPU.

>>> exported = export_onnx(compiled, "model.onnx", input_shapes=[(1, 1, 28, 28)])   # doctest: +SKIP

Checking the file against the reference (on this CPU or an emulated one) is ``targets/onnx_check.py``.

**Opset 21** by default (``DEFAULT_OPSET``): the first opset whose QuantizeLinear/DequantizeLinear take INT4
and INT16/UINT16 (onnxruntime 1.32 CPU runs them). The model's IR version is the lowest that opset allows (10), so
older runtimes load it too. ``opset=13..20`` works too, for codes of at most 8 bits.

**Exact on every x86 CPU: every operand UINT8** (:func:`activation_storage`, :func:`weight_storage`). onnxruntime
fuses ``DequantizeLinear -> Conv/Gemm`` into integer kernels (QLinearConv, QGemm) whose int32 accumulators are the
reference's, and picks those kernels from the CPU it runs on. Its u8 x s8 kernels on CPUs without VNNI (AVX2,
AVX-512F/BW) use ``vpmaddubsw``, which sums each pair of u8 x s8 products into a *saturating* int16
(2 * 255 * 127 > 32767); its session option ``session.x64quantprecision`` avoids that but is off by default, and
a deployment pipeline will not set ours. Its u8 x u8 kernels widen to int16 first and are exact everywhere. So
weights are stored UINT8 with zero point 128 (``w + 128``, for every b <= 8) and activation codes UINT8 (zero point
0 for unsigned values, 128 for signed ones). Measured (onnxruntime 1.32, default options, 2026-12-04; ResNet-20,
ResNet-18, MobileNetV2 and two small nets at random mixed 2-8 bits, 3-4 draws each):

=====================================  ====================================  ======================================
representation                         AMD EPYC, AVX2 only (real)            QEMU Haswell (AVX2) / Nehalem (SSE4.2)
=====================================  ====================================  ======================================
INT8 weights, INT8/UINT8 codes (old)   a net's output accumulators 75%       Haswell: as the real CPU; Nehalem:
                                       within 1 LSB *stepwise* (saturation,  exact (its SSE kernel widens first)
                                       max 18,452 LSB)
UINT8 everything (chosen)              every step exact; end to end >=       Haswell: as the real CPU; Nehalem:
                                       99.92% of all codes within 1 LSB      exact end to end
=====================================  ====================================  ======================================

``compact_weights=True`` stores weights of <= 4 bits as INT4 (half the file where most layers have <= 4 bits), the
others as above; bench/onnx_cpus.py measured the same agreement as all-UINT8 on these nets, but with INT8 for the
wider layers onnxruntime computed the INT4 layers in fp32 (FusedConv) and flipped more codes at ties, so INT4 is
opt-in: ``mpqc export --compact-weights`` holds it to the same check. Weights of more than 8 bits are INT16 with
activation codes INT16/UINT16 (opset 21; onnxruntime computes those layers in fp32; tested on ResNet-20).

*Matches*: every node of an :class:`~mpqc.reference.IntegerProgram` through its op family in the registry
(``mpqc/ops/``: ``OpDef.onnx``; ``quantize`` and the layers call ``_convert_quantize`` / ``_convert_layer`` here); the ops
that have no converter, or a converter that refuses the node's attributes, raise one
:class:`~mpqc.errors.UnsupportedOpError` listing every such node.

*Rewrites to* (QDQ: the tensors between ops are real-valued, integers live between Q and DQ):

* ``quantize`` (b bits, scale ``s``) -> ``QuantizeLinear(s, z)`` -> ``Clip(qmin+z, qmax+z)`` ->
  ``DequantizeLinear``. The integer codes (the Clip output, ``<quantizer>.q``, holding ``value + z``) are UINT8 for
  b <= 8 (``z`` = 128 for signed values, else 0; INT16/UINT16 with ``z`` = 0 above). QuantizeLinear rounds half to
  even like the reference but saturates to the whole storage type, so the b-bit clamp follows as an **integer
  Clip of the codes**; none is emitted where the range is the whole storage type (unsigned 8 bits; signed 8 bits
  stop at -127, so their Clip stays). The Clip must come *after* QuantizeLinear: onnxruntime fuses
  ``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` into its integer kernels (QLinearConv, QGemm, exact int32
  accumulators, one fp32 requantisation) only when nothing stands between the layer and QuantizeLinear. With the
  float ``Clip(qmin*s, qmax*s)`` before QuantizeLinear that mpqc emitted before 2026-12-04, onnxruntime ran all but 3 of
  ResNeXt-50's 53 convs as fp32 convolutions of dequantized values, which flipped about 1 code in 10^6 at rounding
  ties, and in deep random-weight nets those flips spread (bench/zoo.py: 16 torchvision models below the
  end-to-end floor); with the integer Clip that net is exact end to end. Codes wider than 8 bits (INT16/UINT16
  storage) keep a float clamp before QuantizeLinear (exact too: rounding ``x/s`` is monotone and maps
  ``fp32(qmax*s)`` back to ``qmax``), because onnxruntime 1.32's CPU Clip has 8-bit integer kernels only; the
  clamp is ``Max`` then ``Min``, not a float ``Clip``, which onnxruntime's ClipQuantFusion drops where its bounds
  are within an absolute 1.2e-7 of the storage type's (a signed 16-bit code at a scale below ~1.2e-7 then
  saturated at -32768: MaxViT's LayerNorm inputs).
* **Why activations are not INT4** even at b <= 4: onnxruntime 1.32 runs QuantizeLinear/DequantizeLinear with
  INT4/UINT4 on CPU, but its graph optimiser mishandles a sub-byte QuantizeLinear *output*: with
  ``Relu -> QuantizeLinear(INT4)`` it drops the Relu (negative codes come out), and on ResNet-20 a
  ``Clip -> QuantizeLinear(UINT4)`` aborts session creation ("Unexpected data type for QuantizeLinear input
  y_zero_point of 21", ``ClipQuantFusion``). Activation codes are run-time tensors, so 8-bit storage costs no file
  size; the b-bit range is what the Clip enforces and what the metadata records.
* ``conv1d`` / ``conv2d`` (groups, so depthwise too) -> ``Conv``; ``linear`` -> ``Gemm(transB=1)`` (a rank >= 3
  input's codes flattened to rank 2 first, and the result reshaped back: ``_linear_gemm``). Each reads its input
  from the quantizer's DequantizeLinear, its weight as
  ``DequantizeLinear(axis=0)`` of the integer weight initializer (UINT8 holding ``w + 128`` with zero points 128
  for b <= 8; INT16 above; with ``compact_weights`` INT4 for b <= 4 at opset 21, packed two to a byte, zero points
  0; one fp32 scale per output channel), and its bias as ``DequantizeLinear(axis=0)`` of the int32 bias at scale
  ``fp32(s_in * s_w)``: the reference's accumulator scale.
* ``relu`` -> Relu, ``clamp`` -> Clip, ``add`` -> Add, ``max_pool2d`` -> MaxPool, ``global_avg_pool`` ->
  GlobalAveragePool, ``avg_pool2d`` -> AveragePool, ``flatten`` -> Flatten (``start_dim`` 1) or Reshape, ``identity``
  -> Identity, ``cat`` -> Concat, data movement and adaptive pools as ``mpqc/ops/`` says, ``mean``/``sum`` -> ReduceMean/ReduceSum: fp32 arithmetic on the dequantized values, which is the reference's arithmetic
  up to fp32 rounding (the reference rescales exact integers by one fp32 multiplier; ONNX divides an fp32 sum by
  the scale), hence the rare 1-LSB differences the contract allows.

*Names*: a program value keeps its name as the ONNX tensor name (graph inputs and outputs too). A layer's main
node (Conv/Gemm) is named after its PyTorch module (``layer1.0.conv1``), its initializers ``<module>.weight``,
``.weight_scale``, ``.bias``, ...; a quantizer's nodes ``<module>/Clip``, ``<module>/QuantizeLinear``,
``<module>/DequantizeLinear``; other nodes after the program node.

*Metadata* (``metadata_props``, keys declared below): the format and opset, ``mpqc.bits.<tensor>`` with the
bit-width of every integer tensor (weights, activation codes, int32 biases), ``mpqc.layers`` (JSON: one entry per
layer with its weight and input tensors, bits, storage types and zero points) and ``mpqc.quantizers`` (JSON:
program quantizer -> code tensor, bits, sign, scale, storage, zero point), which ``onnx_check`` reads.

*Ensures* (tested on ResNet-20, torchvision ResNet-18, MobileNetV2 and two small nets at mixed 2-8 bits, on the
host CPU and on an emulated AVX2 CPU; bench/onnx_cpus.py): ``onnx.checker.check_model(full_check=True)`` passes,
onnxruntime's CPU provider runs the model with its default options, every requantisation step and every layer's
accumulators agree with the reference (within 1 LSB), and end to end >= 99.9% of all codes are within 1 LSB
(``onnx_check.contract_violations``). A requantisation region that does arithmetic (a residual add, an unfoldable
BatchNorm) is written in units of ``s_out`` exactly as the reference computes it, its summed convs as ConvInteger
(``targets/onnx_regions.py``); so is a graph input's quantizer (``x * fp32(1 / s)`` then QuantizeLinear at scale 1:
onnxruntime's ``QuantizeLinear(x, s)`` divides, which flips a code where ``x / s`` is within an ulp of a half); so ResNet-20, ResNeXt-50, RegNetX-800MF, Inception-v3 and a small DenseNet at random
mixed 2-8 bits are exact in onnxruntime end to end. What can remain are 1-LSB flips at rounding ties in regions left
on real values (leaves that are products, lookups or average pools); in deep nets at low bits one flip spreads to
later codes.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from mpqc import ops
from mpqc.errors import ConfigError, MpqcError, UnsupportedOpError
from mpqc.quantizers.base import integer_range
from mpqc.reference import IntegerProgram, IntNode
from mpqc.targets.onnx_regions import exact_layer_output, exact_output_supported, region_in_units, without_unused

DEFAULT_OPSET = 21
MIN_OPSET = 13  # per-axis DequantizeLinear
EXPORT_FORMAT = "mpqc-onnx-qdq/1"

# metadata_props keys, declared once
META_FORMAT = "mpqc.format"
META_OPSET = "mpqc.opset"
META_BITS = "mpqc.bits."  # + tensor name
META_LAYERS = "mpqc.layers"
META_QUANTIZERS = "mpqc.quantizers"

BATCH_DIM = "N"


# --------------------------------------------------------------------------------------------- storage types
@dataclass(frozen=True)
class Storage:
    """How a b-bit integer ``v`` is stored in an ONNX tensor: element type and zero point (``code = v + zero``)."""

    elem_type: int
    zero_point: int = 0

    @property
    def name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type)

    def value_range(self) -> tuple[int, int]:
        """The values the type holds, zero point taken off."""
        low, high = _type_range(self.elem_type)
        return low - self.zero_point, high - self.zero_point

    def codes(self, values: np.ndarray | Tensor) -> np.ndarray:
        """``values`` as this storage's codes (``values + zero_point`` in the element type)."""
        array = values.numpy() if isinstance(values, Tensor) else np.asarray(values)
        return (array.astype(np.int64) + self.zero_point).astype(helper.tensor_dtype_to_np_dtype(self.elem_type))


def activation_storage(bits: int, signed: bool, opset: int = DEFAULT_OPSET) -> Storage:
    """Activation codes: UINT8 for every b <= 8 (zero point 128 for signed values, 0 for unsigned ones; see the
    module docstring, *Exact on every x86 CPU*), INT16/UINT16 for b <= 16 (opset >= 21). Raises
    :class:`ConfigError` where the opset has no such type."""
    if bits <= 8:
        return Storage(TensorProto.UINT8, 128 if signed else 0)
    if bits <= 16 and opset >= 21:
        return Storage(TensorProto.INT16 if signed else TensorProto.UINT16)
    raise ConfigError(f"opset {opset} has no QuantizeLinear type for {bits}-bit {'signed' if signed else 'unsigned'}"
                      " integers (INT16/UINT16 need opset 21)")


def weight_storage(bits: int, opset: int = DEFAULT_OPSET, *, compact: bool = False) -> Storage:
    """Weights (signed): UINT8 with zero point 128 for b <= 8; with ``compact``, INT4 (packed two to a byte) for
    b <= 4 at opset >= 21; INT16 for b <= 16 (opset >= 21). Raises :class:`ConfigError` otherwise."""
    if compact and bits <= 4 and opset >= 21:
        return Storage(TensorProto.INT4)
    if bits <= 8:
        return Storage(TensorProto.UINT8, 128)
    if bits <= 16 and opset >= 21:
        return Storage(TensorProto.INT16)
    raise ConfigError(f"opset {opset} has no DequantizeLinear type for {bits}-bit weights (INT16 needs opset 21)")


def _type_range(elem_type: int) -> tuple[int, int]:
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type not in _SUB_BYTE else None
    return _SUB_BYTE[elem_type] if info is None else (int(info.min), int(info.max))


_SUB_BYTE = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}


def _float_tensor(values, name: str) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


# --------------------------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, the opset and, per quantized tensor, its bits and storage."""

    path: Path | None  # None from build_onnx, which writes nothing
    opset: int
    inputs: dict[str, list[int | str]]  # graph input -> shape ("N" is the dynamic batch)
    outputs: list[str]
    quantizers: dict[str, dict[str, Any]]  # program quantize node -> code tensor, bits, signed, scale, storage
    layers: list[dict[str, Any]]  # per layer: module, op, weight/input tensors, bits, storage
    bits: dict[str, int] = field(repr=False)  # every integer tensor -> bit-width

    def storage_counts(self) -> dict[str, int]:
        """How many weight and activation-code tensors each storage type holds."""
        counts: dict[str, int] = {}
        kinds = [layer["weight_storage"] for layer in self.layers] + [q["storage"] for q in self.quantizers.values()]
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------- building
_Unsupported = ops.Unsupported  # what a converter raises for a node it cannot express


class _Builder:
    """Accumulates nodes, initializers and metadata; converters read program values by name."""

    def __init__(self, program: IntegerProgram, opset: int, compact_weights: bool) -> None:
        self.program = program
        self.opset = opset
        self.compact_weights = compact_weights
        self.by_name = {node.name: node for node in program.nodes}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.rank: dict[str, int | None] = {}
        self.bits: dict[str, int] = {}
        self.quantizers: dict[str, dict[str, Any]] = {}
        self.layers: list[dict[str, Any]] = []
        #: products of two code tensors: their exact int32 product's tensor and its scale (float64, the reference's)
        self.products: dict[str, tuple[str, torch.Tensor]] = {}
        self._labels: set[str] = set()

    def label(self, node: IntNode) -> str:
        """The name ONNX nodes of ``node`` carry: its PyTorch module where it has one, unique in the graph."""
        label = node.attrs.get("module", node.name)
        if label in self._labels:
            label = node.name if node.name not in self._labels else f"{label}#{node.name}"
        self._labels.add(label)
        return label

    def add(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def initializer(self, tensor: TensorProto) -> str:
        self.initializers.append(tensor)
        return tensor.name


def _convert_input(b: _Builder, node: IntNode, shape: Sequence[int] | None) -> None:
    if shape is None:
        shape = _input_dims(b.program, node)
    dims = [BATCH_DIM, *shape[1:]]
    b.inputs.append(helper.make_tensor_value_info(node.name, TensorProto.FLOAT, dims))
    b.rank[node.name] = len(dims)


def _input_dims(program: IntegerProgram, node: IntNode) -> list[int | str]:
    """Dims of an input whose shape was not given, from the first conv it feeds through shape-keeping ops:
    ``[N, C, H, W]`` (``[N, C, L]``) with only C known. ONNX graph inputs need a rank."""
    frontier, seen = [node.name], set()
    while frontier:
        name = frontier.pop()
        for user in program.nodes:
            if name in user.inputs and user.name not in seen:
                seen.add(user.name)
                if user.op in ("conv1d", "conv2d"):
                    weight = user.tensors["weight"]
                    return [BATCH_DIM, weight.shape[1] * user.attrs["groups"], *["H", "W"][: weight.dim() - 2]]
                if getattr(ops.op_named(user.op), "keeps_shape", False):
                    frontier.append(user.name)
    raise ConfigError(f"the rank of input {node.name!r} cannot be told from the program: pass input_shapes")


def _convert_quantize(b: _Builder, node: IntNode) -> None:
    label = b.label(node)
    bits, signed, scale = node.attrs["bits"], node.attrs["signed"], float(node.attrs["scale"])
    try:
        storage = activation_storage(bits, signed, b.opset)
    except ConfigError as error:
        raise _Unsupported(str(error)) from None
    qmin, qmax = integer_range(bits, signed)
    source = node.inputs[0]
    scale_name = b.initializer(_float_tensor(scale, f"{label}.scale"))
    zero = b.initializer(numpy_helper.from_array(storage.codes(np.zeros((), np.int64)), f"{label}.zero_point"))
    codes = f"{label}.q"
    clip = (qmin, qmax) != storage.value_range()
    quantize_scale = scale_name
    units = region_in_units(b, node, label, scale)
    if units is not None:  # the region in units of s_out, as the reference computes it (targets/onnx_regions.py)
        source, quantize_scale = units, b.initializer(_float_tensor(1.0, f"{label}.unit_scale"))
    if clip and bits <= 8:  # an integer Clip of the codes: Conv -> QuantizeLinear stays fusable (QLinearConv)
        b.add("QuantizeLinear", [source, quantize_scale, zero], [f"{label}.q_unclipped"], f"{label}/QuantizeLinear")
        low = b.initializer(numpy_helper.from_array(storage.codes(np.array(qmin)), f"{label}.clip_min"))
        high = b.initializer(numpy_helper.from_array(storage.codes(np.array(qmax)), f"{label}.clip_max"))
        b.add("Clip", [f"{label}.q_unclipped", low, high], [codes], f"{label}/Clip")
    else:
        if clip:  # 16-bit codes: onnxruntime's CPU Clip has 8-bit integer kernels only, so clamp the float, with
            # Max and Min: a float Clip before QuantizeLinear is dropped by onnxruntime's ClipQuantFusion where its
            # bounds are within an absolute fp32 epsilon (1.2e-7) of the storage type's, which at scales below
            # ~1.2e-7 (MaxViT's LayerNorm inputs) let a signed 16-bit code saturate at -32768
            unit = 1.0 if units is not None else scale
            low = b.initializer(_float_tensor(qmin * unit, f"{label}.clip_min"))
            high = b.initializer(_float_tensor(qmax * unit, f"{label}.clip_max"))
            b.add("Max", [source, low], [f"{label}.above_min"], f"{label}/Max")
            b.add("Min", [f"{label}.above_min", high], [f"{label}.clipped"], f"{label}/Clip")
            source = f"{label}.clipped"
        b.add("QuantizeLinear", [source, quantize_scale, zero], [codes], f"{label}/QuantizeLinear")
    b.add("DequantizeLinear", [codes, scale_name, zero], [node.name], f"{label}/DequantizeLinear")
    b.rank[node.name] = b.rank.get(node.inputs[0])
    b.bits[codes] = bits
    b.quantizers[node.name] = {"module": node.attrs.get("module", node.name), "tensor": codes, "bits": bits,
                               "signed": signed, "scale": scale, "storage": storage.name,
                               "zero_point": storage.zero_point, "clip": clip}


def _dequantized_parameter(b: _Builder, label: str, key: str, values: Tensor, storage: Storage,
                           scale: np.ndarray) -> str:
    """``DequantizeLinear(axis=0)`` of an integer initializer with per-channel ``scale`` (zero points: the
    storage's)."""
    data = b.initializer(numpy_helper.from_array(storage.codes(values), f"{label}.{key}"))
    scale_name = b.initializer(_float_tensor(scale, f"{label}.{key}_scale"))
    zero = b.initializer(numpy_helper.from_array(storage.codes(np.zeros(scale.shape, np.int64)),
                                                 f"{label}.{key}_zero_point"))
    out = f"{label}.{key}_dequantized"
    b.add("DequantizeLinear", [data, scale_name, zero], [out], f"{label}/{key}/DequantizeLinear", axis=0)
    return out


def _convert_layer(b: _Builder, node: IntNode) -> None:
    label = b.label(node)
    source = b.by_name[node.inputs[0]]  # a quantize node (IntegerProgram checks it)
    if source.name not in b.quantizers:
        raise _Unsupported(f"its input quantizer {source.name} is not exported")
    weight, bits = node.tensors["weight"], node.attrs["weight_bits"]
    try:
        storage = weight_storage(bits, b.opset, compact=b.compact_weights)
    except ConfigError as error:
        raise _Unsupported(str(error)) from None
    weight_scale = node.tensors["weight_scale"].to(torch.float32)
    bias_scale = (float(source.attrs["scale"]) * weight_scale.double()).to(torch.float32)
    w = _dequantized_parameter(b, label, "weight", weight, storage, weight_scale.numpy())
    bias = _dequantized_parameter(b, label, "bias", node.tensors["bias"], Storage(TensorProto.INT32),
                                  bias_scale.numpy())
    x, a = node.inputs[0], node.attrs
    quantizer = b.quantizers[source.name]
    entry = {"layer": a["module"], "op": node.op, "node": label, "weight": f"{label}.weight",
             "weight_bits": bits, "weight_storage": storage.name, "weight_zero_point": storage.zero_point,
             "input": quantizer["tensor"], "input_bits": quantizer["bits"], "input_signed": quantizer["signed"],
             "input_storage": quantizer["storage"], "input_zero_point": quantizer["zero_point"],
             "bias": f"{label}.bias", "output": node.name}
    # a program output nothing requantizes (a classifier's logits) is taken from the exact int32 accumulator: the
    # float Gemm/Conv of dequantized values rounds its fp32 sums (1.8 LSB on vit_b_32's head)
    exact = node.name in b.program.outputs and exact_output_supported(b, node, entry)
    out = f"{label}.float" if exact else node.name  # (the float path is then unused, and dropped)
    if node.op == "linear":
        if b.rank.get(x) is None or b.rank[x] < 2:
            raise _Unsupported(f"linear on a rank-{b.rank.get(x)} input (rank 2 or more)")
        _linear_gemm(b, label, x, w, bias, out, int(weight.shape[0]))
        b.rank[node.name] = b.rank[x]
    else:
        b.add("Conv", [x, w, bias], [out], label, kernel_shape=list(weight.shape[2:]),
              strides=list(a["stride"]), pads=list(a["padding"]) * 2, dilations=list(a["dilation"]), group=a["groups"])
        b.rank[node.name] = weight.dim()
    b.bits.update({f"{label}.weight": bits, f"{label}.bias": 32})
    b.layers.append(entry)
    if exact:
        exact_layer_output(b, node, entry)


def _linear_gemm(b: _Builder, label: str, x: str, w: str, bias: str, output: str, out_features: int) -> None:
    """``Gemm(transB=1)`` on rank-2 inputs. A rank >= 3 input (tokens, issue 15): its codes are flattened to
    ``[-1, in]`` and dequantized again, so the Gemm reads a DequantizeLinear as on rank 2 (the pattern onnxruntime
    runs as an integer QGemm), and the result is reshaped back to ``[..., out]``."""
    if b.rank[x] == 2:
        b.add("Gemm", [x, w, bias], [output], label, transB=1)
        return
    info = b.quantizers[x]
    scale = b.initializer(_float_tensor(float(info["scale"]), f"{label}.input_scale"))
    storage = activation_storage(info["bits"], info["signed"], b.opset)
    zero = b.initializer(numpy_helper.from_array(storage.codes(np.zeros((), np.int64)), f"{label}.input_zero_point"))
    b.add("Flatten", [info["tensor"]], [f"{label}.flat_codes"], f"{label}/Flatten", axis=b.rank[x] - 1)
    b.add("DequantizeLinear", [f"{label}.flat_codes", scale, zero], [f"{label}.flat"], f"{label}/DequantizeLinear")
    b.add("Gemm", [f"{label}.flat", w, bias], [f"{label}.gemm"], label, transB=1)
    b.add("Shape", [x], [f"{label}.in_shape"], f"{label}/Shape", start=0, end=b.rank[x] - 1)
    out = b.initializer(numpy_helper.from_array(np.array([out_features], np.int64), f"{label}.out_features"))
    b.add("Concat", [f"{label}.in_shape", out], [f"{label}.out_shape"], f"{label}/Concat", axis=0)
    b.add("Reshape", [f"{label}.gemm", f"{label}.out_shape"], [output], f"{label}/Reshape")


def build_onnx(model: IntegerProgram | Any, *, input_shapes: Sequence[Sequence[int]] | None = None,
               opset: int = DEFAULT_OPSET, compact_weights: bool = False) -> tuple[onnx.ModelProto, OnnxExport]:
    """The QDQ ``ModelProto`` of ``model`` (an IntegerProgram or a CompiledModel), checked, not written.

    ``input_shapes`` gives one full shape per program input (the batch dimension is exported as the dynamic
    ``"N"``); without it an input's rank and channels come from the first conv it feeds, its other sizes are
    left dynamic (``"H"``, ``"W"``). ``compact_weights`` stores weights of at most 4 bits as INT4 (half the
    file; onnxruntime then computes those layers in fp32, see the module docstring).
    """
    program = IntegerProgram.of(model)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"opset {opset} is outside the supported {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    placeholders = [node for node in program.nodes if node.op == "input"]
    if input_shapes is not None and len(input_shapes) != len(placeholders):
        raise ConfigError(f"input_shapes has {len(input_shapes)} shape(s); the program takes {len(placeholders)} "
                          "input(s)")
    shapes = dict(zip([n.name for n in placeholders], input_shapes or [None] * len(placeholders)))

    builder = _Builder(program, opset, compact_weights)
    unsupported: list[str] = []
    for node in program.nodes:
        if node.op == "input":
            _convert_input(builder, node, shapes[node.name])
            continue
        op = ops.op_named(node.op)
        try:
            if op is None or not op.has_backend("onnx"):
                raise _Unsupported(f"no ONNX converter for op {node.op!r}")
            op.onnx(builder, node)
        except _Unsupported as reason:
            unsupported.append(f"{node.name} = {node.op}({', '.join(node.inputs)})  ({reason})")
            builder.rank[node.name] = builder.rank.get(node.inputs[0]) if node.inputs else None  # go on listing
    if unsupported:
        raise UnsupportedOpError(f"ONNX export cannot express {len(unsupported)} node(s):\n  "
                                 + "\n  ".join(unsupported))

    nodes, initializers = without_unused(builder.nodes, builder.initializers, program.outputs)
    graph = helper.make_graph(nodes, "mpqc_integer_program", builder.inputs, [], initializers,
                              doc_string="mpqc integer program in QDQ form (see mpqc.targets.onnx)")
    opset_ids = [helper.make_opsetid("", opset)]
    onnx_model = helper.make_model(graph, opset_imports=opset_ids, producer_name="mpqc",
                                   ir_version=helper.find_min_ir_version_for(opset_ids))
    onnx_model.graph.output.extend(_output_types(onnx_model, program.outputs))
    metadata = {META_FORMAT: EXPORT_FORMAT, META_OPSET: str(opset),
                META_LAYERS: json.dumps(builder.layers), META_QUANTIZERS: json.dumps(builder.quantizers),
                **{META_BITS + name: str(bits) for name, bits in builder.bits.items()}}
    helper.set_model_props(onnx_model, metadata)
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise MpqcError(f"the exported ONNX model fails onnx.checker: {error}") from error
    inputs = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in builder.inputs}
    return onnx_model, OnnxExport(path=None, opset=opset, inputs=inputs, outputs=list(program.outputs),
                                  quantizers=builder.quantizers, layers=builder.layers, bits=builder.bits)


def _output_types(onnx_model: onnx.ModelProto, names: list[str]) -> list[onnx.ValueInfoProto]:
    """Graph outputs typed by ONNX shape inference (the checker wants every graph output to have a shape)."""
    inferred = onnx.shape_inference.infer_shapes(onnx_model)
    known = {value.name: value for value in inferred.graph.value_info}
    outputs = []
    for name in names:
        if name in known and known[name].type.tensor_type.HasField("shape"):
            outputs.append(known[name])
        else:
            raise MpqcError(f"ONNX shape inference gives no shape for the program output {name!r}")
    return outputs


def export_onnx(model: IntegerProgram | Any, path: str | Path, *,
                input_shapes: Sequence[Sequence[int]] | None = None, opset: int = DEFAULT_OPSET,
                compact_weights: bool = False) -> OnnxExport:
    """Write ``model`` (an IntegerProgram or a CompiledModel) to ``path`` as a QDQ ONNX model; see the module
    docstring for the construction and :func:`build_onnx` for the arguments."""
    onnx_model, export = build_onnx(model, input_shapes=input_shapes, opset=opset,
                                    compact_weights=compact_weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, path)
    return replace(export, path=path)


def read_metadata(onnx_model: onnx.ModelProto | str | Path) -> dict[str, Any]:
    """The mpqc metadata of an exported model: format, opset, bits per tensor, layers and quantizers."""
    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model), load_external_data=False)
    props = {prop.key: prop.value for prop in onnx_model.metadata_props}
    if props.get(META_FORMAT) != EXPORT_FORMAT:
        raise MpqcError(f"the ONNX model is not an {EXPORT_FORMAT} export (metadata {META_FORMAT!r} is "
                        f"{props.get(META_FORMAT)!r})")
    return {"format": props[META_FORMAT], "opset": int(props[META_OPSET]),
            "bits": {key[len(META_BITS):]: int(value) for key, value in props.items() if key.startswith(META_BITS)},
            "layers": json.loads(props[META_LAYERS]), "quantizers": json.loads(props[META_QUANTIZERS])}


def input_shape_from_report(compiled: Any) -> tuple[int, ...] | None:
    """A one-example input shape for a ``CompiledModel`` whose single input reaches its first layer through
    quantizers only: ``(1, *input_shape)`` of that layer in the report. None where that cannot be told."""
    program = IntegerProgram.of(compiled)
    by_name = {node.name: node for node in program.nodes}
    inputs, layers = [node for node in program.nodes if node.op == "input"], program.layers()
    if len(inputs) != 1 or not layers:
        return None
    source = by_name[layers[0].inputs[0]]
    if by_name[source.inputs[0]].op != "input":
        return None
    shapes = {entry.get("name"): entry.get("input_shape") for entry in (compiled.report or {}).get("layers", [])}
    shape = shapes.get(layers[0].attrs["module"])
    return (1, *shape) if shape else None
