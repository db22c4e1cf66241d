"""Accelerator cost models: modelled cycles of a mixed-precision bit assignment, differentiable in the bits.

Two analytical models of accelerators whose speed depends on the operand bit-widths, each a frozen, validated
dataclass (registered by name in :data:`COST_MODELS`). Every quantized layer is a matrix product in its im2col
view, per *one* input sample (``LayerInfo`` conventions):

    m = out_channels                         rows of the weight matrix
    k = params / out_channels                reduction length (in_channels/groups * kernel area, or in_features)
    n = output_elements / out_channels       output positions (H_out * W_out, 1 for a linear layer on a vector)

so that ``MACs = m * k * n``. With ``w``, ``a`` the weight and input-activation bit-widths:

**Bit-serial** (:class:`BitSerialCost`; BISMO, Umuroglu, Rasnayake and Själander, "BISMO: A Scalable Bit-Serial
Matrix Multiplication Overlay for Reconfigurable Computing", FPL 2018). A ``Dm x Dn`` array of dot-product units,
each an AND + popcount over ``Dk`` bits per cycle. A w-bit x a-bit product is ``w * a`` binary products of
bit-planes, each tiled over the array::

    compute = w * a * ceil(m / Dm) * ceil(k / Dk) * ceil(n / Dn)       (= MACs * w * a / (Dm*Dk*Dn) when the
                                                                        dimensions divide the array exactly)

**BitFusion** (:class:`BitFusionCost`; Sharma et al., "Bit Fusion: Bit-Level Dynamically Composable Architecture
for Accelerating Deep Neural Networks", ISCA 2018). A ``rows x cols`` systolic array of Fusion Units, each of
``bricks`` 2-bit BitBricks. A b-bit operand takes ``s(b)`` bricks along its side, ``s(b) = ceil(b / 2)`` rounded
up to a power of two (bricks fuse in powers of two: 1, 2, 4 -> 2, 4, 8-bit operands;
``power_of_two_fusion=False`` gives the plain ``ceil(b / 2)``). One Fusion Unit then does
``bricks / (s(w) * s(a))`` MACs per cycle (16 at 2/2 bits, 4 at 4/4, 1 at 8/8); wider operands (> 8 bits with 16
bricks) take proportionally more cycles, as the paper's temporal fusion. Mapping as the authors' simulator
(``hsharma35/bitfusion``, ``Accelerator.get_compute_cycles`` with im2col): the reduction along the rows, output
channels along the columns, one output position after the other::

    compute = n * ceil(m / cols) * ceil(k * s(w) * s(a) / (rows * bricks))
                                                                      (= MACs * s(w)*s(a) / (rows*cols*bricks))

**Memory, both models** (compulsory traffic: each tensor crosses the memory interface once per sample, i.e.
on-chip buffers large enough for reuse; a lower bound)::

    memory  = ceil((params * w + input_elements * a + output_elements * output_bits) / 8 / bytes_per_cycle)
    cycles  = max(compute, memory)               (loads overlap compute, double-buffered)
    total   = sum over layers;  latency = total / clock_hz;  ratio = total / total at uniform 8/8 bits

The output is written at ``output_bits`` (default 8: requantized on chip to the int8/uint8 storage of the
integer contract; the consumer's precision is not known to a per-layer model). BISMO itself writes 32-bit
accumulators: ``BitSerialCost(output_bits=32)`` models that.

**Differentiability.** Bit-widths are fractional during the search. The forward value is always the cost at the
*integer* bit-widths freezing rounds to (``torch.round``, as ``passes/freeze.py``), so the search penalty sees
the cost that freezing will see; gradients are straight-through: ``round`` and ``ceil`` pass the gradient
unchanged (identity), ``s(b)`` has the slope of ``b / 2``. ``torch.maximum`` sends the gradient to the bound
that is larger. So ``d cycles / d bits >= 0`` everywhere: more bits never cost fewer cycles. The price of
straight-through steps: on a plateau (5- to 8-bit operands fuse alike; a 9-long reduction fills one row tile at any
precision) the gradient still says "fewer bits, fewer cycles", and freezing steps over plateaus to the next
bit-width that does save (``passes/freeze.py``).

**Defaults** (:data:`COST_MODELS`):

* ``"bitserial"``: BISMO's largest PYNQ-Z1 instance, ``Dm x Dk x Dn = 8 x 256 x 8`` at 200 MHz (6.5 binary TOPS),
  64-bit AXI HP port = 8 bytes per cycle (``EECS-NTNU/bismo`` ``doc/platforms.md``).
* ``"bitfusion"``: the paper's 45 nm configuration as in the authors' simulator (``bf_e_conf.ini``): 16 x 32 =
  512 Fusion Units of 16 BitBricks at 500 MHz, a 192-bit memory interface = 24 bytes per cycle.

>>> layer = LayerInfo("fc", "linear", (64, 256), 16384, 0, 64, 16384, (256,), (64,), 256, 64)
>>> bitfusion = COST_MODELS["bitfusion"]
>>> float(bitfusion.compute_cycles([layer], 8, 8)[0])  # n * ceil(m/cols) * ceil(k*4*4/(rows*bricks)) = 1*2*16
32.0
>>> float(bitfusion.layer_cycles(layer, 8, 8))  # memory-bound: (16384*8 + 256*8 + 64*8) / 8 / 24 = 696
696.0
>>> float(bitfusion.layer_cycles(layer, 2, 2))  # (16384*2 + 256*2 + 64*8) / 8 / 24 = 176
176.0
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mpqc.errors import ConfigError
from mpqc.layers import LayerInfo

__all__ = [
    "COST_MODELS", "BitFusionCost", "BitSerialCost", "CostModel", "cost_report", "format_cost", "get_cost_model",
    "layers_from_report", "register_cost_model",
]


#: Bit-widths: a tensor (one value per layer, or one for all), a number, or a sequence of numbers/0-d tensors.
Bits = Tensor | float | Sequence


# ---------------------------------------------------------------------------------------------- straight-through ops
def ste_round(x: Tensor) -> Tensor:
    """Forward ``torch.round(x)`` (half to even, as freezing), backward identity."""
    return x + (torch.round(x) - x).detach()


def ste_ceil(x: Tensor) -> Tensor:
    """Forward ``torch.ceil(x)``, backward identity."""
    return x + (torch.ceil(x) - x).detach()


def _ceil_div(a: Tensor, b: int) -> Tensor:
    """Tile counts of a bit-independent dimension (no gradient needed)."""
    return torch.ceil(a / b)


# ---------------------------------------------------------------------------------------------- layer dimensions
@dataclass(frozen=True)
class _Dims:
    """The layers' im2col GEMM dimensions and tensor sizes as float vectors (one entry per layer)."""

    m: Tensor
    k: Tensor
    n: Tensor
    params: Tensor
    input_elements: Tensor
    output_elements: Tensor

    def to(self, device: torch.device) -> "_Dims":
        if self.m.device == device:
            return self
        return _Dims(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    @classmethod
    def of(cls, layers: Sequence[LayerInfo]) -> "_Dims":
        return _dims_cached(tuple(layers))

    @classmethod
    def _build(cls, layers: tuple[LayerInfo, ...]) -> "_Dims":
        for layer in layers:
            channels = layer.out_channels
            if channels <= 0 or layer.params % channels or layer.output_elements % channels:
                raise ConfigError(
                    f"layer {layer.name}: params ({layer.params}) and output elements ({layer.output_elements}) "
                    f"must be multiples of out_channels ({layer.out_channels}) for the GEMM view of a cost model"
                )
        column = lambda values: torch.tensor([float(v) for v in values], dtype=torch.float64)  # noqa: E731
        return cls(
            m=column(layer.out_channels for layer in layers),
            k=column(layer.params // layer.out_channels for layer in layers),
            n=column(layer.output_elements // layer.out_channels for layer in layers),
            params=column(layer.params for layer in layers),
            input_elements=column(layer.input_elements for layer in layers),
            output_elements=column(layer.output_elements for layer in layers),
        )


@functools.lru_cache(maxsize=64)
def _dims_cached(layers: tuple[LayerInfo, ...]) -> _Dims:
    """The search asks for the same layers' dimensions every step: build the constant vectors once."""
    return _Dims._build(layers)


def _bits_vector(values: Bits, count: int, what: str) -> Tensor:
    """Bits as a float64 vector of ``count`` entries (a scalar broadcasts), keeping the autograd graph."""
    if not isinstance(values, Tensor):
        values = torch.stack([v if isinstance(v, Tensor) else torch.tensor(float(v)) for v in values]) \
            if isinstance(values, (list, tuple)) else torch.tensor(float(values))
    values = values.to(torch.float64)
    if values.numel() == 1:
        return values.reshape(()).expand(count)
    if values.numel() != count:
        raise ConfigError(f"{what} bits: expected {count} value(s), one per layer, got {values.numel()}")
    return values.reshape(count)


# ---------------------------------------------------------------------------------------------- the models
class CostModel:
    """Base class: subclasses are frozen dataclasses with ``clock_hz``, ``bytes_per_cycle``, ``output_bits`` and
    implement :meth:`_compute`. Every method returns float64 tensors, differentiable in the bits."""

    title: ClassVar[str] = "cost model"
    clock_hz: float
    bytes_per_cycle: float
    output_bits: int

    def _compute(self, dims: _Dims, w: Tensor, a: Tensor) -> Tensor:
        raise NotImplementedError

    def _validate_common(self) -> None:
        _positive_finite(self, "clock_hz")
        _positive_finite(self, "bytes_per_cycle")
        if not (isinstance(self.output_bits, int) and 1 <= self.output_bits <= 32):
            raise ConfigError(f"{type(self).__name__}.output_bits must be an int in 1..32, got {self.output_bits!r}")

    # -- per layer, vectorised over layers
    def compute_cycles(self, layers: Sequence[LayerInfo], w: Bits, a: Bits) -> Tensor:
        """Compute-bound cycles per layer (a vector aligned with ``layers``)."""
        return self._compute(*_prepare(layers, w, a))

    def memory_cycles(self, layers: Sequence[LayerInfo], w: Bits, a: Bits) -> Tensor:
        """Memory-bound cycles per layer: bytes of weights, input and output over ``bytes_per_cycle``."""
        return self._memory(*_prepare(layers, w, a))

    def cycles(self, layers: Sequence[LayerInfo], w: Bits, a: Bits) -> Tensor:
        """Cycles per layer, ``max(compute, memory)``; ``w``/``a`` hold one bit-width per layer (or one for all)."""
        dims, w, a = _prepare(layers, w, a)
        return torch.maximum(self._compute(dims, w, a), self._memory(dims, w, a))

    def layer_cycles(self, layer: LayerInfo, w: Bits, a: Bits) -> Tensor:
        """Cycles of one layer (a 0-d tensor) at weight bits ``w`` and input-activation bits ``a``."""
        return self.cycles([layer], w, a)[0]

    def _memory(self, dims: _Dims, w: Tensor, a: Tensor) -> Tensor:
        bits = dims.params * w + dims.input_elements * a + dims.output_elements * self.output_bits
        return ste_ceil(bits / (8 * self.bytes_per_cycle))

    # -- whole model
    def total_cycles(self, layers: Sequence[LayerInfo], bits: Mapping[str, tuple]) -> Tensor:
        """Sum of the layers' cycles; ``bits`` maps each layer name to ``(weight, activation)`` bits (numbers or
        tensors, e.g. :class:`mpqc.budgets.LayerBits`)."""
        missing = [layer.name for layer in layers if layer.name not in bits]
        if missing:
            raise ConfigError(f"no bit-widths for layer(s) {', '.join(missing)}")
        w = [_scalar(bits[layer.name][0]) for layer in layers]
        a = [_scalar(bits[layer.name][1]) for layer in layers]
        return self.cycles(layers, torch.stack(w), torch.stack(a)).sum()

    def uniform_cycles(self, layers: Sequence[LayerInfo], bits: int = 8) -> float:
        """Total cycles with every weight and activation at ``bits``."""
        with torch.no_grad():
            return float(self.cycles(layers, torch.tensor(float(bits)), torch.tensor(float(bits))).sum())

    def latency_s(self, cycles: float) -> float:
        """Seconds for ``cycles`` at ``clock_hz``."""
        return float(cycles) / self.clock_hz

    def describe(self) -> str:
        raise NotImplementedError


def _prepare(layers: Sequence[LayerInfo], w: Bits, a: Bits) -> tuple[_Dims, Tensor, Tensor]:
    """The layers' dimensions and the bits as float64 vectors rounded (straight-through), on the bits' device."""
    w, a = _bits_vector(w, len(layers), "weight"), _bits_vector(a, len(layers), "activation")
    return _Dims.of(layers).to(w.device), ste_round(w), ste_round(a.to(w.device))


def _scalar(value) -> Tensor:
    return value.reshape(()).float() if isinstance(value, Tensor) else torch.tensor(float(value))


def _positive_finite(model, name: str) -> None:
    value = getattr(model, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{type(model).__name__}.{name} must be a positive finite number, got {value!r}")


def _positive_ints(model, *names: str) -> None:
    for name in names:
        value = getattr(model, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{type(model).__name__}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class BitSerialCost(CostModel):
    """BISMO-style bit-serial overlay: ``dm x dn`` dot-product units of ``dk`` bits, ``w * a`` bit-plane passes.

    >>> BitSerialCost().describe()
    'bit-serial 8x256x8 (Dm x Dk x Dn) at 200 MHz, 8 B/cycle, outputs at 8 bits'
    """

    dm: int = 8
    dk: int = 256
    dn: int = 8
    clock_hz: float = 200e6
    bytes_per_cycle: float = 8.0
    output_bits: int = 8
    title: ClassVar[str] = "bit-serial"

    def __post_init__(self) -> None:
        _positive_ints(self, "dm", "dk", "dn")
        self._validate_common()

    def _compute(self, dims: _Dims, w: Tensor, a: Tensor) -> Tensor:
        tiles = _ceil_div(dims.m, self.dm) * _ceil_div(dims.k, self.dk) * _ceil_div(dims.n, self.dn)
        return w * a * tiles

    def describe(self) -> str:
        return (f"{self.title} {self.dm}x{self.dk}x{self.dn} (Dm x Dk x Dn) at {self.clock_hz / 1e6:g} MHz, "
                f"{self.bytes_per_cycle:g} B/cycle, outputs at {self.output_bits} bits")


@dataclass(frozen=True)
class BitFusionCost(CostModel):
    """BitFusion: ``rows x cols`` Fusion Units of ``bricks`` 2-bit BitBricks, fused per layer to the operand widths.

    >>> BitFusionCost().describe()
    'BitFusion 16x32 fusion units of 16 BitBricks at 500 MHz, 24 B/cycle, outputs at 8 bits'
    >>> [BitFusionCost().slices(torch.tensor(float(b))).item() for b in (1, 2, 3, 4, 5, 8)]
    [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    """

    rows: int = 16
    cols: int = 32
    bricks: int = 16
    clock_hz: float = 500e6
    bytes_per_cycle: float = 24.0
    output_bits: int = 8
    power_of_two_fusion: bool = True
    title: ClassVar[str] = "BitFusion"

    def __post_init__(self) -> None:
        _positive_ints(self, "rows", "cols", "bricks")
        self._validate_common()
        if not isinstance(self.power_of_two_fusion, bool):
            raise ConfigError(f"BitFusionCost.power_of_two_fusion must be a bool, got {self.power_of_two_fusion!r}")

    def slices(self, bits: Tensor) -> Tensor:
        """BitBricks along one operand's side: ``ceil(b/2)`` (to a power of two when fusing in powers of two).

        Forward exact at ``round(bits)``; backward the slope of ``bits / 2``.
        """
        exact = torch.ceil(torch.round(bits.detach()).clamp_min(1) / 2)
        if self.power_of_two_fusion:
            exact = torch.exp2(torch.ceil(torch.log2(exact)))
        return bits / 2 + (exact - bits / 2).detach()

    def _compute(self, dims: _Dims, w: Tensor, a: Tensor) -> Tensor:
        k_tiles = ste_ceil(dims.k * self.slices(w) * self.slices(a) / (self.rows * self.bricks))
        return dims.n * _ceil_div(dims.m, self.cols) * k_tiles

    def describe(self) -> str:
        fusion = "" if self.power_of_two_fusion else ", linear fusion"
        return (f"{self.title} {self.rows}x{self.cols} fusion units of {self.bricks} BitBricks at "
                f"{self.clock_hz / 1e6:g} MHz, {self.bytes_per_cycle:g} B/cycle, outputs at {self.output_bits} bits"
                f"{fusion}")


# ---------------------------------------------------------------------------------------------- registry
#: Cost models by name, with their default parameters (see the module docstring).
COST_MODELS: dict[str, CostModel] = {"bitserial": BitSerialCost(), "bitfusion": BitFusionCost()}


def register_cost_model(name: str, model: CostModel, *, replace: bool = False) -> None:
    """Add ``model`` under ``name`` (usable as ``mpqc.TargetCost(name, ...)`` and the CLI budget ``name=...``)."""
    if not isinstance(model, CostModel):
        raise ConfigError(f"register_cost_model({name!r}): expected a CostModel, got {type(model).__name__}")
    if not name or "=" in name or "," in name or name != name.strip().lower():
        raise ConfigError(f"cost model name {name!r} must be non-empty lower case, without '=', ',' or spaces")
    if name in COST_MODELS and not replace:
        raise ConfigError(f"cost model {name!r} is already registered (pass replace=True to replace it)")
    COST_MODELS[name] = model


def get_cost_model(model: str | CostModel) -> CostModel:
    """A registered cost model by name (or ``model`` itself if it already is one)."""
    if isinstance(model, CostModel):
        return model
    try:
        return COST_MODELS[model]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown cost model {model!r}; known: {', '.join(sorted(COST_MODELS))}") from None


# ---------------------------------------------------------------------------------------------- reports
def cost_report(layers: Sequence[LayerInfo], layer_bits: Mapping[str, tuple[int, int]],
                model: str | CostModel) -> dict:
    """Per-layer and total modelled cycles of integer ``layer_bits`` (name -> (weight, activation) bits).

    Returns a JSON-able dict: ``model`` (name), ``description``, ``parameters``, ``layers`` (per layer: bits,
    compute/memory/total cycles, the bound, cycles at 8/8), ``total_cycles``, ``latency_s``, ``uniform8_cycles``,
    ``uniform8_latency_s`` and ``ratio_vs_8bit`` (total / uniform 8-bit total).
    """
    cost_model = get_cost_model(model)
    missing = [layer.name for layer in layers if layer.name not in layer_bits]
    if missing:
        raise ConfigError(f"no bit-widths for layer(s) {', '.join(missing)}")
    w = torch.tensor([float(layer_bits[layer.name][0]) for layer in layers])
    a = torch.tensor([float(layer_bits[layer.name][1]) for layer in layers])
    with torch.no_grad():
        compute = cost_model.compute_cycles(layers, w, a).tolist()
        memory = cost_model.memory_cycles(layers, w, a).tolist()
        eight = cost_model.cycles(layers, torch.tensor(8.0), torch.tensor(8.0)).tolist()
    per_layer = [
        {"name": layer.name, "weight_bits": layer_bits[layer.name][0], "activation_bits": layer_bits[layer.name][1],
         "macs": layer.macs, "compute_cycles": c, "memory_cycles": m, "cycles": max(c, m),
         "bound": "compute" if c >= m else "memory", "cycles_8bit": e}
        for layer, c, m, e in zip(layers, compute, memory, eight)
    ]
    total, total8 = sum(l["cycles"] for l in per_layer), sum(eight)
    name = model if isinstance(model, str) else next((k for k, v in COST_MODELS.items() if v == model), None)
    return {
        "model": name or cost_model.title,
        "description": cost_model.describe(),
        "parameters": asdict(cost_model),
        "layers": per_layer,
        "total_cycles": total,
        "latency_s": cost_model.latency_s(total),
        "uniform8_cycles": total8,
        "uniform8_latency_s": cost_model.latency_s(total8),
        "ratio_vs_8bit": total / total8 if total8 else None,
    }


_REPORT_LAYER_FIELDS = ("name", "op", "weight_shape", "params", "bias_params", "out_channels", "macs", "input_shape",
                        "output_shape", "input_elements", "output_elements")


def layers_from_report(report: dict) -> tuple[list[LayerInfo], dict[str, tuple[int, int]]]:
    """The :class:`LayerInfo` of every layer of an ``mpqc-report/1`` dict and its frozen ``(weight, activation)``
    bits: what :func:`cost_report` takes."""
    layers, bits = [], {}
    for entry in report.get("layers") or []:
        missing = [key for key in (*_REPORT_LAYER_FIELDS, "weight_bits", "activation_bits") if entry.get(key) is None]
        if missing:
            raise ConfigError(
                f"report layer {entry.get('name', '?')!r} lacks {', '.join(missing)} (needed by the cost model); "
                f"it was written by an older mpqc: compile the run again"
            )
        values = {key: tuple(entry[key]) if key.endswith("_shape") else entry[key] for key in _REPORT_LAYER_FIELDS}
        layers.append(LayerInfo(**values))
        bits[entry["name"]] = (int(entry["weight_bits"]), int(entry["activation_bits"]))
    if not layers:
        raise ConfigError("the report has no layers to cost")
    return layers, bits


def _human_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            return f"{seconds / scale:.3g} {unit}"
    raise AssertionError("unreachable")


def format_cost(cost: dict) -> str:
    """A :func:`cost_report` dict as a per-layer table with totals, for a terminal."""
    from mpqc.report import _table, human_count

    headers = ["#", "layer", "W", "A", "compute", "memory", "cycles", "bound", "8/8 cycles", "vs 8/8"]
    rows = [[str(i), l["name"], str(l["weight_bits"]), str(l["activation_bits"]), human_count(l["compute_cycles"]),
             human_count(l["memory_cycles"]), human_count(l["cycles"]), l["bound"], human_count(l["cycles_8bit"]),
             f"{l['cycles'] / l['cycles_8bit']:.2f}x" if l["cycles_8bit"] else "-"]
            for i, l in enumerate(cost["layers"])]
    ratio = cost.get("ratio_vs_8bit")
    return "\n".join([
        f"cost model {cost['model']}: {cost['description']}",
        "",
        *_table(headers, rows, left={1, 7}),
        "",
        f"total        {human_count(cost['total_cycles'])} cycles = {_human_time(cost['latency_s'])} per sample",
        f"uniform 8/8  {human_count(cost['uniform8_cycles'])} cycles = {_human_time(cost['uniform8_latency_s'])}"
        + (f"; this assignment takes {ratio:.3f}x the 8-bit cycles ({1 / ratio:.2f}x faster)" if ratio else ""),
    ])
