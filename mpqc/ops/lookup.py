"""Non-linear functions of a quantized input as integer lookup tables: sigmoid, SiLU, hardswish, hardsigmoid, GELU
(erf and tanh forms), tanh, leaky ReLU, ELU, softplus, mish.

A function ``f`` of b-bit codes has 2^b possible inputs, so it is a table. ``insert_quantizers`` gives the op's
input and output activation quantizers (``quantized_inputs``, ``quantized_output``); at freeze time
``describe`` builds the table from the two frozen quantizers (input: bits ``b_in``, sign, scale ``s_in``; output:
bits, sign, scale ``s_out``)::

    table[q - qmin_in] = clamp(round_half_even(f(q * s_in) / s_out), qmin_out, qmax_out)    for q in [qmin_in, qmax_in]

computed in float64 (``f`` by PyTorch's float64 kernels). The program node ``lookup`` holds the table (2^b_in
int64 entries in ``program.pt``) and produces the output codes with scale ``s_out``; the output quantizer that
follows reads them with multiplier ``s_out / s_out = 1``, so it passes them through exactly. Every backend indexes
the same table, so the reference, TVM (``take``) and onnxruntime (``QuantizeLinear -> Cast -> Gather`` of the
table's values ``fp32(q_out * s_out)``, which the following ``QuantizeLinear`` maps back to ``q_out`` exactly)
agree bit for bit. The fake-quant graph computes ``f`` in fp32 and agrees up to a rounding tie (1 LSB).

Inputs wider than 8 bits are refused (a table of 2^b entries per op is not worth storing; quantize the input to
at most 8 bits).

Adding a function: one entry in ``FUNCTIONS`` (its float64 definition and facts) and its modules/functions in
``_MATCHES`` below; nothing else in mpqc changes.

A shifted function ``f(x) + c`` (:class:`ShiftedActivation`, which ``passes/shift_activations.py`` puts in place of
a bounded-below activation, ``c`` at least minus the function's ``lower_bound``) is the same op with one more
parameter, ``shift``: its table holds ``f(q * s_in) + c``, and it is nonnegative (an unsigned output quantizer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from mpqc.ops.kernel_bridge import codes_of, quantizer_behind
from mpqc.ops.registry import IntNode, IntValue, OpDef, Unsupported, arg, register_op
from mpqc.quantizers.base import FixedQuantizer, integer_range

aten = torch.ops.aten

MAX_TABLE_BITS = 8


@dataclass(frozen=True)
class Function:
    """A non-linear function: its float64 definition (``x``, keyword parameters) and the facts passes need."""

    evaluate: Callable[..., Tensor]
    nonnegative: bool = False  # f(x) >= 0 everywhere (an unsigned output quantizer)
    keeps_zero: bool = False  # f(0) == 0 (channel pruning looks through it)
    monotone: bool = False  # non-decreasing for every parameter value mpqc accepts
    #: the function's infimum (of its keyword parameters), rounded down, where it is bounded below but not
    #: nonnegative and unbounded above: ``f(x) - lower_bound`` is nonnegative (``passes/shift_activations.py``)
    lower_bound: Callable[..., float | None] | None = None


#: the parameter of a shifted function ``f(x) + shift`` (:class:`ShiftedActivation`)
SHIFT = "shift"


FUNCTIONS: dict[str, Function] = {
    "sigmoid": Function(lambda x: torch.sigmoid(x), nonnegative=True, monotone=True),
    "hardsigmoid": Function(lambda x: F.hardsigmoid(x), nonnegative=True, monotone=True),
    "silu": Function(lambda x: F.silu(x), keeps_zero=True, lower_bound=lambda: -0.2785),  # -0.278465 at -1.2785
    "hardswish": Function(lambda x: F.hardswish(x), keeps_zero=True, lower_bound=lambda: -0.375),  # at -1.5
    "gelu": Function(lambda x, approximate="none": F.gelu(x, approximate=approximate), keeps_zero=True,
                     # erf: -0.1699712 at -0.7518; tanh: -0.1700408 at -0.7525
                     lower_bound=lambda approximate="none": -0.17 if approximate == "none" else -0.1701),
    "tanh": Function(lambda x: torch.tanh(x), keeps_zero=True, monotone=True),
    "leaky_relu": Function(lambda x, negative_slope=0.01: F.leaky_relu(x, negative_slope), keeps_zero=True,
                           monotone=True),
    "elu": Function(lambda x, alpha=1.0: F.elu(x, alpha), keeps_zero=True, monotone=True,
                    lower_bound=lambda alpha=1.0: -alpha if alpha >= 0 else None),  # (alpha < 0: unbounded)
    "softplus": Function(lambda x, beta=1.0, threshold=20.0: F.softplus(x, beta, threshold), nonnegative=True,
                         monotone=True),
    "mish": Function(lambda x: F.mish(x), keeps_zero=True, lower_bound=lambda: -0.3089),  # -0.308843 at -1.1924
}


def evaluate(function: str, params: dict, x: Tensor) -> Tensor:
    """``FUNCTIONS[function]`` at ``x`` with its keyword ``params``, plus their ``shift`` where they have one."""
    base, shift = split_shift(params)
    y = FUNCTIONS[function].evaluate(x, **base)
    return y + shift if shift else y


def split_shift(params: dict) -> tuple[dict, float]:
    """A function's own parameters and the shift added to it (0 where none)."""
    return {key: value for key, value in params.items() if key != SHIFT}, float(params.get(SHIFT, 0.0))


def shifted_lower_bound(function: str, params: dict) -> float | None:
    """The infimum of ``f(x) + shift`` as ``FUNCTIONS`` records it (``None``: unbounded below or not recorded; 0
    for nonnegative functions)."""
    base, shift = split_shift(params)
    fact = FUNCTIONS[function]
    bound = 0.0 if fact.nonnegative else None if fact.lower_bound is None else fact.lower_bound(**base)
    return None if bound is None else bound + shift


class ShiftedActivation(nn.Module):
    """``f(x) + shift`` for a lookup function ``f`` (``FUNCTIONS[function]`` with keyword ``params``): what
    ``passes/shift_activations.py`` puts in place of a bounded-below activation so that its output is nonnegative
    (its consumers' biases take the shift back).

    >>> m = ShiftedActivation("gelu", {"approximate": "none"}, 0.17)
    >>> bool((m(torch.linspace(-8, 8, 1001)) >= 0).all())
    True
    """

    def __init__(self, function: str, params: dict, shift: float) -> None:
        super().__init__()
        if function not in FUNCTIONS or SHIFT in params:
            raise ValueError(f"ShiftedActivation: {function!r} with {params} is not an unshifted lookup function "
                             f"(known: {sorted(FUNCTIONS)})")
        self.function = function
        self.params = {**params, SHIFT: float(shift)}

    def forward(self, x: Tensor) -> Tensor:
        return evaluate(self.function, self.params, x)

    def extra_repr(self) -> str:
        return f"{self.function}, {self.params}"

# fx targets -> (function, how to read its parameters from the node or module)
_MODULES: dict[type, tuple[str, Callable[[nn.Module], dict]]] = {
    nn.Sigmoid: ("sigmoid", lambda m: {}),
    nn.Hardsigmoid: ("hardsigmoid", lambda m: {}),
    nn.SiLU: ("silu", lambda m: {}),
    nn.Hardswish: ("hardswish", lambda m: {}),
    nn.GELU: ("gelu", lambda m: {"approximate": m.approximate}),
    nn.Tanh: ("tanh", lambda m: {}),
    nn.LeakyReLU: ("leaky_relu", lambda m: {"negative_slope": float(m.negative_slope)}),
    nn.ELU: ("elu", lambda m: {"alpha": float(m.alpha)}),
    nn.Softplus: ("softplus", lambda m: {"beta": float(m.beta), "threshold": float(m.threshold)}),
    nn.Mish: ("mish", lambda m: {}),
}


def _no_params(node: Node) -> dict:
    return {}


def _gelu_params(node: Node) -> dict:
    return {"approximate": str(node.kwargs.get("approximate", "none"))}


def _leaky_params(node: Node) -> dict:
    return {"negative_slope": float(arg(node, 1, "negative_slope", 0.01))}


def _elu_params(node: Node) -> dict:
    if float(arg(node, 2, "scale", 1.0)) != 1.0 or float(arg(node, 3, "input_scale", 1.0)) != 1.0:
        raise Unsupported("elu with scale or input_scale other than 1 (SELU/CELU)")
    return {"alpha": float(arg(node, 1, "alpha", 1.0))}


def _softplus_params(node: Node) -> dict:
    return {"beta": float(arg(node, 1, "beta", 1.0)), "threshold": float(arg(node, 2, "threshold", 20.0))}


_FUNCTION_TARGETS: dict[Any, tuple[str, Callable[[Node], dict]]] = {
    torch.sigmoid: ("sigmoid", _no_params), F.sigmoid: ("sigmoid", _no_params),
    aten.sigmoid.default: ("sigmoid", _no_params),
    F.hardsigmoid: ("hardsigmoid", _no_params), aten.hardsigmoid.default: ("hardsigmoid", _no_params),
    F.silu: ("silu", _no_params), aten.silu.default: ("silu", _no_params),
    F.hardswish: ("hardswish", _no_params), aten.hardswish.default: ("hardswish", _no_params),
    F.gelu: ("gelu", _gelu_params), aten.gelu.default: ("gelu", _gelu_params),
    torch.tanh: ("tanh", _no_params), F.tanh: ("tanh", _no_params), aten.tanh.default: ("tanh", _no_params),
    F.leaky_relu: ("leaky_relu", _leaky_params), aten.leaky_relu.default: ("leaky_relu", _leaky_params),
    F.elu: ("elu", _elu_params), aten.elu.default: ("elu", _elu_params),
    F.softplus: ("softplus", _softplus_params), aten.softplus.default: ("softplus", _softplus_params),
    F.mish: ("mish", _no_params), aten.mish.default: ("mish", _no_params),
}
_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh"}


def function_of(gm: GraphModule, node: Node) -> tuple[str, dict]:
    """The function an fx node computes and its parameters (``Unsupported`` for parameters mpqc refuses)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, ShiftedActivation):
            return module.function, dict(module.params)
        for cls in type(module).__mro__:
            if cls in _MODULES:
                name, params = _MODULES[cls]
                return name, params(module)
    elif node.op == "call_method":
        return _METHODS[node.target], {}
    else:
        name, params = _FUNCTION_TARGETS[node.target]
        return name, params(node)
    raise Unsupported(f"module type {type(module).__name__}")


def build_table(function: str, params: dict, in_bits: int, in_signed: bool, in_scale: float, bits: int,
                signed: bool, scale: float) -> Tensor:
    """The lookup table (int64, 2^in_bits entries, entry ``i`` for input code ``qmin_in + i``): ``f`` at each input
    code's value, in units of the output scale, rounded half to even and clamped to the output range (float64)."""
    if in_bits > MAX_TABLE_BITS:
        raise Unsupported(f"a lookup table of {function} needs an input of at most {MAX_TABLE_BITS} bits, got "
                          f"{in_bits}: quantize its input to at most {MAX_TABLE_BITS} bits")
    qmin, qmax = integer_range(in_bits, in_signed)
    x = torch.arange(qmin, qmax + 1, dtype=torch.float64) * float(in_scale)
    y = evaluate(function, params, x) / float(scale)
    low, high = integer_range(bits, signed)
    return torch.clamp(torch.round(y), low, high).to(torch.int64)



@register_op
class Lookup(OpDef):
    """A non-linear function of b-bit codes as a 2^b-entry table (see the module docstring)."""

    names = ("lookup",)
    modules = (*_MODULES, ShiftedActivation)
    functions = tuple(_FUNCTION_TARGETS)
    methods = tuple(_METHODS)
    elementwise = True
    keeps_shape = True
    quantized_inputs = (0,)
    quantized_output = True
    numerics_tests = ("tests/test_lookup.py::test_lookup_tables_are_bit_exact_in_every_backend",
                      "tests/test_lookup.py::test_table_entries_are_the_float64_function_rounded_half_to_even")

    def is_nonnegative(self, gm, node, inputs_nonnegative):
        try:
            bound = shifted_lower_bound(*function_of(gm, node))
        except Unsupported:
            return False
        return bound is not None and bound >= 0

    def zero_preserving(self, gm, node):
        try:
            function, params = function_of(gm, node)
        except Unsupported:
            return False
        return FUNCTIONS[function].keeps_zero and split_shift(params)[1] == 0

    def describe(self, gm, node, frozen):
        function, params = function_of(gm, node)
        source = node.args[0] if node.args else None
        if not isinstance(source, Node):
            raise Unsupported(f"{function} of a constant")
        attrs: dict[str, Any] = {"function": function, "params": params}
        if not frozen:
            return IntNode(node.name, "lookup", [source.name], attrs)
        users = list(node.users)
        output = users[0] if len(users) == 1 else None
        out_quantizer = (gm.get_submodule(output.target) if output is not None and output.op == "call_module"
                         else None)
        in_quantizer = quantizer_behind(gm, source)
        if in_quantizer is None or not isinstance(out_quantizer, FixedQuantizer):
            raise Unsupported(f"{function} needs a frozen activation quantizer on its input and its output "
                              f"(insert_quantizers puts them there)")
        in_bits, in_signed, in_scale = codes_of(in_quantizer)
        bits, signed, scale = codes_of(out_quantizer)
        attrs.update(in_bits=in_bits, in_signed=in_signed, in_scale=in_scale, bits=bits, signed=signed, scale=scale)
        table = build_table(function, params, in_bits, in_signed, in_scale, bits, signed, scale)
        return IntNode(node.name, "lookup", [source.name], attrs, {"table": table})

    # ----------------------------------------------------------------------------- reference
    def evaluate(self, program, node, env):
        x: IntValue = env[node.inputs[0]]
        qmin = integer_range(node.attrs["in_bits"], node.attrs["in_signed"])[0]
        table = node.tensors["table"]
        index = x.q - qmin
        if int(index.min()) < 0 or int(index.max()) >= table.numel():
            raise ValueError(f"lookup {node.name!r}: input codes outside the table's {node.attrs['in_bits']}-bit "
                             f"range")
        return IntValue(table[index], torch.tensor(float(node.attrs["scale"]), dtype=torch.float64))

    # ----------------------------------------------------------------------------- TVM
    def relax(self, lowering, node):
        from tvm import relax
        from tvm.relax import op as R

        from mpqc.targets.tvm import _Int

        x = lowering.env[node.inputs[0]]
        qmin = integer_range(node.attrs["in_bits"], node.attrs["in_signed"])[0]
        storage = "int8" if node.attrs["signed"] else "uint8"
        table = relax.const(node.tensors["table"].numpy().astype(storage))
        index = lowering.emit(R.subtract(R.astype(x.expr, "int32"), relax.const(qmin, "int32")))
        codes = lowering.emit(R.take(table, index, axis=0, mode="clip"))  # (in range by construction)
        return _Int(codes, torch.tensor(float(node.attrs["scale"]), dtype=torch.float64), x.layout)

    def relax_check(self, node):
        if node.attrs.get("bits", 0) > 8:
            return f"{node.attrs['bits']}-bit lookup outputs (the TVM target stores activations in 8 bits)"
        return None

    # ----------------------------------------------------------------------------- ONNX
    def onnx(self, builder, node):
        from onnx import TensorProto, numpy_helper

        from mpqc.targets.onnx import _float_tensor, activation_storage

        label = builder.label(node)
        a = node.attrs
        storage = activation_storage(a["in_bits"], a["in_signed"], builder.opset)
        qmin = integer_range(a["in_bits"], a["in_signed"])[0]
        low, high = storage.value_range()  # the values q of the stored codes 0, 1, ... (q + zero point)
        # indexed by the stored code: the entries of codes the b-bit range never holds repeat its ends, so the
        # table covers the whole storage type
        index = np.clip(np.arange(low, high + 1), qmin, qmin + node.tensors["table"].numel() - 1) - qmin
        values = node.tensors["table"].numpy()[index].astype(np.float64) * float(a["scale"])
        table = builder.initializer(_float_tensor(values.astype(np.float32), f"{label}.table"))
        scale = builder.initializer(_float_tensor(float(a["in_scale"]), f"{label}.input_scale"))
        zero = builder.initializer(numpy_helper.from_array(storage.codes(np.zeros((), np.int64)),
                                                           f"{label}.input_zero_point"))
        builder.add("QuantizeLinear", [node.inputs[0], scale, zero], [f"{label}.codes"], f"{label}/QuantizeLinear")
        builder.add("Cast", [f"{label}.codes"], [f"{label}.index"], f"{label}/Cast", to=TensorProto.INT32)
        builder.add("Gather", [table, f"{label}.index"], [node.name], f"{label}/Gather", axis=0)
        builder.rank[node.name] = builder.rank.get(node.inputs[0])


def table_is_monotone(table: Tensor) -> bool:
    """Whether a table never decreases (what a monotone function's table must do)."""
    return bool((table[1:] >= table[:-1]).all())

