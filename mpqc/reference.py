"""The integer contract: a frozen model as an integer program, and its reference interpreter.

A frozen graph (every quantizer a ``FixedQuantizer``) is described by an :class:`IntegerProgram`: a list of
nodes in topological order, each with an op name, its inputs, JSON-able attributes and integer/scale tensors.
It is what ``CompiledModel.save`` writes (``program.json`` + ``program.pt``) and what targets lower.
This module is the one definition of its semantics. Values are either *integer* (an int64 tensor ``q`` with a
float64 scale broadcastable to it, meaning ``q * scale``) or *float* (fp32).

``quantize`` (an activation quantizer, ``bits``, ``signed``, scale ``s_out``)
    ``q = clamp(round_half_even(y), qmin, qmax)`` stored in int8/uint8 (any b <= 8), where ``y`` is the input
    expressed in units of ``s_out``, computed in fp32 as follows (the *requantisation region*):
    * integer input ``(q_in, s_in)``: ``y = fp32(q_in) * M`` with the per-channel multiplier
      ``M = fp32(float64(s_in) / float64(s_out))``;
    * ``add(a, b)``: ``y = y(a) + y(b)``; ``relu``: ``max(y, 0)``; ``clamp(lo, hi)``:
      ``min(max(y, fp32(lo / s_out)), fp32(hi / s_out))``; ``max_pool2d`` and ``flatten`` apply to ``y``;
    * any other float input ``x``: ``y = x * fp32(1 / s_out)``.
``conv1d`` / ``conv2d`` / ``linear``
    input: an 8-bit-storage integer from a ``quantize`` node with a per-tensor scale ``s_a``; weight ``w`` integer in
    its b-bit signed range with per-output-channel scale ``s_w``; bias ``round_half_even(b / (s_a * s_w))`` in
    int32. Output: the exact int32 accumulator ``acc = sum(q_a * w) + bias`` with scale ``s_a * s_w[c]``.
``relu``, ``max_pool2d``, ``flatten`` on an integer value stay integer (exact); ``global_avg_pool`` and
    ``avg_pool2d`` without padding become the integer *sum* with scale ``s / window``.
``add``, ``clamp``, ``cat`` and the rest on integers dequantize: ``fp32(q) * fp32(s)``, then fp32 arithmetic.
``output`` dequantizes the same way.

Targets must reproduce this bit for bit; the fake-quant graph agrees with it up to fp32 rounding (a 1-LSB flip
at a rounding tie, and the bias rounded here but not there).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from mpqc import ops
from mpqc.errors import CheckpointError, MpqcError, UnsupportedOpError
from mpqc.qmodules import QuantConv1d, QuantConv2d, QuantLinear
from mpqc.quantizers.base import FixedQuantizer, Quantizer, integer_range

PROGRAM_FORMAT = "mpqc-integer-program/1"


@dataclass
class IntNode:
    """One step of an integer program."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class IntValue:
    """An integer value of the program: ``q * scale``."""

    q: Tensor  # int64
    scale: Tensor  # float64, broadcastable to q


class IntegerProgram:
    """A frozen model in the integer contract; ``run`` is the reference implementation."""

    def __init__(self, nodes: list[IntNode], outputs: list[str]) -> None:
        self.nodes = nodes
        self.outputs = outputs
        self._by_name = {node.name: node for node in nodes}

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_graph(cls, gm: GraphModule) -> "IntegerProgram":
        """Describe a frozen graph; raises one :class:`UnsupportedOpError` listing every node it cannot express."""
        nodes: list[IntNode] = []
        unsupported: list[str] = []
        outputs: list[str] = []
        for node in gm.graph.nodes:
            if node.op == "output":  # a tensor, or a tuple/list/dict of them: the program's outputs in order
                outputs = [arg.name for arg in pytree.tree_leaves(node.args[0]) if isinstance(arg, Node)]
            elif not _is_bookkeeping(node):
                try:
                    nodes.append(_describe(gm, node))
                except _Unsupported as reason:
                    unsupported.append(f"{node.format_node()}  ({reason})")
        _raise_unsupported(unsupported)
        program = cls(nodes, outputs)
        program._check_layer_inputs()
        return program

    @classmethod
    def of(cls, model: Any) -> "IntegerProgram":
        """The integer program of what a target is handed: an ``IntegerProgram``, a ``CompiledModel``, or a frozen
        ``GraphModule``. A graph that was not frozen, or anything else, is refused with a clear error."""
        if isinstance(model, IntegerProgram):
            return model
        program = getattr(model, "program", None)
        if isinstance(program, IntegerProgram):
            return program
        if isinstance(model, GraphModule):
            learnable = [name for name, m in model.named_modules() if isinstance(m, Quantizer) and m.learnable_bits]
            if learnable:
                raise MpqcError(
                    f"the model was not frozen ({len(learnable)} quantizer(s) still learn their bits, e.g. "
                    f"{learnable[0]!r}): lower the result of mpqc.compile, or run mpqc.passes.freeze.freeze first"
                )
            return cls.from_graph(model)
        raise MpqcError(
            f"expected an IntegerProgram, a CompiledModel or a frozen GraphModule, got {type(model).__name__}"
        )

    @staticmethod
    def check_supported(gm: GraphModule) -> None:
        """Before any training: raise one :class:`UnsupportedOpError` listing every node of a quantized (not yet
        frozen) graph that the integer program will not be able to express."""
        unsupported = []
        for node in gm.graph.nodes:
            if node.op == "output" or _is_bookkeeping(node):
                continue
            try:
                _describe(gm, node, frozen=False)
            except _Unsupported as reason:
                unsupported.append(f"{node.format_node()}  ({reason})")
        _raise_unsupported(unsupported)

    def _check_layer_inputs(self) -> None:
        for node in self.nodes:
            if node.op in LAYER_OPS and self._by_name[node.inputs[0]].op != "quantize":
                raise MpqcError(f"layer {node.name!r} reads {node.inputs[0]!r}, which is not quantized")

    @property
    def input_names(self) -> list[str]:
        """The program's inputs in order, named as the captured model's ``forward`` names them."""
        return [node.name for node in self.nodes if node.op == "input"]

    # ----------------------------------------------------------------------------------------- running
    @torch.no_grad()
    def run(self, *inputs: Tensor, **named: Tensor) -> Tensor | tuple[Tensor, ...]:
        """The program's outputs (fp32, dequantized) for ``inputs``, given in order or by name (``input_names``)."""
        env = self.run_all(*inputs, **named)
        results = tuple(_dequantize(env[name]) for name in self.outputs)
        return results[0] if len(results) == 1 else results

    @torch.no_grad()
    def run_all(self, *inputs: Tensor, **named: Tensor) -> dict[str, Tensor | IntValue]:
        """Every node's value: ``IntValue(q, scale)`` for integer values, fp32 tensors otherwise."""
        placeholders = [node for node in self.nodes if node.op == "input"]
        if named:
            unknown = sorted(set(named) - set(self.input_names))
            if unknown:
                raise MpqcError(f"the program has no input named {unknown[0]!r} (its inputs: "
                                f"{', '.join(self.input_names)})")
            inputs = inputs + tuple(named[name] for name in self.input_names[len(inputs):] if name in named)
        if len(inputs) != len(placeholders):
            raise MpqcError(f"the program takes {len(placeholders)} input(s), got {len(inputs)}")
        env: dict[str, Tensor | IntValue] = {node.name: x.float() for node, x in zip(placeholders, inputs)}
        for node in self.nodes:
            if node.op != "input":
                env[node.name] = self.step(node, env)
        return env

    def step(self, node: IntNode, env: dict[str, Tensor | IntValue]) -> Tensor | IntValue:
        """The value of one node given the values of its inputs in ``env`` (targets use it to check step by
        step)."""
        return _EVAL[node.op](self, node, env)

    def quantize_input(self, node: IntNode, env: dict) -> IntValue:
        s_out = float(node.attrs["scale"])
        y = self._scaled(node.inputs[0], s_out, env)
        qmin, qmax = integer_range(node.attrs["bits"], node.attrs["signed"])
        q = torch.clamp(torch.round(y), qmin, qmax).to(torch.int64)
        return IntValue(q, torch.tensor(s_out, dtype=torch.float64))

    def _scaled(self, name: str, s_out: float, env: dict) -> Tensor:
        """The value of ``name`` in units of ``s_out``, in fp32 (the requantisation region of the contract)."""
        value, node = env[name], self._by_name[name]
        if isinstance(value, IntValue):
            multiplier = (value.scale / s_out).to(torch.float32)
            return value.q.to(torch.float32) * multiplier
        if node.op == "add":
            return self._scaled(node.inputs[0], s_out, env) + self._scaled(node.inputs[1], s_out, env)
        if node.op == "relu":
            return torch.relu(self._scaled(node.inputs[0], s_out, env))
        if node.op == "clamp":
            low = torch.tensor(node.attrs["min"] / s_out, dtype=torch.float32)
            high = torch.tensor(node.attrs["max"] / s_out, dtype=torch.float32)
            return torch.minimum(torch.maximum(self._scaled(node.inputs[0], s_out, env), low), high)
        if node.op == "max_pool2d":
            return _max_pool(self._scaled(node.inputs[0], s_out, env), node.attrs)
        if node.op == "flatten":
            return torch.flatten(self._scaled(node.inputs[0], s_out, env), node.attrs["start_dim"])
        return value * torch.tensor(1.0 / s_out, dtype=torch.float32)

    # ----------------------------------------------------------------------------------------- facts
    def layers(self) -> list[IntNode]:
        return [node for node in self.nodes if node.op in LAYER_OPS]

    def layer_bits(self) -> dict[str, tuple[int, int]]:
        """Per layer (module name): (weight bits, input activation bits)."""
        return {
            node.attrs["module"]: (node.attrs["weight_bits"], self._by_name[node.inputs[0]].attrs["bits"])
            for node in self.layers()
        }

    # ----------------------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> None:
        """Write ``program.json`` (structure) and ``program.pt`` (tensors, loadable with weights_only=True)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        structure = {
            "format": PROGRAM_FORMAT,
            "outputs": self.outputs,
            "nodes": [{"name": n.name, "op": n.op, "inputs": n.inputs, "attrs": n.attrs} for n in self.nodes],
        }
        tensors = {f"{n.name}.{key}": t for n in self.nodes for key, t in n.tensors.items()}
        from mpqc.checkpoint import atomic_write_bytes, atomic_torch_save

        atomic_write_bytes(directory / "program.json", json.dumps(structure, indent=1).encode())
        atomic_torch_save(tensors, directory / "program.pt")

    @classmethod
    def load(cls, directory: str | Path) -> "IntegerProgram":
        directory = Path(directory)
        try:
            structure = json.loads((directory / "program.json").read_text())
            tensors = torch.load(directory / "program.pt", weights_only=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"cannot read the integer program in {directory}: {error}") from error
        if structure.get("format") != PROGRAM_FORMAT:
            raise CheckpointError(f"{directory / 'program.json'} is not a {PROGRAM_FORMAT} file")
        nodes = []
        for entry in structure["nodes"]:
            prefix = entry["name"] + "."
            own = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
            nodes.append(IntNode(entry["name"], entry["op"], entry["inputs"], entry["attrs"], own))
        return cls(nodes, structure["outputs"])


LAYER_OPS = ("conv1d", "conv2d", "linear")
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------- describing
class _Unsupported(Exception):
    pass


def _raise_unsupported(unsupported: list[str]) -> None:
    if unsupported:
        raise UnsupportedOpError(
            f"the integer reference cannot express {len(unsupported)} node(s):\n  " + "\n  ".join(unsupported)
        )


def _is_bookkeeping(node: Node) -> bool:
    """Nodes that compute no tensor of the model: shape queries and export's unused guard module."""
    if ops.is_call(node, ops.SHAPE_FUNCTIONS) or (node.op == "call_method" and node.target == "size"):
        return True
    return node.op == "call_module" and not node.users


def _describe(gm: GraphModule, node: Node, frozen: bool = True) -> IntNode:
    def inputs() -> list[str]:
        names = [arg.name for arg in node.all_input_nodes]
        return names

    if node.op == "placeholder":
        return IntNode(node.name, "input", [])
    if node.op == "get_attr":
        raise _Unsupported("constant tensors are not supported")
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not frozen and isinstance(module, Quantizer):
            return IntNode(node.name, "quantize", inputs())
        if isinstance(module, FixedQuantizer):
            frozen_quant = module.frozen()
            return IntNode(node.name, "quantize", inputs(), {
                "bits": frozen_quant.bits, "signed": frozen_quant.signed,
                "scale": float(frozen_quant.scale.reshape(-1)[0]),
                "module": node.target,
            })
        if isinstance(module, (QuantConv1d, QuantConv2d, QuantLinear)):
            return _describe_layer(gm, node, module) if frozen else IntNode(node.name, "layer", inputs())
        if isinstance(module, nn.ReLU):
            return IntNode(node.name, "relu", inputs())
        if isinstance(module, (nn.ReLU6, nn.Hardtanh)):
            low, high = (0.0, 6.0) if isinstance(module, nn.ReLU6) else (module.min_val, module.max_val)
            return IntNode(node.name, "clamp", inputs(), {"min": float(low), "max": float(high)})
        if isinstance(module, nn.MaxPool2d):
            return IntNode(node.name, "max_pool2d", inputs(), _pool_attrs(module.kernel_size, module.stride,
                                                                        module.padding, module.dilation,
                                                                        module.ceil_mode))
        if isinstance(module, nn.AdaptiveAvgPool2d):
            if _pair(module.output_size) != (1, 1):
                raise _Unsupported("adaptive average pooling to a size other than 1x1")
            return IntNode(node.name, "global_avg_pool", inputs())
        if isinstance(module, nn.AvgPool2d):
            attrs = _pool_attrs(module.kernel_size, module.stride, module.padding, 1, module.ceil_mode)
            if attrs["padding"] != [0, 0] or module.ceil_mode or module.divisor_override:
                raise _Unsupported("average pooling with padding, ceil_mode or divisor_override")
            return IntNode(node.name, "avg_pool2d", inputs(), attrs)
        if isinstance(module, nn.Flatten):
            if module.end_dim != -1:
                raise _Unsupported("flatten with end_dim != -1")
            return IntNode(node.name, "flatten", inputs(), {"start_dim": module.start_dim})
        if isinstance(module, (nn.Dropout, nn.Identity)):
            return IntNode(node.name, "identity", inputs())
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            raise _Unsupported("layer was not quantized")
        raise _Unsupported(f"module type {type(module).__name__}")
    if node.op == "call_function":
        args = node.args
        if ops.is_call(node, ops.RELU_FUNCTIONS):
            return IntNode(node.name, "relu", inputs())
        if ops.is_call(node, ops.RELU6_FUNCTIONS):
            return IntNode(node.name, "clamp", inputs(), {"min": 0.0, "max": 6.0})
        if ops.is_call(node, ops.HARDTANH_FUNCTIONS):
            low = node.kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            high = node.kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            return IntNode(node.name, "clamp", inputs(), {"min": float(low), "max": float(high)})
        if ops.is_tensor_add(node):
            return IntNode(node.name, "add", [a.name for a in args])
        if ops.is_call(node, ops.FLATTEN_FUNCTIONS):
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            if end != -1:
                raise _Unsupported("flatten with end_dim != -1")
            return IntNode(node.name, "flatten", inputs(), {"start_dim": start})
        if ops.is_call(node, ops.VIEW_FUNCTIONS) and _is_batch_flatten(node):
            return IntNode(node.name, "flatten", [args[0].name], {"start_dim": 1})
        if ops.is_call(node, ops.GLOBAL_AVG_POOL_FUNCTIONS) and _pair(args[1]) == (1, 1):
            return IntNode(node.name, "global_avg_pool", inputs())
        if ops.is_call(node, ops.MAX_POOL_FUNCTIONS):
            kernel = args[1]
            stride = args[2] if len(args) > 2 and args[2] else kernel
            padding = args[3] if len(args) > 3 else 0
            dilation = args[4] if len(args) > 4 else 1
            ceil_mode = args[5] if len(args) > 5 else False
            return IntNode(node.name, "max_pool2d", [args[0].name],
                           _pool_attrs(kernel, stride, padding, dilation, ceil_mode))
        if ops.is_call(node, ops.CAT_FUNCTIONS) and isinstance(args[0], (list, tuple)):
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return IntNode(node.name, "cat", [a.name for a in args[0]], {"dim": dim})
        raise _Unsupported(f"function {getattr(node.target, '__name__', node.target)}")
    if node.op == "call_method":
        if node.target == "relu":
            return IntNode(node.name, "relu", inputs())
        if node.target in ("view", "reshape", "flatten") and _is_batch_flatten(node):
            return IntNode(node.name, "flatten", inputs()[:1], {"start_dim": 1})
        raise _Unsupported(f"method .{node.target}()")
    raise _Unsupported(f"node kind {node.op}")


def _describe_layer(gm: GraphModule, node: Node, module: nn.Module) -> IntNode:
    source = node.args[0]
    quantizer = gm.get_submodule(source.target) if source.op == "call_module" else None
    if not isinstance(quantizer, FixedQuantizer) or not isinstance(module.weight_quantizer, FixedQuantizer):
        raise _Unsupported("layer is not frozen: freeze the graph before building the integer program")
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise _Unsupported(f"padding_mode={module.padding_mode!r}")
    weight_q = module.weight_quantizer.frozen()
    input_scale = float(quantizer.frozen().scale.reshape(-1)[0])
    weight_int = weight_q.quantize(module.weight.detach())
    weight_scale = weight_q.scale.reshape(-1).to(torch.float32)
    if weight_scale.numel() == 1:
        weight_scale = weight_scale.expand(weight_int.shape[0]).clone()
    acc_scale = input_scale * weight_scale.double()
    bias = module.bias.detach().double() if module.bias is not None else torch.zeros(weight_int.shape[0], dtype=torch.float64)
    bias_steps = torch.round(bias / acc_scale)
    if bool((bias_steps.abs() > _INT32_MAX).any()):
        raise MpqcError(
            f"layer {node.target!r}: its bias needs {float(bias_steps.abs().max()):.3g} accumulator steps "
            f"(s_in * s_w), more than int32 holds; the input quantizer's range collapsed to {input_scale:.3g}"
        )
    bias_int = bias_steps.to(torch.int32)
    storage = torch.int8 if weight_q.bits <= 8 else torch.int16
    attrs: dict[str, Any] = {"module": node.target, "weight_bits": weight_q.bits}
    if isinstance(module, QuantLinear):
        op = "linear"
    else:
        op = "conv2d" if isinstance(module, QuantConv2d) else "conv1d"
        if isinstance(module.padding, str):
            raise _Unsupported(f"string padding {module.padding!r}")
        attrs.update(stride=list(module.stride), padding=list(module.padding), dilation=list(module.dilation),
                     groups=module.groups)
    return IntNode(node.name, op, [source.name], attrs, {
        "weight": weight_int.to(storage), "weight_scale": weight_scale, "bias": bias_int,
    })


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _pool_attrs(kernel, stride, padding, dilation, ceil_mode) -> dict:
    return {"kernel": list(_pair(kernel)), "stride": list(_pair(stride if stride is not None else kernel)),
            "padding": list(_pair(padding)), "dilation": list(_pair(dilation)), "ceil_mode": bool(ceil_mode)}


def _is_batch_flatten(node: Node) -> bool:
    """``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x.flatten(1)`` or ATen ``view(x, [s0, -1])``."""
    if node.target == "flatten":
        return tuple(node.args[1:]) in ((1,), (1, -1)) or node.kwargs.get("start_dim") == 1
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], Node)


# --------------------------------------------------------------------------------------------- evaluating
def _dequantize(value: Tensor | IntValue) -> Tensor:
    if isinstance(value, IntValue):
        return value.q.to(torch.float32) * value.scale.to(torch.float32)
    return value


def _channel_scale(scale: Tensor, ndim: int, channel_dim: int = 1) -> Tensor:
    """Per-channel values shaped to broadcast along ``channel_dim`` of a rank-``ndim`` tensor."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return scale.reshape(shape)


_FP32_EXACT = 2**24  # every integer of smaller magnitude is an fp32 value, and so is every partial sum below it


def _largest_magnitude(values: Tensor) -> int:
    """``max |values|`` (0 for an empty tensor), without an ``abs`` copy."""
    if not values.numel():
        return 0
    low, high = torch.aminmax(values)
    return max(-int(low), int(high))


def integer_layer_sum(op: str, q: Tensor, weight: Tensor, attrs: dict) -> Tensor:
    """``sum(q * w)`` of a ``conv1d``/``conv2d``/``linear`` layer on integer tensors, exactly, as float values.

    Computed in fp32 where no partial sum can leave the integers fp32 holds exactly (``max|q| * max|w| * fan_in <
    2**24``, true of most layers at <= 6 bits), else in float64 (exact below 2**53; PyTorch's float64 convolution
    is several times slower). Either way the sums are the exact integers, whatever the summation order."""
    bound = _largest_magnitude(q) * _largest_magnitude(weight) * weight[0].numel()
    dtype = torch.float32 if bound < _FP32_EXACT else torch.float64
    q, w = q.to(dtype), weight.to(dtype)
    if op == "linear":
        return F.linear(q, w)
    conv = F.conv2d if op == "conv2d" else F.conv1d
    return conv(q, w, None, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])


def _eval_layer(program: IntegerProgram, node: IntNode, env: dict) -> IntValue:
    x: IntValue = env[node.inputs[0]]
    acc = integer_layer_sum(node.op, x.q, node.tensors["weight"], node.attrs)
    channel_dim = -1 if node.op == "linear" else 1  # a linear layer's output channels are its last dimension
    acc = torch.round(acc).to(torch.int64) + _channel_scale(node.tensors["bias"].to(torch.int64), acc.dim(),
                                                           channel_dim)
    if _largest_magnitude(acc) > _INT32_MAX:
        raise MpqcError(f"layer {node.attrs['module']!r}: the accumulator reached {_largest_magnitude(acc)}, beyond the "
                        f"int32 range the integer contract guarantees")
    scale = x.scale * node.tensors["weight_scale"].to(torch.float64)
    return IntValue(acc, _channel_scale(scale, acc.dim(), channel_dim))


def _max_pool(x: Tensor, a: dict) -> Tensor:
    return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


def _eval_max_pool(program, node, env):
    x = env[node.inputs[0]]
    if isinstance(x, IntValue):
        return IntValue(torch.round(_max_pool(x.q.to(torch.float64), node.attrs)).to(torch.int64), x.scale)
    return _max_pool(x, node.attrs)


def _eval_relu(program, node, env):
    x = env[node.inputs[0]]
    return IntValue(x.q.clamp_min(0), x.scale) if isinstance(x, IntValue) else torch.relu(x)


def _eval_flatten(program, node, env):
    x, start = env[node.inputs[0]], node.attrs["start_dim"]
    if isinstance(x, IntValue):
        scale = x.scale.expand(1, *x.q.shape[1:]) if x.scale.dim() == x.q.dim() else x.scale
        return IntValue(torch.flatten(x.q, start), torch.flatten(scale, start) if scale.dim() else scale)
    return torch.flatten(x, start)


def _eval_global_avg_pool(program, node, env):
    x = env[node.inputs[0]]
    if isinstance(x, IntValue):
        window = x.q.shape[-1] * x.q.shape[-2]
        return IntValue(x.q.sum(dim=(-2, -1), keepdim=True), x.scale / window)
    return F.adaptive_avg_pool2d(x, 1)


def _eval_avg_pool(program, node, env):
    x, a = env[node.inputs[0]], node.attrs
    if isinstance(x, IntValue):
        window = a["kernel"][0] * a["kernel"][1]
        summed = F.avg_pool2d(x.q.to(torch.float64), a["kernel"], a["stride"]) * window
        return IntValue(torch.round(summed).to(torch.int64), x.scale / window)
    return F.avg_pool2d(x, a["kernel"], a["stride"])


def _eval_clamp(program, node, env):
    return torch.clamp(_dequantize(env[node.inputs[0]]), node.attrs["min"], node.attrs["max"])


_EVAL = {
    "quantize": lambda program, node, env: program.quantize_input(node, env),
    "conv1d": _eval_layer,
    "conv2d": _eval_layer,
    "linear": _eval_layer,
    "relu": _eval_relu,
    "clamp": _eval_clamp,
    "max_pool2d": _eval_max_pool,
    "global_avg_pool": _eval_global_avg_pool,
    "avg_pool2d": _eval_avg_pool,
    "flatten": _eval_flatten,
    "identity": lambda program, node, env: env[node.inputs[0]],
    "add": lambda program, node, env: _dequantize(env[node.inputs[0]]) + _dequantize(env[node.inputs[1]]),
    "cat": lambda program, node, env: torch.cat([_dequantize(env[n]) for n in node.inputs], node.attrs["dim"]),
}
