"""The op registry: one :class:`OpDef` per op family, registered with :func:`register_op`, and the questions every
pass and target asks of it.

An ``OpDef`` holds everything mpqc knows about one family of graph nodes:

* *matching*: ``modules`` (``nn.Module`` types), ``functions`` (Python callables and the ATen overloads of the
  torch.export path) and ``methods`` (``Tensor`` method names) of the fx nodes it covers;
* *properties* the passes read: ``keeps_integers`` (an integer value stays an exact integer value;
  ``output_is_integer`` says it per program node, e.g. a product of two integers),
  ``sign`` (``"nonnegative"``, ``"preserving"`` or ``"signed"``), ``keeps_zero`` (maps 0 to 0 channel by channel:
  channel pruning may look through it), ``elementwise``, ``clamps`` (an elementwise clamp a residual add's quantizer
  moves past), ``averages`` (an average pool: its input must be integer), ``fuses_into_requantize`` (a float op a
  ``quantize`` node computes inside its requantisation region), ``commutes_with_rounding`` (it selects among its
  input's values, as a max pool does: rounding and clipping to codes, being monotone, give the same codes before it
  as after, so a target may requantise first and run it on 8-bit codes), ``keeps_shape``, ``is_layer``,
  ``quantized_inputs`` (the inputs that must be b-bit codes: they get activation quantizers where they are not
  codes already) and ``quantized_output`` (its output gets one: a lookup table maps codes to codes);
* its *program ops* (``names``: the ``IntNode.op`` values it produces) and ``describe`` (fx node -> ``IntNode``);
* its *integer semantics*: ``evaluate`` (the reference; ``mpqc/reference.py`` runs it) and ``requantize_step``
  (its meaning inside a requantisation region);
* its *backends*: ``relax`` / ``relax_requantize_step`` / ``relax_check`` (TVM, ``targets/tvm.py``) and ``onnx``
  (QDQ, ``targets/onnx.py``);
* ``numerics_tests``: the tests that check it in every backend.

Backends are imported lazily, inside the converter methods (``from mpqc.targets.tvm import _Int``): importing the
registry, a pass or a target costs torch and nothing else; TVM and ONNX load when a converter first runs. The
converters live in the op's class rather than being attached from the backend modules so that an op is one class
in one file; the backends keep the building blocks shared by many ops (exact multiplies, layouts, storage types)
and the ISA-specific layer kernels.

An ``OpDef`` with no ``names`` records facts only (e.g. ``sigmoid`` is nonnegative, which sign inference needs):
the integer program refuses it with a clear error until it has semantics and backends. ``tests/test_ops_registry.py``
walks the registry and fails when an op with program names lacks a reference, TVM or ONNX backend, or a test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from mpqc.ops.constants import SHAPE_ONLY, constant_value, is_constant, mutates  # noqa: F401 (the registry's face)


# --------------------------------------------------------------------------------------------- program values
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


def dequantize(value: Tensor | IntValue) -> Tensor:
    """``fp32(q) * fp32(scale)`` for an integer value; a float value as it is."""
    if isinstance(value, IntValue):
        return value.q.to(torch.float32) * value.scale.to(torch.float32)
    return value


class Unsupported(Exception):
    """Raised by ``describe`` or a converter: the node cannot be expressed (the message says why)."""


# --------------------------------------------------------------------------------------------- the base class
class OpDef:
    """One op family. Subclass, set the class attributes, override what the family needs, ``@register_op``."""

    names: ClassVar[tuple[str, ...]] = ()  # program ops (IntNode.op) it produces; () = facts only
    modules: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[tuple[Any, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    placeholder: ClassVar[bool] = False  # matches graph inputs
    constant: ClassVar[bool] = False  # matches get_attr nodes (constant tensors of the graph)
    bookkeeping: ClassVar[bool] = False  # computes no tensor of the model (shape queries)
    keeps_integers: ClassVar[bool] = False
    sign: ClassVar[str] = "signed"
    keeps_zero: ClassVar[bool] = False
    elementwise: ClassVar[bool] = False
    clamps: ClassVar[bool] = False
    averages: ClassVar[bool] = False
    fuses_into_requantize: ClassVar[bool] = False
    commutes_with_rounding: ClassVar[bool] = False
    keeps_shape: ClassVar[bool] = False
    is_layer: ClassVar[bool] = False
    quantized_inputs: ClassVar[tuple[int, ...]] = ()  # input positions that get an activation quantizer
    quantized_output: ClassVar[bool] = False  # its output gets an activation quantizer (a lookup table's codes)
    multiplies_operands: ClassVar[bool] = False  # the product of its two quantized operands (budgets count BitOPs)
    #: the widest codes its quantized operands may learn: 8 where a lookup table indexes 2^b entries or a product
    #: is formed; a normalization's input (a residual sum, whose outlier channels 8 bits cannot hold) up to 16,
    #: starting there
    operand_bits: ClassVar[int] = 8
    #: tests (``tests/<file>.py::<function>``) that check its numerics against the reference in every backend
    numerics_tests: ClassVar[tuple[str, ...]] = ()

    # ----------------------------------------------------------------------------- graph facts
    def is_nonnegative(self, gm: GraphModule, node: Node, inputs_nonnegative: Callable[[], bool]) -> bool:
        """Whether ``node``'s value is >= 0 for every input, by construction."""
        if self.sign == "nonnegative":
            return True
        if self.sign == "preserving":
            return inputs_nonnegative()
        return False

    def quantized_operands(self, gm: GraphModule, node: Node) -> list[Node]:
        """The operands of ``node`` that must be b-bit codes (an activation quantizer where they are not codes
        already): the graph tensors at ``quantized_inputs``. A family whose need depends on the call overrides it
        (``Mul``: both factors of a product of two tensors; none for a tensor times a number, a scale change)."""
        return [node.args[i] for i in self.quantized_inputs if i < len(node.args) and isinstance(node.args[i], Node)]

    def product_macs(self, gm: GraphModule, node: Node, output_elements: int) -> int:
        """Multiply-accumulates per sample of a ``multiplies_operands`` op with ``output_elements`` output elements
        per sample (elementwise: one each; a matmul overrides it: times the contracted size)."""
        return output_elements

    def zero_preserving(self, gm: GraphModule, node: Node) -> bool:
        """Whether ``node`` maps 0 to 0 (channel pruning looks through it)."""
        return self.keeps_zero

    # ----------------------------------------------------------------------------- the integer program
    def describe(self, gm: GraphModule, node: Node, frozen: bool) -> IntNode:
        """The program node of ``node``; raises :class:`Unsupported` with the reason where it has none."""
        if not self.names:
            raise Unsupported(f"{type(self).__name__}: no integer semantics yet")
        return IntNode(node.name, self.names[0], [arg.name for arg in node.all_input_nodes])

    def output_is_integer(self, node: IntNode, integer_inputs: list[bool]) -> bool:
        """Whether the program node's value is integer (``q * scale``), given which of its inputs are (in
        ``node.inputs`` order). Default: ``keeps_integers`` and every input is integer (a cat of an integer and a
        float value is a float value). ``quantize``, layers and lookup tables make integers whatever their inputs
        (``passes/to_integer_program.py``)."""
        return self.keeps_integers and bool(integer_inputs) and all(integer_inputs)

    def evaluate(self, program: Any, node: IntNode, env: dict) -> Any:
        """The reference: the node's value from the values in ``env``."""
        raise NotImplementedError(f"{type(self).__name__} has no reference semantics")

    def requantize_step(self, node: IntNode, inputs: list[Tensor], s_out: float) -> Tensor:
        """Inside a requantisation region: the node's value in units of ``s_out`` (fp32) from its inputs' values in
        the same units."""
        raise NotImplementedError(f"{type(self).__name__} does not fuse into a requantisation")

    # ----------------------------------------------------------------------------- backends
    def relax(self, lowering: Any, node: IntNode) -> Any:
        """TVM: the node as Relax, built with ``lowering`` (``targets/tvm.py``'s ``_Lowering``)."""
        raise NotImplementedError(f"{type(self).__name__} has no TVM converter")

    def relax_requantize_step(self, lowering: Any, node: IntNode, inputs: list[Any], s_out: float) -> Any:
        """TVM: ``requantize_step`` as Relax."""
        raise NotImplementedError(f"{type(self).__name__} does not fuse into a requantisation on TVM")

    def relax_check(self, node: IntNode) -> str | None:
        """Why TVM cannot lower this node, or None."""
        return None

    def onnx(self, builder: Any, node: IntNode) -> None:
        """ONNX: append the node's QDQ nodes to ``builder`` (``targets/onnx.py``'s ``_Builder``)."""
        raise NotImplementedError(f"{type(self).__name__} has no ONNX converter")

    def has_backend(self, method: str) -> bool:
        """Whether this family overrides ``method`` (``"evaluate"``, ``"relax"``, ``"onnx"``, ...)."""
        return getattr(type(self), method) is not getattr(OpDef, method)


# --------------------------------------------------------------------------------------------- the registry
_OPS: list[OpDef] = []
_BY_NAME: dict[str, OpDef] = {}
_BY_FUNCTION: dict[Any, OpDef] = {}
_BY_METHOD: dict[str, OpDef] = {}
_BY_MODULE: dict[type, OpDef] = {}
_PLACEHOLDER: list[OpDef] = []
_CONSTANT: list[OpDef] = []


def register_op(cls: type[OpDef]) -> type[OpDef]:
    """Register an op family (a class decorator); a program op, function, method or module type claimed twice is
    a programming error."""
    op = cls()
    for table, keys in ((_BY_NAME, cls.names), (_BY_FUNCTION, cls.functions), (_BY_METHOD, cls.methods),
                        (_BY_MODULE, cls.modules)):
        for key in keys:
            if key in table:
                raise ValueError(f"{cls.__name__}: {key!r} is already registered by {type(table[key]).__name__}")
            table[key] = op
    if cls.placeholder:
        _PLACEHOLDER.append(op)
    if cls.constant:
        _CONSTANT.append(op)
    _OPS.append(op)
    return cls


def all_ops() -> list[OpDef]:
    return list(_OPS)


def op_named(name: str) -> OpDef | None:
    """The family of a program op (``IntNode.op``)."""
    return _BY_NAME.get(name)


def op_of(gm: GraphModule, node: Node) -> OpDef | None:
    """The family an fx node belongs to, or None (an op mpqc knows nothing of)."""
    if node.op == "placeholder":
        return _PLACEHOLDER[0] if _PLACEHOLDER else None
    if node.op == "get_attr":
        return _CONSTANT[0] if _CONSTANT else None
    if node.op == "call_function":
        try:
            return _BY_FUNCTION.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    if node.op == "call_module":
        return module_op(gm.get_submodule(node.target))
    return None


def module_op(module: nn.Module) -> OpDef | None:
    """The family of a module (its class or the nearest registered base class)."""
    for cls in type(module).__mro__:
        if cls in _BY_MODULE:
            return _BY_MODULE[cls]
    return None


def layer_ops() -> tuple[str, ...]:
    """The program ops of layers (conv/linear: integer accumulators read from a quantize node)."""
    return tuple(name for op in _OPS if op.is_layer for name in op.names)


# --------------------------------------------------------------------------------------------- questions of passes
def is_bookkeeping(gm: GraphModule, node: Node) -> bool:
    """Nodes that compute no tensor of the model: shape queries, export's unused guard module, and the steps of a
    constant computation that only other constant steps read (the last step is the program's constant)."""
    op = op_of(gm, node)
    if op is not None and op.bookkeeping:
        return True
    if node.users and is_constant(gm, node) and all(is_constant(gm, user) for user in node.users):
        return True
    if mutates(node) and is_constant(gm, node):  # (its effect is in the values of the constants it writes)
        return True
    return (node.op == "call_module" and not node.users) or _shape_arithmetic(gm, node)


def _shape_arithmetic(gm: GraphModule, node: Node) -> bool:
    """Whether ``node`` computes on shape queries only (``x.size()[1] // 2``): a getitem, ``//``, ``*`` ... whose
    inputs all lead back to shape queries, never to a tensor (a value with ``tensor_meta``) or a graph input."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        op = op_of(gm, current)
        if op is not None and op.bookkeeping:
            continue
        if current.op not in ("call_function", "call_method") or not current.all_input_nodes \
                or current.meta.get("tensor_meta") is not None:
            return False
        stack.extend(current.all_input_nodes)
    return True


def is_nonnegative(gm: GraphModule, node: Node) -> bool:
    """Whether ``node``'s value is >= 0 for every input, by construction (unknown ops: no)."""
    op = op_of(gm, node)
    if op is None:
        return False
    return op.is_nonnegative(gm, node, lambda: bool(node.all_input_nodes) and all(
        is_nonnegative(gm, arg) for arg in node.all_input_nodes))


def keeps_zero(gm: GraphModule, node: Node) -> bool:
    """Whether ``node`` maps 0 to 0 channel by channel (channel pruning looks through it)."""
    op = op_of(gm, node)
    return op is not None and op.zero_preserving(gm, node)


def has_property(gm: GraphModule, node: Node, name: str) -> bool:
    """``keeps_integers``, ``elementwise``, ``clamps``, ``averages``, ... of ``node``'s family (False if none)."""
    op = op_of(gm, node)
    return op is not None and bool(getattr(op, name))


def describe(gm: GraphModule, node: Node, frozen: bool = True) -> IntNode:
    """``node`` as a program node; raises :class:`Unsupported` naming the op where mpqc has no semantics for it.
    A computation on constants only (``is_constant``) is the program's ``constant`` holding its value."""
    if node.op != "get_attr" and is_constant(gm, node):
        return IntNode(node.name, "constant", [], {}, {"value": constant_value(gm, node).to(torch.float32)})
    op = op_of(gm, node)
    if op is None:
        raise Unsupported(_unknown(gm, node))
    return op.describe(gm, node, frozen)


def _unknown(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        return f"module type {type(gm.get_submodule(node.target)).__name__}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "get_attr":
        return "constant tensors are not supported"
    return f"node kind {node.op}"


def pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def calls(node: Any, targets: tuple | dict | frozenset | set) -> bool:
    """Whether ``node`` is an fx call (function or method) of one of ``targets`` (an unhashable target is none)."""
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return False
    try:
        return node.target in targets
    except TypeError:
        return False


def arg(node: Node, index: int, name: str, default: Any) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
