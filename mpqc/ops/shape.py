"""Facts about ops with no integer semantics yet (the data movement ops moved to ``mpqc/ops/movement.py``,
``indexing.py`` and ``concat.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from mpqc.ops.registry import OpDef, register_op

aten = torch.ops.aten


# ------------------------------------------------------------------------- facts only (no integer semantics yet)
@register_op
class NonNegativeActivation(OpDef):
    """Sigmoid, hardsigmoid, softmax: nonnegative outputs (the sign inference needs it); no semantics yet."""

    modules = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
    functions = (torch.sigmoid, torch.nn.functional.sigmoid, torch.nn.functional.hardsigmoid,
                 torch.nn.functional.softmax, aten.sigmoid.default, aten.hardsigmoid.default)
    methods = ("sigmoid",)
    sign = "nonnegative"
