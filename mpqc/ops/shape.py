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
    """Softmax: nonnegative outputs (the sign inference needs it); no semantics yet (sigmoid and hardsigmoid are
    lookup tables: ``mpqc/ops/lookup.py``)."""

    modules = (nn.Softmax,)
    functions = (torch.nn.functional.softmax, torch.softmax, aten._softmax.default, aten.softmax.int)
    methods = ("softmax",)
    sign = "nonnegative"
