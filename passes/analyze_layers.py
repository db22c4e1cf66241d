"""Per-layer facts (parameters, MACs, activation sizes) for every quantizable layer, per one input sample.

An analysis, not a transform: it runs ``torch.fx.passes.shape_prop.ShapeProp`` on the example inputs (which
refreshes ``node.meta["tensor_meta"]`` on every node) and writes a :class:`mpqc.layers.LayerInfo` into
``node.meta[LAYER_META]`` of every conv1d/conv2d/linear ``call_module`` node, and of every embedding table (a
weight-only layer: its weight counts in weight memory, it has no MACs and no quantized input).

Per sample: dim 0 of the first tensor example input is the batch size B. A layer's per-sample activation shape is
its shape without dim 0 when dim 0 is B, and ``(dim0 // B, *rest)`` when the model folded something into the batch
(e.g. ``(B*T, C, H, W)``); element counts and MACs are divided by B either way.

MACs count multiply-accumulates of the weights only (no bias, no activation):
conv: ``output_elements * in_channels / groups * prod(kernel_size)``; linear: ``output_elements * in_features``.
``torch.utils.flop_counter.FlopCounterMode`` reports 2 x MACs for these (tested).
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from mpqc.errors import ExampleInputError, MpqcError
from mpqc.layers import LAYER_META, LayerInfo
from mpqc.ops import op_named

#: Quantizable layer types and their op names (the op registry's layer family, and embedding tables: weight-only
#: layers); subclasses (e.g. quantized versions) count as their base type.
LAYER_OPS: dict[type[nn.Module], str] = {**op_named("conv2d").layer_types, **op_named("embedding").layer_types}


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``call_module`` nodes of conv1d/conv2d/linear modules (or subclasses) and embedding tables, in graph
    order; a conv/linear applied to a constant (Swin V2's position-bias MLP on its coordinate table) is not a layer
    but part of a constant computation (``mpqc.ops.is_constant``: the program holds its value); an embedding
    table is a layer even at fixed indices (BERT's position ids)."""
    from mpqc.ops.constants import is_constant

    return [
        node
        for node in gm.graph.nodes
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), tuple(LAYER_OPS))
        and not is_constant(gm, node)
    ]


def analyze_layers(gm: fx.GraphModule, example_inputs: tuple) -> list[LayerInfo]:
    """Shape-propagate ``example_inputs`` and return (and store in node meta) a LayerInfo per layer node."""
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as error:
        raise ExampleInputError(
            f"the example inputs do not run through the graph of {type(gm).__name__}: {error}"
        ) from error
    batch = _batch_size(example_inputs)
    layers = []
    for node in layer_nodes(gm):
        info = _layer_info(node, gm.get_submodule(node.target), batch)
        node.meta[LAYER_META] = info
        layers.append(info)
    return layers


def _batch_size(example_inputs: tuple) -> int:
    return next((x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)


def _layer_info(node: fx.Node, module: nn.Module, batch: int) -> LayerInfo:
    op = next(name for layer_type, name in LAYER_OPS.items() if isinstance(module, layer_type))
    if op == "embedding":
        return _embedding_info(node, module, batch)
    input_shape = _per_sample_shape(node, node.args[0] if node.args else None, batch)
    output_shape = _per_sample_shape(node, node, batch)
    output_elements = math.prod(output_shape)
    if op == "linear":
        macs = output_elements * module.in_features
        out_channels = module.out_features
    else:
        macs = output_elements * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        out_channels = module.out_channels
    return LayerInfo(
        name=str(node.target),
        op=op,
        weight_shape=tuple(module.weight.shape),
        params=module.weight.numel(),
        bias_params=module.bias.numel() if module.bias is not None else 0,
        out_channels=out_channels,
        macs=macs,
        input_shape=input_shape,
        output_shape=output_shape,
        input_elements=math.prod(input_shape),
        output_elements=output_elements,
    )


def _embedding_info(node: fx.Node, module: nn.Module, batch: int) -> LayerInfo:
    """An embedding table: a weight-only layer (``params = V * D``, one output channel per row, no MACs and no
    quantized input: its indices are not activations). Indices shared by the batch (position ids, ``[1, S]``) give
    an output shared by the batch: its per-sample shape drops that dim."""
    meta = node.meta.get("tensor_meta")
    if not hasattr(meta, "shape"):
        raise MpqcError(f"embedding {node.format_node()} has no tensor shape after shape propagation")
    shape = tuple(meta.shape)
    output_shape = shape[1:] if shape and shape[0] in (1, batch) else shape
    return LayerInfo(name=str(node.target), op="embedding", weight_shape=tuple(module.weight.shape),
                     params=module.weight.numel(), bias_params=0, out_channels=module.num_embeddings, macs=0,
                     input_shape=(), output_shape=output_shape, input_elements=0,
                     output_elements=math.prod(output_shape))


def _per_sample_shape(layer: fx.Node, value: object, batch: int) -> tuple[int, ...]:
    """The shape of ``value`` (a node) for one sample; MpqcError naming ``layer`` if it has no single shape."""
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    if not hasattr(meta, "shape"):
        which = "output" if value is layer else "input"
        raise MpqcError(f"layer {layer.format_node()} has no tensor shape for its {which} after shape propagation")
    shape = tuple(meta.shape)
    if not shape or shape[0] % batch:
        raise MpqcError(
            f"layer {layer.format_node()} has shape {shape}, whose first dimension is not a multiple of the "
            f"batch size {batch}"
        )
    if shape[0] == batch:
        return shape[1:]
    return (shape[0] // batch, *shape[1:])
