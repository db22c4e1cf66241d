"""The method registry: each differentiable bit-width search method is a pair of quantizer factories.

``METHODS`` is keyed by name; ``register_method`` adds one. Nothing is resolved by magic: a method is exactly the
two factories listed here and the paper they follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from mpqc.errors import ConfigError
from mpqc.quantizers.base import BitRange, FixedQuantizer, FrozenQuant, Quantizer
from mpqc.quantizers.dq import DQActivationQuantizer, DQWeightQuantizer

__all__ = [
    "BitRange", "FixedQuantizer", "FrozenQuant", "Quantizer", "QuantMethod", "METHODS", "register_method",
    "get_method",
]


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
