"""Nodes that compute no tensor of the model besides shape queries (``mpqc/ops/quantize.py``'s ``ShapeQuery``): the
run-time checks torch.export records (softmax moved to ``mpqc/ops/softmax.py`` with its integer semantics).
"""
from __future__ import annotations

import torch

from mpqc.ops.registry import OpDef, register_op

aten = torch.ops.aten


@register_op
class Assertion(OpDef):
    """``aten._assert_tensor_metadata`` / ``_assert_scalar``: export's checks of an input's dtype or a shape, no
    value (bookkeeping: the integer program skips them)."""

    functions = (aten._assert_tensor_metadata.default, aten._assert_scalar.default)
    bookkeeping = True
