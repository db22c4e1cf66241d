"""How an integer value's scale follows its codes through data movement (``mpqc/ops/movement.py``,
``indexing.py``, ``concat.py``, the pools), and the traced shapes the ops' ``describe`` reads.

A scale is one number (a 0-d tensor) or a float64 tensor broadcasting against the codes ``q`` (per channel after
a layer, per position after a padded average pool). A movement of ``q`` moves the scale broadcast to ``q``'s
shape the same way (:func:`moved_scale`), then :func:`compact_scale` keeps its smallest form. The reference and
TVM call these same functions (TVM on the static shape), so the multipliers derived from the scales are the same.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor
from torch.fx import Node

from mpqc.errors import MpqcError
from mpqc.ops.registry import IntValue


def broadcast_scale(scale: Tensor, shape: Sequence[int]) -> Tensor:
    """``scale`` expanded to ``shape`` (NumPy broadcasting; a view)."""
    if scale.dim() > len(shape):
        raise MpqcError(f"a scale of shape {list(scale.shape)} does not broadcast to a value of shape {list(shape)}")
    return scale.reshape([1] * (len(shape) - scale.dim()) + list(scale.shape)).expand(*shape)


def compact_scale(scale: Tensor) -> Tensor:
    """The same scale in its smallest broadcastable form: a 0-d tensor where it is one number, else size 1 along
    every dim where it is constant (the rank is kept)."""
    flat = scale.reshape(-1)
    if flat.numel() == 0 or bool((flat == flat[0]).all()):
        return flat[0].clone() if flat.numel() else scale
    for d in range(scale.dim()):
        first = scale.narrow(d, 0, 1)
        if scale.shape[d] > 1 and bool((scale == first).all()):
            scale = first
    return scale.contiguous()


def moved_scale(scale: Tensor, shape: Sequence[int], move: Callable[[Tensor], Tensor]) -> Tensor:
    """The scale of ``move(q)`` for an integer value ``q`` (of ``shape``) with ``scale``."""
    if scale.numel() == 1:
        return scale.reshape(())
    return compact_scale(move(broadcast_scale(scale, shape)))


def move(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` (a data movement) applied to a value of the reference: codes and scale of an integer value alike."""
    if isinstance(value, IntValue):
        return IntValue(fn(value.q), moved_scale(value.scale, value.q.shape, fn))
    return fn(value)


def relax_move(lowering, value, expr_fn: Callable[[Any], Any], fn: Callable[[Tensor], Tensor]):
    """TVM: ``expr_fn`` (Relax) on a value in the program's NCHW layout; an integer value's scale moved by ``fn``
    (the reference's torch movement) on the static shape."""
    from mpqc.targets.tvm import NCHW, _Float, _Int, _shape

    value = lowering.in_layout(value, NCHW)
    moved = lowering.emit(expr_fn(value.expr))
    if isinstance(value, _Int):
        return _Int(moved, moved_scale(value.scale, _shape(value.expr), fn))
    return _Float(moved)


def traced_shape(node: Node) -> list[int] | None:
    """The shape of ``node``'s value when the model was captured (``node.meta["tensor_meta"]``), if recorded."""
    meta = node.meta.get("tensor_meta")
    return [int(d) for d in meta.shape] if meta is not None and hasattr(meta, "shape") else None
