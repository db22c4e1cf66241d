"""The integer contract: a frozen model as an integer program, and its reference interpreter.

A frozen graph (every quantizer a ``FixedQuantizer``) is described by an :class:`IntegerProgram`: a list of
nodes in topological order, each with an op name, its inputs, JSON-able attributes and integer/scale tensors.
It is what ``CompiledModel.save`` writes (``program.json`` + ``program.pt``) and what targets lower.
This module is the one definition of its semantics. Values are either *integer* (an int64 tensor ``q`` with a
float64 scale broadcastable to it, meaning ``q * scale``) or *float* (fp32).

``quantize`` (an activation quantizer, ``bits``, ``signed``, scale ``s_out``): the requantisation node
    ``q = clamp(round_half_even(y), qmin, qmax)`` stored in int8/uint8 (any b <= 8), where ``y`` is its
    *requantisation region* (``attrs["region"]``, built by ``passes/to_integer_program.py``) in units of ``s_out``,
    computed in fp32 as follows:
    * a leaf holding an integer ``(q_in, s_in)``: ``y = fp32(q_in) * M`` with the per-channel multiplier
      ``M = fp32(float64(s_in) / float64(s_out))``; a float leaf ``x``: ``y = x * fp32(1 / s_out)``;
    * the steps, in order: ``add(a, b)``: ``y = y(a) + y(b)``; ``relu``: ``max(y, 0)``; ``clamp(lo, hi)``:
      ``min(max(y, fp32(lo / s_out)), fp32(hi / s_out))``; pools and data movement apply to ``y``.
``conv1d`` / ``conv2d`` / ``linear``
    input: an 8-bit-storage integer from a ``quantize`` node with a per-tensor scale ``s_a``; weight ``w`` integer in
    its b-bit signed range with per-output-channel scale ``s_w``; bias ``round_half_even(b / (s_a * s_w))`` in
    int32. Output: the exact int32 accumulator ``acc = sum(q_a * w) + bias`` with scale ``s_a * s_w[c]``.
``relu``, max pools and data movement (reshape, permute, split, slicing, ``cat``/``stack`` of integer values, zero
    padding: ``mpqc/ops/movement.py``) on an integer value stay integer (exact; the scale moves with the codes,
    per channel where the inputs' scales differ); average pools become the integer *sum* with scale ``s / count``.
``add``, ``clamp`` and the rest on integers dequantize: ``fp32(q) * fp32(s)``, then fp32 arithmetic.
``output`` dequantizes the same way.

Each op's semantics is written once, in its family in ``mpqc/ops/`` (``OpDef.evaluate``, ``requantize_step``);
this module runs them. Program files: ``mpqc-integer-program/2`` (regions stored); ``/1`` files load too, their
regions rebuilt (the same pass).

Targets must reproduce this bit for bit; the fake-quant graph agrees with it up to fp32 rounding (a 1-LSB flip
at a rounding tie, and the bias rounded here but not there).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from mpqc import ops
from mpqc.errors import CheckpointError, MpqcError
from mpqc.ops import IntNode, IntValue, dequantize
from mpqc.ops.layers import integer_layer_sum  # noqa: F401  (part of the contract's public face)
from mpqc.quantizers.base import Quantizer

PROGRAM_FORMAT = "mpqc-integer-program/2"
_READABLE_FORMATS = ("mpqc-integer-program/1", PROGRAM_FORMAT)  # /1: no regions stored, rebuilt on load

__all__ = ["IntNode", "IntValue", "IntegerProgram", "LAYER_OPS", "PROGRAM_FORMAT", "integer_layer_sum"]


class IntegerProgram:
    """A frozen model in the integer contract; ``run`` is the reference implementation.

    Built by ``passes/to_integer_program.py`` (``from_graph``); a program made from bare nodes gets its
    ``quantize`` nodes' regions from the same pass."""

    def __init__(self, nodes: list[IntNode], outputs: list[str]) -> None:
        from mpqc.passes.to_integer_program import fuse_requantize

        self.nodes = fuse_requantize(nodes)
        self.outputs = outputs
        self._by_name = {node.name: node for node in nodes}

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_graph(cls, gm: GraphModule) -> "IntegerProgram":
        """Describe a frozen graph; raises one :class:`UnsupportedOpError` listing every node it cannot express."""
        from mpqc.passes.to_integer_program import to_integer_program

        return to_integer_program(gm)

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
        from mpqc.passes.to_integer_program import check_supported

        check_supported(gm)

    def check_layer_inputs(self) -> None:
        for node in self.nodes:
            if node.op in LAYER_OPS and self._by_name[node.inputs[0]].op != "quantize":
                raise MpqcError(f"layer {node.name!r} reads {node.inputs[0]!r}, which is not quantized")

    def node(self, name: str) -> IntNode:
        return self._by_name[name]

    @property
    def input_names(self) -> list[str]:
        """The program's inputs in order, named as the captured model's ``forward`` names them."""
        return [node.name for node in self.nodes if node.op == "input"]

    # ----------------------------------------------------------------------------------------- running
    @torch.no_grad()
    def run(self, *inputs: Tensor, **named: Tensor) -> Tensor | tuple[Tensor, ...]:
        """The program's outputs (fp32, dequantized) for ``inputs``, given in order or by name (``input_names``)."""
        env = self.run_all(*inputs, **named)
        results = tuple(dequantize(env[name]) for name in self.outputs)
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
        step): its op family's ``evaluate``."""
        op = ops.op_named(node.op)
        if op is None:
            raise MpqcError(f"node {node.name!r}: no op {node.op!r} in the registry (mpqc.ops)")
        return op.evaluate(self, node, env)

    # ----------------------------------------------------------------------------------------- facts
    def layers(self) -> list[IntNode]:
        return [node for node in self.nodes if node.op in LAYER_OPS]

    def layer_bits(self) -> dict[str, tuple[float, int]]:
        """Per layer (module name): (weight bits, input activation bits); embedding tables, which budgets count as
        weight-only layers, with 0 input bits (their indices are not quantized activations), and with their rows'
        mean bit-width where rows have their own (``average_weight_bits``)."""
        bits = {node.attrs["module"]: (node.attrs["weight_bits"], self._by_name[node.inputs[0]].attrs["bits"])
                for node in self.layers()}
        bits.update({node.attrs["module"]: (node.attrs.get("average_weight_bits", node.attrs["weight_bits"]), 0)
                     for node in self.nodes if node.op == "embedding"})
        return bits

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
        if structure.get("format") not in _READABLE_FORMATS:
            raise CheckpointError(f"{directory / 'program.json'} is not a {PROGRAM_FORMAT} file (format "
                                  f"{structure.get('format')!r}; readable: {', '.join(_READABLE_FORMATS)})")
        nodes = []
        for entry in structure["nodes"]:
            prefix = entry["name"] + "."
            own = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
            nodes.append(IntNode(entry["name"], entry["op"], entry["inputs"], entry["attrs"], own))
        return cls(nodes, structure["outputs"])


LAYER_OPS = ops.layer_ops()
