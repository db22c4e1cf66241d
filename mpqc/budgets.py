"""Budgets: differentiable costs of a bit assignment, with a limit the search must meet.

A budget is a frozen dataclass. ``cost(layers, bits)`` maps each layer's weight and activation bit-widths
(tensors, fractional during search, integer after freezing) to one scalar tensor in the budget's unit;
``penalty`` is DQ's squared-ReLU constraint term on the relative excess (or, at ``power=1``, a hinge linear in
it); ``check_feasible`` refuses a limit below the smallest cost the search space allows, before any training.

``layers`` is a sequence of cost items (:data:`~mpqc.layers.CostItem`): the layers' :class:`LayerInfo` and,
where the model has them, activations and products that are not layers; ``bits`` maps a layer's name to its
:class:`LayerBits` and an activation quantizer's qualified name to its bit-width (a 0-d tensor).

Conventions (per one input sample, see :class:`mpqc.layers.LayerInfo`):

* weight memory  = sum_l params_l * wbits_l / 8                      bytes
* activation mem = max_t (or sum_t) elements_t * bits_t / 8          bytes, over every quantized activation t: the
                                                                     input of every quantized layer, and the
                                                                     activations other ops read as codes
                                                                     (:class:`~mpqc.layers.ActivationInfo`)
* BitOPs         = sum_l MACs_l * wbits_l * abits_l                  + sum_p MACs_p * abits_a * abits_b over the
                                                                     products of two activations
                                                                     (:class:`~mpqc.layers.ProductInfo`)
* average bits   = sum_l params_l * wbits_l / sum_l params_l         (weights)
* target cycles  = sum_l max(compute_l, memory_l) on an accelerator cost model (``mpqc.targets.fpga``)
* latency        = sum_l ms_l(wbits_l, abits_l) + between, measured on this CPU per layer (``mpqc.targets.tvm.latency``)
                   and, for the work between the layers, once on the lowered model (``between_layers``)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.fx import GraphModule

from mpqc.errors import ConfigError, InfeasibleBudgetError
from mpqc.layers import ActivationInfo, CostItem, LayerInfo, ProductInfo

#: DQ's squared hinge: the budget penalty's power every method used before it was a setting, and the methods' default
#: (``MethodDefaults.penalty_power``) unless a method registers another.
SQUARED_PENALTY = 2.0


class LayerBits(NamedTuple):
    """Bit-widths of one layer: of its weight and of its input activation (0-d tensors); and the share of its
    input channels still there while the search prunes the channels of the layer producing them (1 otherwise):
    weight memory, BitOPs and activation memory scale with it, as they do once those channels are removed."""

    weight: Tensor
    activation: Tensor
    input_kept: Tensor | float = 1.0


_BYTE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def _one_size(kind: str, bytes_: float | None, kib: float | None, mib: float | None) -> float:
    given = [(v, s) for v, s in ((bytes_, 1), (kib, 1024), (mib, 1024**2)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"{kind} takes exactly one of bytes=, kib=, mib= (got {len(given)})")
    value, size = given[0]
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{kind} limit must be a positive finite number, got {value!r}")
    return float(value) * size


class Budget:
    """Base class. Subclasses set ``kind`` and implement ``cost`` and ``format``."""

    kind: str = "budget"
    unit: str = ""

    @property
    def limit(self) -> float:
        raise NotImplementedError

    def cost(self, layers: Sequence[CostItem], bits: Mapping[str, LayerBits | Tensor]) -> Tensor:
        raise NotImplementedError

    def format(self, value: float) -> str:
        """``value`` in this budget's human units."""
        raise NotImplementedError

    @property
    def text(self) -> str:
        """The budget as the CLI spells it (``parse_budget(b.text) == b``), e.g. ``weight-memory=20480B``."""
        return f"{self.kind}={self.limit:.17g}"

    def penalty(self, layers: Sequence[CostItem], bits: Mapping[str, LayerBits | Tensor],
                power: float = SQUARED_PENALTY) -> Tensor:
        """The constraint term ``relu(cost / limit - 1) ** power`` (zero inside the budget): DQ's squared hinge at
        ``power=2``, a linear one at ``power=1`` (``TrainConfig.penalty_power``)."""
        return torch.relu(self.cost(layers, bits) / self.limit - 1.0) ** power

    def met(self, value: float) -> bool:
        return value <= self.limit * (1 + 1e-9)

    def measured_on(self, gm: GraphModule, example_inputs: Sequence[Tensor]) -> "Budget":
        """This budget with whatever it measures on the model itself (``compile`` calls it once the quantizers are
        in, before the search): the budget unchanged, but for :class:`Latency` (the work between layers)."""
        return self

    def check_feasible(self, layers: Sequence[CostItem], smallest_bits: Mapping[str, LayerBits | Tensor]) -> float:
        """Raise :class:`InfeasibleBudgetError` unless the smallest achievable cost fits; return that cost."""
        smallest = float(self.cost(layers, smallest_bits))
        if not self.met(smallest):
            raise InfeasibleBudgetError(
                f"{self.kind} budget {self.format(self.limit)} is infeasible: the smallest achievable is "
                f"{self.format(smallest)} (every learnable layer at its minimum bit-width). Raise the budget, "
                f"lower the minimum bits, or learn the first/last layers' precision."
            )
        return smallest


def _layers(items: Sequence[CostItem]) -> list[LayerInfo]:
    return [item for item in items if isinstance(item, LayerInfo)]


def _activation_bits(bits: Mapping[str, LayerBits | Tensor], name: str) -> Tensor:
    if name not in bits:
        raise ConfigError(f"no bit-width for activation quantizer or layer {name}")
    value = bits[name]
    if isinstance(value, LayerBits):  # a product's factor that is that layer's input
        value = value.activation
    return torch.as_tensor(value).reshape(()).float()


def _activation_costs(items: Sequence[CostItem], bits: Mapping[str, LayerBits | Tensor]) -> Tensor:
    """Storage in bits of each activation that is no layer's input."""
    activations = [item for item in items if isinstance(item, ActivationInfo)]
    return torch.stack([item.elements * _activation_bits(bits, item.name) for item in activations]) if activations \
        else torch.zeros(0)


def _product_bitops(items: Sequence[CostItem], bits: Mapping[str, LayerBits | Tensor]) -> Tensor:
    products = [item for item in items if isinstance(item, ProductInfo)]
    return sum((item.macs * _activation_bits(bits, item.a) * _activation_bits(bits, item.b) for item in products),
               torch.zeros(()))


def _stack(layers: Sequence[CostItem], bits: Mapping[str, LayerBits], which: str) -> Tensor:
    layers = _layers(layers)
    missing = [layer.name for layer in layers if layer.name not in bits]
    if missing:
        raise ConfigError(f"no bit-widths for layer(s) {', '.join(missing)}")
    return torch.stack([torch.as_tensor(getattr(bits[layer.name], which)).reshape(()).float() for layer in layers])


def _counts(layers: Sequence[LayerInfo], field: str) -> Tensor:
    return torch.tensor([float(getattr(layer, field)) for layer in layers])


@dataclass(frozen=True, init=False)
class WeightMemory(Budget):
    """Total quantized weight storage in bytes. ``WeightMemory(kib=20)``."""

    bytes: float
    kind = "weight-memory"
    unit = "B"

    def __init__(self, bytes: float | None = None, *, kib: float | None = None, mib: float | None = None) -> None:
        object.__setattr__(self, "bytes", _one_size(self.kind, bytes, kib, mib))

    @property
    def limit(self) -> float:
        return self.bytes

    @property
    def text(self) -> str:
        return f"{self.kind}={self.limit:.17g}B"

    def cost(self, layers, bits):
        kept_params = _counts(_layers(layers), "params") * _stack(layers, bits, "input_kept")
        return (kept_params * _stack(layers, bits, "weight")).sum() / 8

    def format(self, value: float) -> str:
        return human_bytes(value)


@dataclass(frozen=True, init=False)
class ActivationMemory(Budget):
    """Activation storage in bytes of the quantized layers' inputs: the largest one (``mode="max"``) or all."""

    bytes: float
    mode: str
    kind = "activation-memory"
    unit = "B"

    def __init__(
        self, bytes: float | None = None, *, kib: float | None = None, mib: float | None = None, mode: str = "max"
    ) -> None:
        if mode not in ("max", "sum"):
            raise ConfigError(f"ActivationMemory mode must be 'max' or 'sum', got {mode!r}")
        object.__setattr__(self, "bytes", _one_size(self.kind, bytes, kib, mib))
        object.__setattr__(self, "mode", mode)

    @property
    def limit(self) -> float:
        return self.bytes

    @property
    def text(self) -> str:
        return f"{self.kind}={self.limit:.17g}B" + ("" if self.mode == "max" else ",sum")

    def cost(self, layers, bits):
        per_layer = (_counts(_layers(layers), "input_elements") * _stack(layers, bits, "activation")
                     * _stack(layers, bits, "input_kept") / 8)
        per_tensor = torch.cat([per_layer, _activation_costs(layers, bits) / 8])
        return per_tensor.max() if self.mode == "max" else per_tensor.sum()

    def format(self, value: float) -> str:
        return human_bytes(value)


@dataclass(frozen=True)
class BitOps(Budget):
    """Sum over layers of MACs x weight bits x activation bits, per sample. ``BitOps(1.2e9)``."""

    bitops: float
    kind = "bitops"
    unit = "BitOPs"

    def __post_init__(self) -> None:
        if not (self.bitops > 0 and math.isfinite(self.bitops)):
            raise ConfigError(f"bitops limit must be a positive finite number, got {self.bitops!r}")

    @property
    def limit(self) -> float:
        return float(self.bitops)

    def cost(self, layers, bits):
        return (_counts(_layers(layers), "macs") * _stack(layers, bits, "weight") * _stack(layers, bits, "activation")
                * _stack(layers, bits, "input_kept")).sum() + _product_bitops(layers, bits)

    def format(self, value: float) -> str:
        return f"{human_count(value)} BitOPs"


@dataclass(frozen=True)
class AverageBits(Budget):
    """Parameter-weighted average weight bit-width. ``AverageBits(2.0)``. (A channel being pruned counts as 0-bit
    weights of its own layer during the search; the columns its readers lose are not counted out of the average.)"""

    bits: float
    kind = "avg-bits"
    unit = "bits"

    def __post_init__(self) -> None:
        if not (0 < self.bits <= 32):
            raise ConfigError(f"average bits must be in (0, 32], got {self.bits!r}")

    @property
    def limit(self) -> float:
        return float(self.bits)

    def cost(self, layers, bits):
        params = _counts(_layers(layers), "params")
        return (params * _stack(layers, bits, "weight")).sum() / params.sum()

    def format(self, value: float) -> str:
        return f"{value:.3f} bits"


BUDGET_KINDS = ("weight-memory", "activation-memory", "bitops", "avg-bits", "latency", "bitserial", "bitfusion")


def parse_budget(text: str) -> Budget:
    """Parse a CLI budget: ``weight-memory=20KiB``, ``activation-memory=8KiB[,sum]``, ``bitops=1.2G``,
    ``avg-bits=2``, measured CPU latency ``latency=3ms`` (``latency=3ms,avx2`` forces the kernels' ISA), and
    modelled accelerator cycles ``bitfusion=2.5M``, ``bitserial=800k``."""
    kind, sep, value = text.partition("=")
    kind = kind.strip().lower()
    if not sep or not value.strip():
        raise ConfigError(f"budget {text!r} must look like KIND=VALUE, with KIND one of {', '.join(BUDGET_KINDS)}")
    try:
        return _parse_kind(kind, value, text)
    except ConfigError as error:
        if repr(text) in str(error):
            raise
        raise ConfigError(f"budget {text!r}: {error}") from None


def _parse_kind(kind: str, value: str, text: str) -> Budget:
    value, _, option = value.strip().partition(",")
    if kind in ("weight-memory", "activation-memory"):
        size = _parse_number(value, _BYTE_UNITS, text, default_unit="b")
        if kind == "weight-memory":
            if option:
                raise ConfigError(f"budget {text!r}: weight-memory takes no option (got {option!r})")
            return WeightMemory(size)
        return ActivationMemory(size, mode=option or "max")
    if kind == "bitops":
        return BitOps(_parse_number(value, _COUNT_UNITS, text, default_unit=""))
    if kind == "avg-bits":
        return AverageBits(_parse_number(value, {"": 1, "b": 1, "bits": 1}, text, default_unit=""))
    if kind == "latency":
        return Latency(_parse_number(value, {"ms": 1, "s": 1e3, "us": 1e-3}, text, default_unit="ms"),
                       isa=option or "auto")
    if kind in _cost_model_names():
        if option:
            raise ConfigError(f"budget {text!r}: {kind} takes no option (got {option!r})")
        return TargetCost(kind, _parse_number(value, _COUNT_UNITS, text, default_unit=""))
    raise ConfigError(f"unknown budget kind {kind!r} in {text!r}; known kinds: {', '.join(BUDGET_KINDS)}")


def _parse_number(value: str, units: Mapping[str, float], text: str, default_unit: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    unit = (match.group(2) if match else "").lower() or default_unit
    if not match or unit not in units:
        raise ConfigError(
            f"cannot read {value!r} in budget {text!r}: expected a number with one of the units "
            f"{', '.join(u or '(none)' for u in units)}"
        )
    return float(match.group(1)) * units[unit]


@dataclass(frozen=True)
class Latency(Budget):
    """Milliseconds per sample on this CPU, summed over the layers: each layer's time on the kernel
    ``mpqc.targets.tvm.lower`` picks for its bits, measured once per layer geometry (``mpqc/targets/tvm/latency.py``)
    and kept in the tuning database directory ``tuning_db`` (default ``$MPQC_TUNING_DB`` or
    ``~/.cache/mpqc/tuning``). ``Latency(3.0)``; CLI ``latency=3ms``.

    A class of its own rather than a :class:`TargetCost` row: a cost model there is a pure function of the layers'
    shapes (an analytical cycle count); this one is a measured table that belongs to one host, one kernel ISA
    (``isa``: ``"auto"``, the best this CPU has, or forced as ``lower(isa=...)``) and one database, and its unit is
    time. Differentiable: bilinear between the measured integer bit-widths (zero gradient inside one kernel's bits,
    freezing steps over such plateaus). The work between layers (the input's quantisation, pools, the VM's calls
    and allocations) does not depend on the bits: ``compile`` measures it once on the model (:meth:`measured_on`,
    ``between_layers_ms``) and the cost adds it as a constant.
    """

    ms: float
    isa: str = "auto"
    tuning_db: str | None = field(default=None, compare=False)
    #: the lowered module's work between its layers (ms): measured by :meth:`measured_on`, 0 until then
    between_layers_ms: float = field(default=0.0, compare=False)
    kind = "latency"
    unit = "ms"

    def __post_init__(self) -> None:
        if isinstance(self.ms, bool) or not isinstance(self.ms, (int, float)) or not (
            self.ms > 0 and math.isfinite(self.ms)
        ):
            raise ConfigError(f"latency limit must be a positive finite number of ms, got {self.ms!r}")
        from mpqc.cpu import ISA_CHOICES

        if self.isa not in ISA_CHOICES:
            raise ConfigError(f"latency isa must be one of {', '.join(ISA_CHOICES)}, got {self.isa!r}")
        if not (self.between_layers_ms >= 0 and math.isfinite(self.between_layers_ms)):
            raise ConfigError(f"latency between_layers_ms must be a finite number >= 0, got {self.between_layers_ms!r}")

    @property
    def limit(self) -> float:
        return float(self.ms)

    @property
    def text(self) -> str:
        return f"{self.kind}={self.limit:.17g}ms" + ("" if self.isa == "auto" else f",{self.isa}")

    def table(self, layers: Sequence[LayerInfo]):
        """The measured :class:`~mpqc.targets.tvm.latency.LatencyTable` of ``layers`` (measured on first use)."""
        from mpqc.targets.tvm.latency import latency_table

        return latency_table(_layers(layers), isa=self.isa, tuning_db=self.tuning_db)

    def per_layer(self, layers: Sequence[CostItem], bits: Mapping[str, LayerBits | Tensor]) -> Tensor:
        """Predicted ms of each layer at ``bits`` (activations and products that are not layers are not timed)."""
        return self.table(layers).ms(_stack(layers, bits, "weight"), _stack(layers, bits, "activation"))

    def cost(self, layers, bits):
        return self.per_layer(layers, bits).sum().float() + self.between_layers_ms

    def measured_on(self, gm: GraphModule, example_inputs: Sequence[Tensor]) -> "Latency":
        """This budget with the work between ``gm``'s layers measured (``mpqc/targets/tvm/between_layers.py``):
        the quantized graph frozen at its quantizers' current bits, lowered and timed beside its layers' table
        entries, once per host and model structure (kept in the tuning database)."""
        import copy

        from mpqc.passes.freeze import freeze
        from mpqc.passes.insert_quantizers import quantized_layers
        from mpqc.reference import IntegerProgram
        from mpqc.targets.tvm.between_layers import between_layers_ms

        layers = [layer.info for layer in quantized_layers(gm)]
        program = IntegerProgram.from_graph(freeze(copy.deepcopy(gm).eval(), WeightMemory(1e30)))
        between = between_layers_ms(program, example_inputs, layers, isa=self.isa, tuning_db=self.tuning_db)
        return replace(self, between_layers_ms=between)

    def format(self, value: float) -> str:
        return f"{value:.4g} ms"


# ---------------------------------------------------------------------------------------------------------------
# Accelerator cycles (the cost models live in mpqc.targets.fpga, imported lazily: targets may import heavy
# back ends, and budgets must stay importable on their own)
# ---------------------------------------------------------------------------------------------------------------
def _cost_model_names() -> list[str]:
    from mpqc.targets.fpga import COST_MODELS

    return sorted(COST_MODELS)


@dataclass(frozen=True)
class TargetCost(Budget):
    """Modelled cycles per sample on an accelerator cost model registered in ``mpqc.targets.fpga.COST_MODELS``:
    ``TargetCost("bitfusion", cycles=2.5e6)``, ``TargetCost("bitserial", 8e5)``; CLI ``bitfusion=2.5M``.

    The cost is the model's total cycles, ``sum_l max(compute_l, memory_l)``, at the integer bits freezing rounds
    to, with straight-through gradients (see ``mpqc/targets/fpga.py``). ``kind`` is the target's name. While the
    search prunes channels, the readers' input channels count in full (``input_kept`` is not modelled: the cycle
    model is not linear in them); the cost of the frozen, pruned layers is exact.
    """

    target: str
    cycles: float
    unit = "cycles"

    def __post_init__(self) -> None:
        from mpqc.targets.fpga import get_cost_model

        get_cost_model(self.target)  # ConfigError naming the known models
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, (int, float)) or not (
            self.cycles > 0 and math.isfinite(self.cycles)
        ):
            raise ConfigError(f"{self.target} cycle limit must be a positive finite number, got {self.cycles!r}")

    @property
    def kind(self) -> str:
        return self.target

    @property
    def limit(self) -> float:
        return float(self.cycles)

    def cost(self, layers, bits):
        from mpqc.targets.fpga import get_cost_model

        model = get_cost_model(self.target)
        return model.cycles(_layers(layers), _stack(layers, bits, "weight"),
                            _stack(layers, bits, "activation")).sum().float()

    def format(self, value: float) -> str:
        return f"{human_count(value)} cycles"


def human_bytes(n: float) -> str:
    """``mpqc.report.human_bytes``, imported when first needed (the report module loads matplotlib)."""
    from mpqc.report import human_bytes as fmt

    return fmt(n)


def human_count(n: float) -> str:
    """``mpqc.report.human_count``, imported when first needed."""
    from mpqc.report import human_count as fmt

    return fmt(n)
