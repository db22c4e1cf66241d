"""The lowering core: an :class:`~mpqc.reference.IntegerProgram` -> a Relax IRModule (``main`` and
``unpack_weights``), one converter per node from the op registry (``mpqc/ops/*``: ``OpDef.relax``, which builds
with :class:`_Lowering`'s helpers and the values of ``values.py``).

*Matches*: every node whose op has a Relax converter that accepts it (:func:`check_supported` lists all that do
not, in one error). *Rewrites to*: :class:`BuiltModule` (see the package docstring for what each op becomes).
"""
from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mpqc import ops
from mpqc.errors import ConfigError, UnsupportedOpError
from mpqc.reference import IntegerProgram, IntNode
from mpqc.targets.tvm.kernels import registry
from mpqc.targets.tvm.te import _exact_mul_te, _round_clip_te
from mpqc.targets.tvm.values import _TO_NCHW, _TO_NHWC, NCHW, NHWC, _dtype, _Float, _Int, _shape
from mpqc.targets.tvm.weights import (PACKED_WEIGHTS, UNPACK_FUNCTION, WeightLayout, pack_bits, packed_size, place,
                                      unpack_te)


class _Lowering:
    """Walks the program in order, one converter per op (``OpDef.relax`` in the op registry), building the Relax functions ``main``
    and ``unpack_weights``.

    ``isa``: the ISA whose kernels conv2d/linear layers may use (``kernels/registry.py`` chooses per layer;
    ``"generic"``: TVM's own operators everywhere). A layer on an implicit-GEMM kernel leaves its result
    channels-last (NHWC) through every op that is layout-blind (requantisation, ReLU, clamps, residual adds, max
    pooling, integer global pooling); the ops that are not convert back to the program's NCHW layout first.
    """

    def __init__(self, program: IntegerProgram, input_shapes: list[tuple[int, ...]], mode: str,
                 expose: Sequence[str], isa: str = "generic") -> None:
        from tvm import relax

        self.program = program
        self.mode = mode  # "llvm" or "cuda": how exact multiplies and rounding are spelled
        if isa not in registry.ISAS or isa == "auto":
            raise ConfigError(f"isa must be one of {registry.ISAS[1:]} (resolved), got {isa!r}")
        self.isa = isa  # the ISA of the conv/linear kernels (kernels/registry.py)
        self.kernel_layers: dict[str, str] = {}  # layer node -> the micro-kernel block it runs on
        self.by_name = {node.name: node for node in program.nodes}
        self.readers = collections.Counter(name for node in program.nodes for name in node.inputs)  # node -> count
        self.bb = relax.BlockBuilder()
        self.env: dict[str, _Int | _Float] = {}
        self.param_vars: list[Any] = []
        self.param_names: list[str] = []
        self.params: dict[str, np.ndarray] = {}  # parameters stored as they are (int32 biases)
        self.weights: list[WeightLayout] = []  # parameters stored bit-packed (the layers' weights)
        self.weight_codes: dict[str, np.ndarray] = {}
        self.inexact: list[str] = []
        self.expose = list(expose)
        inputs = [node for node in program.nodes if node.op == "input"]
        if len(input_shapes) != len(inputs):
            raise ConfigError(f"the program takes {len(inputs)} input(s), got {len(input_shapes)} input shape(s)")
        self.input_vars = {node.name: relax.Var(node.name, relax.TensorType(tuple(shape), "float32"))
                           for node, shape in zip(inputs, input_shapes)}
        self._scaled_cache: dict[tuple[str, float], _Float] = {}
        self._relayout_cache: dict[tuple[Any, str], Any] = {}

    # ----------------------------------------------------------------------------- building blocks
    def emit(self, expr):
        return self.bb.emit(expr)

    def param(self, name: str, array: np.ndarray):
        from tvm import relax

        var = relax.Var(name, relax.TensorType(array.shape, str(array.dtype)))
        self.param_vars.append(var)
        self.param_names.append(name)
        self.params[name] = np.ascontiguousarray(array)
        return var

    def weight(self, node: IntNode, layout: str, kernel_width: int = 0):
        """The parameter holding ``node``'s weight in ``layout`` (see ``weights.py``; ``kernel_width``: its kernel
        widened, ``WeightLayout.kernel_width``); its codes are stored bit-packed and unpacked by
        ``unpack_weights``."""
        from tvm import relax

        codes = node.tensors["weight"].to(torch.int8).numpy()
        spec = WeightLayout(f"{node.name}.weight", node.name, int(node.attrs["weight_bits"]), tuple(codes.shape),
                            layout, kernel_width=kernel_width)
        var = relax.Var(spec.name, relax.TensorType(spec.kernel_shape, "int8"))
        self.param_vars.append(var)
        self.param_names.append(spec.name)
        self.weights.append(spec)
        self.weight_codes[spec.name] = codes
        return var

    def const(self, tensor: torch.Tensor):
        from tvm import relax

        return relax.const(tensor.detach().cpu().numpy())

    def mul(self, expr, factor: torch.Tensor):
        """fp32 ``expr * factor`` (factor an fp32 torch tensor, broadcast), rounded once, never contracted."""
        return self.bb.emit_te(_exact_mul_te, expr, self.const(factor.to(torch.float32)), mode=self.mode,
                               primfunc_name_hint="exact_mul")

    def to_f32(self, expr):
        from tvm.relax import op as R

        return expr if _dtype(expr) == "float32" else self.emit(R.astype(expr, "float32"))

    def relayout(self, expr, source: str, target: str):
        """``expr`` (4-D, laid out ``source``) in ``target`` layout; other ranks and equal layouts pass."""
        from tvm.relax import op as R

        if source == target or len(_shape(expr)) != 4:
            return expr
        key = (expr, target)
        if key not in self._relayout_cache:
            self._relayout_cache[key] = self.emit(R.permute_dims(expr, _TO_NHWC if target == NHWC else _TO_NCHW))
        return self._relayout_cache[key]

    def in_layout(self, value: _Int | _Float, target: str) -> _Int | _Float:
        """``value`` converted to ``target`` layout (the scale of an integer value follows its channels)."""
        if value.layout == target or len(_shape(value.expr)) != 4:
            return value
        expr = self.relayout(value.expr, value.layout, target)
        if isinstance(value, _Float):
            return _Float(expr, target)
        scale = value.scale
        if scale.dim() == 4:
            scale = scale.permute(*(_TO_NHWC if target == NHWC else _TO_NCHW))
        return _Int(expr, scale, target)

    def dequantize(self, value: _Int | _Float):
        """The reference's ``_dequantize``: ``fp32(q) * fp32(scale)`` (in the value's layout)."""
        if isinstance(value, _Float):
            return value.expr
        return self.mul(self.to_f32(value.expr), value.scale.to(torch.float32))

    def requantize_region(self, node: IntNode, s_out: float) -> _Float:
        """The value of ``node``'s requantisation region (``attrs["region"]``, built by
        ``passes/to_integer_program.py``) in units of ``s_out``: the leaves scaled, then each step's
        ``relax_requantize_step`` in order, as the reference's ``Quantize.region_value``. Shared by the quantize
        nodes of equal scale over the same values (cached)."""
        region = node.attrs["region"]
        units: dict[str, _Float] = {}
        for name in region["leaves"]:
            units[name] = self.scaled(name, s_out)
        for name in region["steps"]:
            step = self.by_name[name]
            units[name] = self._cached((name, s_out), lambda step=step: ops.op_named(step.op).relax_requantize_step(
                self, step, [units[i] for i in step.inputs], s_out))
        return units[node.inputs[0]]

    def selections_to_round_before(self, node: IntNode) -> list[IntNode]:
        """The nodes whose value ``node`` (a ``quantize``) requantises, where rounding may run before them, in
        order: a chain of ops that ``commutes_with_rounding`` (max pools, moves such as a flatten) from integer
        accumulators, each read by the next alone ([] where there is none). Requantising first, they run on 8-bit
        codes instead of int32 (a ResNet stem's max pool reads a quarter of the bytes, and the conv before it writes
        a quarter); the codes are the same, as the ops select or move values and rounding is monotone."""
        region = node.attrs["region"]
        if region["steps"] or len(region["leaves"]) != 1:
            return []
        chain, name = [], region["leaves"][0]
        while name in self.by_name and ops.op_named(self.by_name[name].op).commutes_with_rounding and \
                name not in self.program.outputs and name not in self.expose and self.readers[name] == 1:
            chain.insert(0, self.by_name[name])
            name = chain[0].inputs[0]
        return chain if chain and isinstance(self.env.get(name), _Int) else []

    def scaled(self, name: str, s_out: float) -> _Float:
        """The value of the node ``name`` in units of ``s_out`` (fp32), as a requantisation region's leaf."""
        return self._cached((name, s_out), lambda: self._scaled_leaf(name, s_out))

    def _cached(self, key: tuple[str, float], build: Callable[[], _Float]) -> _Float:
        if key not in self._scaled_cache:
            self._scaled_cache[key] = build()
        return self._scaled_cache[key]

    def _scaled_leaf(self, name: str, s_out: float) -> _Float:
        value = self.env[name]
        if isinstance(value, _Int):
            multiplier = (value.scale / s_out).to(torch.float32)
            return _Float(self.mul(self.to_f32(value.expr), multiplier), value.layout)
        return _Float(self.mul(value.expr, torch.tensor(1.0 / s_out, dtype=torch.float32)), value.layout)

    def round_to_codes(self, y, qmin: int, qmax: int, storage: str):
        """``clamp(round_half_even(y), qmin, qmax)`` cast to ``storage``."""
        from tvm.relax import op as R

        if self.mode == "cuda":  # Relax round -> nearbyintf (half to even)
            return self.emit(R.astype(R.clip(R.round(y), qmin, qmax), storage))
        return self.bb.emit_te(_round_clip_te, y, qmin, qmax, storage, primfunc_name_hint="requantize")

    # ----------------------------------------------------------------------------- the functions
    def build(self):
        from tvm import relax

        bb = self.bb
        with bb.function("main"):
            with bb.dataflow():
                for node in self.program.nodes:
                    self.env[node.name] = ops.op_named(node.op).relax(self, node)
                results = [self.dequantize(self.in_layout(self.env[name], NCHW)) for name in self.program.outputs]
                results += [self.in_layout(self.env[name], NCHW).expr for name in self.expose]
                output = results[0] if len(results) == 1 else relax.Tuple(results)
                output = bb.emit_output(output)
            bb.emit_func_output(output, params=list(self.input_vars.values()) + self.param_vars)
        self.weights = place(self.weights)
        packed = relax.Var(PACKED_WEIGHTS, relax.TensorType((packed_size(self.weights),), "uint8"))
        with bb.function(UNPACK_FUNCTION, [packed]):
            with bb.dataflow():
                unpacked = [bb.emit_te(functools.partial(unpack_te, layout=spec), packed,
                                       primfunc_name_hint="unpack_weight") for spec in self.weights]
                output = bb.emit_output(relax.Tuple(unpacked))
            bb.emit_func_output(output)
        return bb.get()



def check_supported(program: IntegerProgram) -> None:
    """Raise one :class:`UnsupportedOpError` listing every node the TVM target cannot lower."""
    problems = []
    for node in program.nodes:
        op = ops.op_named(node.op)
        reason = f"no TVM converter for op {node.op!r}" if op is None or not op.has_backend("relax") else \
            op.relax_check(node)
        if reason:
            problems.append(f"{node.name} ({node.op}): {reason}")
    if problems:
        raise UnsupportedOpError(f"the TVM target cannot lower {len(problems)} node(s):\n  " + "\n  ".join(problems))


@dataclass
class BuiltModule:
    """A program as Relax: ``main(inputs..., params...)`` and ``unpack_weights(packed) -> weights``."""

    mod: Any
    param_names: list[str]  # main's parameters after its inputs, in order
    params: dict[str, np.ndarray]  # those stored as they are (int32 biases)
    weights: list[WeightLayout]  # those stored bit-packed, in the order unpack_weights returns them
    packed: np.ndarray  # the packed weights (weights.py)
    inexact: list[str]
    vnni_layers: list[str]  # layers on the VNNI kernels
    kernel_layers: dict[str, str] = field(default_factory=dict)  # layer -> micro-kernel block (kernels/registry.py)


def build_module(program: IntegerProgram, input_shapes: Sequence[Sequence[int]], *, mode: str = "llvm",
                 expose: Sequence[str] = (), isa: str = "generic") -> BuiltModule:
    """The Relax IRModule of ``program``, its parameters, and the list of nodes whose bit-exactness is not
    guaranteed (empty for the supported zoo). ``isa``: the conv/linear kernels' ISA, resolved (``kernels/registry.py``'s
    ``resolve_isa``: ``amx``, ``avx512vnni``, ``avxvnni``, ``avx2`` or ``generic``, TVM's own operators)."""
    from tvm import relax

    check_supported(program)
    unknown = [name for name in expose if name not in {node.name for node in program.nodes}]
    if unknown:
        raise ConfigError(f"expose: no node named {', '.join(map(repr, unknown))} in the program")
    lowering = _Lowering(program, [tuple(int(d) for d in s) for s in input_shapes], mode, expose, isa=isa)
    mod = lowering.build()
    mod = relax.transform.DeadCodeElimination(entry_functions=["main", UNPACK_FUNCTION])(mod)
    vnni_layers = [layer for layer, block in lowering.kernel_layers.items() if block == registry.VNNI_BLOCK]
    return BuiltModule(mod, lowering.param_names, lowering.params, lowering.weights,
                       pack_bits(lowering.weights, lowering.weight_codes), lowering.inexact, vnni_layers,
                       dict(lowering.kernel_layers))
