"""Insert learnable-bit-width quantizers on every conv/linear weight and on every conv/linear input tensor.

Matches:    every ``call_module`` node whose module is exactly nn.Conv1d / nn.Conv2d / nn.Linear; embedding tables
            (nn.Embedding) get a weight quantizer only (``_quantize_tables``).
Rewrites to:
  * the layer module -> its quantized subclass (``mpqc.qmodules``) with a ``weight_quantizer`` submodule
    (per-output-channel scales);
  * the tensor feeding the layer -> ``act_quantizers.<layer>(tensor)``, a ``call_module`` node placed right after
    the producer. *Every* user of that tensor (a residual add too) reads the quantized value, so the fake-quant
    graph has exactly the integer semantics of ``mpqc.reference``. A tensor feeding several layers gets one
    quantizer, named after the first of them (graph order).
Requires:   ``analyze_layers`` has run (``node.meta[LAYER_META]``); batch norms folded.
Ensures:    every quantized layer node has ``node.meta[INPUT_QUANTIZER_META]`` = the qualified name of its input
            quantizer; activation quantizers are unsigned where the tensor is non-negative by construction
            (ReLU-like producers, pools/reshapes of those) or, for graph inputs, on all calibration data;
            activation ranges start at the ``config.activation_percentile`` of the calibration data
            (``calibration_inputs``; of ``|x|`` where signed), weight ranges per output channel at the clipping
            level ``config.weight_init`` picks at the quantizer's starting bits (default: the MSE search of
            :mod:`mpqc.quantizers.calibration`); every method learns them from there.
            A residual add whose result (after ReLU/clamp) is not itself a layer's input, and the float input
            of an average pool, get a fixed ``residual_bits`` quantizer (``act_quantizers.<node>_out``), so the
            integer program never sums floats. The operands other ops need as codes (the op registry's
            ``quantized_operands`` / ``quantized_output``: a lookup table's input and output, a product's factors),
            where they are not codes already, get the method's learnable activation quantizer like a layer's input
            (``act_quantizers.<node>_out``, bits at most the readers' ``OpDef.operand_bits``: 8 where a lookup
            table indexes 2^b entries or a product is formed; a LayerNorm's input, a residual sum with outlier
            channels, starts at 16 bits and at the calibration maximum, and learns down); one that feeds no
            layer carries an :class:`~mpqc.layers.ActivationInfo` (``ACTIVATION_META``) and a product of two
            quantized activations a :class:`~mpqc.layers.ProductInfo` (``PRODUCT_META``), so the budgets count
            their storage and BitOPs (:func:`cost_items`, :func:`current_bits`).
            With ``first_last="fixed"`` the first layer (weight and input) and the last layer (weight) are
            ``FixedQuantizer``s at ``first_last_bits``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node

from mpqc import ops
from mpqc.budgets import LayerBits
from mpqc.config import RECOMPUTE_AUTO_PARAMS, BitRange, QuantizerConfig
from mpqc.errors import MpqcError
from mpqc.layers import ACTIVATION_META, LAYER_META, PRODUCT_META, ActivationInfo, CostItem, LayerInfo, ProductInfo
from mpqc.ops.constants import is_constant
from mpqc.ops.kernel_bridge import quantizer_node_behind
from mpqc.passes.analyze_layers import layer_nodes
from mpqc.qmodules import quantized_version
from mpqc.quantizers import FixedQuantizer, QuantMethod, Quantizer
from mpqc.quantizers.base import positive_levels
from mpqc.quantizers.calibration import percentile_range, weight_clip

#: The widest code an operand quantizer may learn unless its readers' ``OpDef.operand_bits`` allow more (lookup
#: tables index 2^b entries; LayerNorm's int64 kernel takes 16), and the widest that starts at the percentile range.
MAX_OPERAND_BITS = 8

#: ``node.meta[INPUT_QUANTIZER_META]`` on a quantized layer node: qualified name of its input's quantizer module.
INPUT_QUANTIZER_META = "mpqc.input_quantizer"
#: ``node.meta[INPUT_CHANNELS_META]`` on a layer node reading the output channels of a layer whose weight quantizer
#: may prune them (set by ``mark_prunable``): the qualified name of that producing layer.
INPUT_CHANNELS_META = "mpqc.input_channels_from"
#: Root submodule (an ``nn.ModuleDict``) holding the activation quantizers.
ACT_QUANTIZERS = "act_quantizers"

@dataclass
class QuantizedLayer:
    """A quantized layer as the search, budgets and freezing see it."""

    info: LayerInfo
    module: nn.Module  # a mpqc.qmodules layer: .weight, .weight_quantizer
    input_quantizer: Quantizer
    input_quantizer_name: str
    input_channels_from: nn.Module | None = None  # the layer producing this one's input channels, if prunable

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def weight_quantizer(self) -> Quantizer:
        return self.module.weight_quantizer

    def input_kept(self) -> Tensor | float:
        """The share of this layer's input channels still there: the mean channel gate of the layer producing
        them where its weight quantizer prunes channels (differentiable), else 1."""
        producer = self.input_channels_from
        gate = None if producer is None else producer.weight_quantizer.channel_gate()
        return 1.0 if gate is None else gate.mean()


def quantized_layers(gm: GraphModule) -> list[QuantizedLayer]:
    """The quantized layers of a graph that went through :func:`insert_quantizers`, in graph order."""
    result = []
    for node in layer_nodes(gm):
        if INPUT_QUANTIZER_META not in node.meta:
            raise MpqcError(f"layer {node.target!r} has no input quantizer; run insert_quantizers first")
        name = node.meta[INPUT_QUANTIZER_META]
        producer = node.meta.get(INPUT_CHANNELS_META)
        result.append(QuantizedLayer(node.meta[LAYER_META], gm.get_submodule(node.target), gm.get_submodule(name), name,
                                     None if producer is None else gm.get_submodule(producer)))
    return result


@dataclass
class QuantizedActivation:
    """An activation quantizer that feeds no layer, as the budgets and freezing see it."""

    info: ActivationInfo
    quantizer: Quantizer

    @property
    def name(self) -> str:
        return self.info.name


def quantized_activations(gm: GraphModule) -> list[QuantizedActivation]:
    """The activation quantizers of ``gm`` that feed no layer (lookup-table inputs, product factors), graph order."""
    return [QuantizedActivation(node.meta[ACTIVATION_META], gm.get_submodule(node.target))
            for node in gm.graph.nodes if ACTIVATION_META in node.meta]


def searched_quantizers(gm: GraphModule) -> list[tuple[str, Quantizer]]:
    """Every quantizer whose bit-width the budgets read, in graph order: per layer its weight quantizer (named
    ``<layer>.weight``) then its input quantizer (qualified name; a shared input once per layer reading it), then the
    activation quantizers that feed no layer."""
    quantizers = [(name, q) for layer in quantized_layers(gm)
                  for name, q in ((f"{layer.name}.weight", layer.weight_quantizer),
                                  (layer.input_quantizer_name, layer.input_quantizer))]
    return quantizers + [(activation.name, activation.quantizer) for activation in quantized_activations(gm)]


def cost_items(gm: GraphModule, layers: list[LayerInfo] | None = None) -> list[CostItem]:
    """What a budget's cost reads: ``layers`` (default: the quantized layers' infos), then the quantized activations
    that feed no layer and the products of two activations."""
    infos = [layer.info for layer in quantized_layers(gm)] if layers is None else list(layers)
    return (infos + [activation.info for activation in quantized_activations(gm)]
            + [node.meta[PRODUCT_META] for node in gm.graph.nodes if PRODUCT_META in node.meta])


def current_bits(layers: list[QuantizedLayer],
                 activations: list[QuantizedActivation] = ()) -> dict[str, LayerBits | Tensor]:
    """What budgets read, as differentiable tensors: each layer's (weight, input activation) bit-widths and kept
    share of input channels by layer name, and the bit-width of each of ``activations`` by its quantizer's
    qualified name."""
    bits: dict[str, LayerBits | Tensor] = {
        layer.name: LayerBits(layer.weight_quantizer.bits(), layer.input_quantizer.bits(), layer.input_kept())
        for layer in layers}
    bits.update({activation.name: activation.quantizer.bits() for activation in activations})
    return bits


def smallest_bits(layers: list[QuantizedLayer],
                  activations: list[QuantizedActivation] = ()) -> dict[str, LayerBits | Tensor]:
    """The smallest bit-widths the search space allows (keys as :func:`current_bits`): learnable quantizers at
    their minimum, fixed ones as fixed."""

    def smallest(q: Quantizer) -> Tensor:
        return torch.tensor(float(q.bit_range.min_bits if q.learnable_bits else q.fixed_bits))

    bits: dict[str, LayerBits | Tensor] = {
        layer.name: LayerBits(smallest(layer.weight_quantizer), smallest(layer.input_quantizer)) for layer in layers}
    bits.update({activation.name: smallest(activation.quantizer) for activation in activations})
    return bits


def insert_quantizers(
    gm: GraphModule, method: QuantMethod, config: QuantizerConfig, calibration_inputs: tuple
) -> GraphModule:
    tables = _embedding_tables(gm)
    layers = [node for node in layer_nodes(gm) if node not in tables]
    if not layers:
        raise MpqcError("the model has no conv1d/conv2d/linear layer to quantize")
    sources = {node: node.args[0] for node in layers}  # read before rewiring: shared inputs get one quantizer
    for node, source in sources.items():
        if not isinstance(source, Node):
            raise MpqcError(f"layer input is not a graph value: {node.format_node()}")
    operands = _operand_points(gm, set(sources.values()))
    residual_ends = _requantize_points(gm, layers, set(sources.values()) | set(operands))
    stats = _calibrate(gm, set(sources.values()) | set(operands) | set(residual_ends), calibration_inputs,
                       config.activation_percentile)
    gm.add_submodule(ACT_QUANTIZERS, nn.ModuleDict())
    _quantize_tables(gm, tables, method, config)
    quantizer_of: dict[Node, str] = {}
    first, last = layers[0], layers[-1]
    fixed = config.first_last == "fixed"

    def signed_and_range(source: Node, bits: int = MAX_OPERAND_BITS) -> tuple[bool, float]:
        """Sign and starting range: the calibration percentile's, but the maximum for codes wider than 8 bits
        (they have the levels to hold the outliers: BERT's few massive activations at a handful of tokens, which
        a 99.99th percentile clips, are what a normalization's 16-bit input is for)."""
        low, (magnitude, positive), (largest, largest_positive) = stats[source]
        if bits > MAX_OPERAND_BITS:
            magnitude, positive = largest, largest_positive
        signed = not (ops.is_nonnegative(gm, source) or (source.op == "placeholder" and low >= 0))
        return signed, max(magnitude if signed else positive, 1e-4)

    def fixed_quantizer(source: Node, bits: int) -> FixedQuantizer:
        signed, dynamic_range = signed_and_range(source, bits)
        return FixedQuantizer(bits, signed, torch.tensor([dynamic_range / positive_levels(bits, signed)]))

    for point, widest in operands.items():  # learnable like a layer's input
        if widest > MAX_OPERAND_BITS:  # a normalization's input: from its widest (outlier channels), down to min
            bit_range, init = BitRange(min(config.activation_bits.min_bits, widest), widest), widest
        else:
            bit_range = BitRange(min(config.activation_bits.min_bits, widest),
                                 min(config.activation_bits.max_bits, widest))
            init = min(config.init_bits, widest)
        quantizer = method.activation_quantizer(*signed_and_range(point, init), init, bit_range)
        quantizer_of[point] = _quantize_tensor(gm, point, f"{point.name}_out", quantizer)
    for end in residual_ends:
        if end not in quantizer_of:
            quantizer_of[end] = _quantize_tensor(gm, end, f"{end.name}_out", fixed_quantizer(end, config.residual_bits))

    for node in layers:
        info: LayerInfo = node.meta[LAYER_META]
        source = sources[node]
        if source not in quantizer_of:
            if fixed and node is first:
                quantizer: Quantizer = fixed_quantizer(source, config.first_last_bits)
            else:
                quantizer = method.activation_quantizer(
                    *signed_and_range(source), config.init_bits, config.activation_bits
                )
            quantizer_of[source] = _quantize_tensor(gm, source, node.target.replace(".", "_"), quantizer)
        node.meta[INPUT_QUANTIZER_META] = quantizer_of[source]

        layer = gm.get_submodule(node.target)
        if fixed and node in (first, last):
            bits = config.first_last_bits
            scale = layer.weight.detach().abs().reshape(info.out_channels, -1).amax(1) / positive_levels(bits, True)
            weight_quantizer: Quantizer = FixedQuantizer(bits, True, scale, per_channel=True)
        else:
            weight_quantizer = method.weight_quantizer(layer.weight, config.weight_start_bits, config.weight_bits)
            bits = min(max(config.weight_start_bits, config.weight_bits.min_bits), config.weight_bits.max_bits)
        if config.weight_init != "max":
            weight_quantizer.init_weight_clip_(layer.weight, weight_clip(layer.weight, bits, config.weight_init))
        replace_submodule(gm, node.target, quantized_version(layer, weight_quantizer))

    _record_activations_and_products(gm, [quantizer_of[point] for point in operands], set(layers))
    _set_recompute(gm, tables + layers, config.recompute_weights)
    gm.graph.lint()
    gm.recompile()
    return gm


def _record_activations_and_products(gm: GraphModule, operand_quantizers: list[str], layers: set[Node]) -> None:
    """``ACTIVATION_META`` on the operand quantizers that feed no layer, ``PRODUCT_META`` on the products of two
    quantized activations (per-sample sizes from the shapes ``analyze_layers`` propagated)."""
    placeholders = [node.meta.get("tensor_meta") for node in gm.graph.nodes if node.op == "placeholder"]
    batch = next((meta.shape[0] for meta in placeholders if hasattr(meta, "shape") and len(meta.shape)), 1)

    def per_sample(node: Node) -> int:
        meta = node.meta.get("tensor_meta")
        if not hasattr(meta, "shape"):
            raise MpqcError(f"node {node.format_node()} has no tensor shape after shape propagation")
        return math.prod(meta.shape) // max(batch, 1)

    layer_inputs = {}  # a layer's input quantizer -> the first layer reading it (budgets key its bits by layer)
    for node in layers:
        layer_inputs.setdefault(node.meta[INPUT_QUANTIZER_META], str(node.target))
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in operand_quantizers and node.target not in layer_inputs:
            node.meta[ACTIVATION_META] = ActivationInfo(str(node.target), per_sample(node.args[0]))
    for node in gm.graph.nodes:
        op = ops.op_of(gm, node)
        factors = [] if op is None or op.is_layer else op.quantized_operands(gm, node)
        if op is not None and op.multiplies_operands and len(factors) == 2:
            a, b = (_quantizer_name_behind(gm, factor) for factor in factors)
            a, b = layer_inputs.get(a, a), layer_inputs.get(b, b)
            if a and b:
                node.meta[PRODUCT_META] = ProductInfo(node.name, op.product_macs(gm, node, per_sample(node)), a, b)


def _quantizer_name_behind(gm: GraphModule, node: Node) -> str | None:
    """The qualified name of the activation quantizer whose codes ``node`` holds (see ``quantizer_node_behind``)."""
    found = quantizer_node_behind(gm, node)
    return None if found is None else str(found.target)


def _embedding_tables(gm: GraphModule) -> list[Node]:
    """The embedding tables among the layer nodes (``analyze_layers`` records them as weight-only layers)."""
    return [node for node in layer_nodes(gm) if node.meta[LAYER_META].op == "embedding"]


def _set_recompute(gm: GraphModule, nodes: list[Node], recompute: bool | None) -> None:
    """Mark the quantized layers and tables to recompute their weight quantizer in the backward pass
    (``QuantizerConfig.recompute_weights``; ``None``: where their weights total ``RECOMPUTE_AUTO_PARAMS``)."""
    modules = [gm.get_submodule(node.target) for node in nodes]
    if recompute is None:
        recompute = sum(module.weight.numel() for module in modules) >= RECOMPUTE_AUTO_PARAMS
    for module in modules:
        module.recompute_weight = bool(recompute)


def _quantize_tables(gm: GraphModule, tables: list[Node], method: QuantMethod, config: QuantizerConfig) -> None:
    """Embedding tables (issue 15): the method's weight quantizer (one scale per row: per output channel of a
    ``[V, D]`` weight), learnable bits counted in weight memory like a layer's. Their indices are not activations:
    no quantizer in the graph; ``INPUT_QUANTIZER_META`` names a fixed quantizer no node calls (a table has no input
    elements, so budgets count nothing for it)."""
    for node in tables:
        table = gm.get_submodule(node.target)
        key = f"{node.target.replace('.', '_')}_indices"
        gm.get_submodule(ACT_QUANTIZERS)[key] = FixedQuantizer(8, False, torch.ones(1))
        node.meta[INPUT_QUANTIZER_META] = f"{ACT_QUANTIZERS}.{key}"
        weight_quantizer = method.weight_quantizer(table.weight, config.weight_start_bits, config.weight_bits)
        replace_submodule(gm, node.target, quantized_version(table, weight_quantizer))


def _quantize_tensor(gm: GraphModule, source: Node, key: str, quantizer: Quantizer) -> str:
    """Insert ``act_quantizers.<key>(source)`` right after ``source``; every user of ``source`` now reads it."""
    gm.get_submodule(ACT_QUANTIZERS)[key] = quantizer
    target = f"{ACT_QUANTIZERS}.{key}"
    with gm.graph.inserting_after(source):
        quantized = gm.graph.call_module(target, (source,))
    source.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
    return target


def _requantize_points(gm: GraphModule, layers: list[Node], quantized_sources: set[Node]) -> list[Node]:
    """Tensors that get a fixed ``residual_bits`` quantizer so the integer program never sums floats.

    * residual adds whose result (after any ReLU/clamp) is not already quantized for a following layer;
    * the input of an average pool when it would be a float value (e.g. ReLU6 output, an add), so that the pool is
      an exact integer sum (see the integer contract in ``mpqc/reference.py``).
    """
    points: list[Node] = []

    def add(node: Node) -> None:
        if node not in quantized_sources and node not in points:
            points.append(node)

    for node in gm.graph.nodes:
        if ops.op_of(gm, node) is ops.op_named("add") and _is_tensor_add(node):
            end = node
            while len(end.users) == 1 and ops.has_property(gm, next(iter(end.users)), "clamps"):
                end = next(iter(end.users))
            add(end)
        elif ops.has_property(gm, node, "averages") and isinstance(node.args[0], Node):
            if not _is_integer_valued(gm, node.args[0], set(layers) | quantized_sources):
                add(node.args[0])
    return points


def _operand_points(gm: GraphModule, layer_sources: set[Node]) -> dict[Node, int]:
    """Tensors a non-layer op needs as b-bit codes (the op registry's ``quantized_operands`` and
    ``quantized_output``), each with the widest codes its readers take (``OpDef.operand_bits``; outputs
    ``MAX_OPERAND_BITS``): a lookup table's input and output, the factors of a product, a normalization's input.
    Those already codes (a layer's quantized input, seen through ops that keep integers) get none; a layer's int32
    accumulator is not codes, so it gets one. A constant computation (``mpqc.ops.constants.is_constant``: Swin V2's
    ``16 * sigmoid(mlp(coordinates))`` position bias) gets none: the program holds its value."""
    codes = set(layer_sources)
    points: dict[Node, int] = {}

    def add(node: Node, widest: int) -> None:
        if node in points:
            points[node] = min(points[node], widest)
        elif not _is_integer_valued(gm, node, codes):
            codes.add(node)
            points[node] = widest

    for node in gm.graph.nodes:
        op = ops.op_of(gm, node)
        if op is None or op.is_layer or is_constant(gm, node):
            continue
        for operand in op.quantized_operands(gm, node):
            add(operand, op.operand_bits)
        if op.quantized_output:
            add(node, MAX_OPERAND_BITS)
    return points


def _is_tensor_add(node: Node) -> bool:
    """``a + b`` of two graph tensors (no scalar, no alpha)."""
    return len(node.args) == 2 and all(isinstance(a, Node) for a in node.args) and not node.kwargs


def _is_integer_valued(gm: GraphModule, node: Node, integer_sources: set[Node]) -> bool:
    """Whether the integer program holds ``node`` as integers: a layer output or a quantized tensor, seen through
    the ops that keep integers (ReLU, max pooling, reshapes: ``keeps_integers`` in the op registry)."""
    while node not in integer_sources:
        if not ops.has_property(gm, node, "keeps_integers") or not node.args or not isinstance(node.args[0], Node):
            return False
        node = node.args[0]
    return True


def replace_submodule(gm: GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, child, module)


def _calibrate(gm: GraphModule, nodes: set[Node], inputs: tuple, percentile: float
               ) -> dict[Node, tuple[float, tuple[float, float], tuple[float, float]]]:
    """``(min, (magnitude, positive part) at the percentile, (magnitude, positive part) at their maximum)`` of each
    node's value over one forward pass of ``inputs``."""
    stats: dict[Node, tuple[float, tuple[float, float], tuple[float, float]]] = {}

    class Recorder(Interpreter):
        def run_node(self, n: Node):
            value = super().run_node(n)
            if n in nodes:
                if not isinstance(value, Tensor):
                    raise MpqcError(f"layer input is not a tensor: {n.format_node()}")
                stats[n] = (float(value.min()),
                            (percentile_range(value, percentile, signed=True),
                             percentile_range(value, percentile, signed=False)),
                            (percentile_range(value, 100.0, signed=True), percentile_range(value, 100.0, signed=False)))
            return value

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return stats
