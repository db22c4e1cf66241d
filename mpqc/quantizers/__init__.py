"""The method registry: each differentiable bit-width search method is a pair of quantizer factories.

``METHODS`` is keyed by name; ``register_method`` adds one. Nothing is resolved by magic: a method is exactly the
two factories listed here and the paper they follow.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from torch import Tensor

from mpqc.budgets import SQUARED_PENALTY
from mpqc.errors import ConfigError
from mpqc.quantizers.base import BitRange, FixedQuantizer, FrozenQuant, Quantizer
from mpqc.quantizers.csq import CSQActivationQuantizer, CSQWeightQuantizer
from mpqc.quantizers.dq import DQActivationQuantizer, DQWeightQuantizer
from mpqc.quantizers.fracbits import FracBitsActivationQuantizer, FracBitsWeightQuantizer
from mpqc.quantizers.sdq import EBR_WEIGHT, SDQActivationQuantizer, SDQWeightQuantizer

__all__ = [
    "BitRange", "FixedQuantizer", "FrozenQuant", "Quantizer", "QuantMethod", "METHODS", "register_method",
    "get_method", "MethodDefaults",
]


@dataclass(frozen=True)
class MethodDefaults:
    """Settings a method asks for where the user left them unset (``None`` in the config).

    ``search_distill`` / ``finetune_distill``: knowledge distillation from the fp32 model during the search /
    the fixed-bit fine-tuning, applied where ``CompileConfig.search.distill`` / ``.finetune.distill`` is None
    (SDQ: on for fine-tuning, as the paper trains its fixed-bit model with KD).
    ``penalty_power``: the budget penalty's shape where ``TrainConfig.penalty_power`` is None (2, DQ's squared
    hinge; kernel-wise FracBits 1, the linear hinge: its searches then end on the budget, pruning channels to buy
    bits elsewhere, instead of a few percent above it with every channel rounded down when frozen).
    """

    search_distill: bool = False
    finetune_distill: bool = False
    penalty_power: float = SQUARED_PENALTY


@dataclass(frozen=True)
class QuantMethod:
    """A bit-width search method: how to build its weight and activation quantizers.

    ``weight_quantizer(weight, init_bits, bit_range)`` and
    ``activation_quantizer(signed, dynamic_range, init_bits, bit_range)`` return learnable-bit quantizers.
    """

    name: str
    paper: str
    weight_quantizer: Callable[[Tensor, int, BitRange], Quantizer]
    activation_quantizer: Callable[[bool, float, int, BitRange], Quantizer]
    defaults: MethodDefaults = field(default_factory=MethodDefaults)

    def configure(self, config: Any) -> Any:
        """``config`` (a ``CompileConfig``) with this method's defaults filled in where it leaves them None."""
        if config.search.distill is None:
            config = replace(config, search=replace(config.search, distill=self.defaults.search_distill))
        if config.finetune.distill is None:
            config = replace(config, finetune=replace(config.finetune, distill=self.defaults.finetune_distill))
        for phase in ("search", "finetune"):
            if getattr(config, phase).penalty_power is None:
                config = replace(config, **{phase: replace(getattr(config, phase),
                                                           penalty_power=self.defaults.penalty_power)})
        return config


METHODS: dict[str, QuantMethod] = {}


def register_method(method: QuantMethod) -> QuantMethod:
    if method.name in METHODS:
        raise ConfigError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> QuantMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


register_method(
    QuantMethod(
        name="dq",
        paper="Uhlich et al., Mixed Precision DNNs: All you need is a good parametrization, ICLR 2020",
        weight_quantizer=lambda weight, init_bits, bit_range: DQWeightQuantizer(weight, init_bits, bit_range),
        activation_quantizer=lambda signed, dynamic_range, init_bits, bit_range: DQActivationQuantizer(
            signed, dynamic_range, init_bits, bit_range
        ),
    )
)

# SDQ (mpqc/quantizers/sdq.py): DBP over adjacent bit-widths, stochastic choice with a straight-through DBP
# gradient; fixed-bit fine-tuning with entropy-aware bin regularisation (weight EBR_WEIGHT) and KD on by default.
register_method(
    QuantMethod(
        name="sdq",
        paper="Huang et al., SDQ: Stochastic Differentiable Quantization with Mixed Precision, ICML 2022",
        weight_quantizer=lambda weight, init_bits, bit_range: SDQWeightQuantizer(
            weight, init_bits, bit_range, ebr_weight=EBR_WEIGHT
        ),
        activation_quantizer=lambda signed, dynamic_range, init_bits, bit_range: SDQActivationQuantizer(
            signed, dynamic_range, init_bits, bit_range
        ),
        defaults=MethodDefaults(finetune_distill=True),
    )
)

# FracBits (mpqc/quantizers/fracbits.py): fractional bit-width per layer, or per output channel ("fracbits-kernel",
# frozen per layer), interpolating the two neighbouring integer quantizers; kernel-wise with the linear-hinge penalty.
for _name, _kernel_wise in (("fracbits", False), ("fracbits-kernel", True)):
    register_method(
        QuantMethod(
            name=_name,
            paper="Yang & Jin, FracBits: Mixed Precision Quantization via Fractional Bit-Widths, AAAI 2021"
            + (" (kernel-wise)" if _kernel_wise else ""),
            weight_quantizer=lambda weight, init_bits, bit_range, _k=_kernel_wise: FracBitsWeightQuantizer(
                weight, init_bits, bit_range, kernel_wise=_k
            ),
            activation_quantizer=lambda signed, dynamic_range, init_bits, bit_range: FracBitsActivationQuantizer(
                signed, dynamic_range, init_bits, bit_range
            ),
            defaults=MethodDefaults(penalty_power=1.0) if _kernel_wise else MethodDefaults(),
        )
    )

# CSQ (mpqc/quantizers/csq.py): bit-plane weights with bi-level continuous sparsification (bit values and ordered
# plane-selection gates), temperature annealed 1 -> 200 over the search, binary gates at its end.
register_method(
    QuantMethod(
        name="csq",
        paper="Xiao et al., CSQ: Growing Mixed-Precision Quantization Scheme with Bi-level Continuous "
        "Sparsification, 2022",
        weight_quantizer=lambda weight, init_bits, bit_range: CSQWeightQuantizer(weight, init_bits, bit_range),
        activation_quantizer=lambda signed, dynamic_range, init_bits, bit_range: CSQActivationQuantizer(
            signed, dynamic_range, init_bits, bit_range
        ),
    )
)
