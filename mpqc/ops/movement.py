"""Data movement that keeps integers exact: flatten, reshape/view, permute/transpose, channel shuffle.

Each moves the values of its input and nothing else, so an integer value ``IntValue(q, scale)`` stays integer:
``q`` moves, and its scale moves with it. A scale is one number, or a tensor broadcasting against ``q`` (per channel
after a layer, per position after a padded average pool); :func:`moved_scale` applies the same movement to the
scale broadcast to ``q``'s shape and compacts the result (:func:`compact_scale`: size 1 along every dim where it is
constant, a 0-d tensor where it is one number), so a per-channel scale follows its channels through a channel
shuffle and a per-tensor scale stays one number. The reference and TVM compute the scales with these same
functions (TVM on the static shape), so the requantisation multipliers derived from them are the same.

On float values (a requantisation region's steps: ``fuses_into_requantize``) they move fp32 values in units of
``s_out``, which is exact as well.

Shapes written as run-time values in the model (``x.view(b, g, c // g, h, w)``: ``b``, ``c // g`` are shape
queries) are resolved at ``describe`` from the traced shapes (``node.meta["tensor_meta"]``, which the capture
records): dim 0 stays ``-1`` (any batch), the others become the traced sizes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.fx import Node

from mpqc.errors import MpqcError
from mpqc.ops.registry import IntNode, OpDef, Unsupported, arg, register_op
from mpqc.ops.scales import move, relax_move, traced_shape

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape)
MOVEMENT_TESTS = ("tests/test_ops_movement.py::test_movement_is_bit_exact_on_tvm",
                  "tests/test_ops_movement.py::test_movement_agrees_with_onnxruntime",
                  "tests/test_ops_movement.py::test_movement_agrees_with_the_fake_quant_graph",
                  "tests/test_ops_movement.py::test_onnxruntime_agrees_on_an_emulated_avx2_cpu")


# --------------------------------------------------------------------------------------------- flatten / reshape
def is_batch_flatten(node: Node) -> bool:
    """``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x.flatten(1)`` or ATen ``view(x, [s0, -1])``."""
    if node.target == "flatten":
        return tuple(node.args[1:]) in ((1,), (1, -1)) or node.kwargs.get("start_dim") == 1
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], Node)


def reshape_target(node: Node, shape: Sequence[Any]) -> list[int]:
    """The ``reshape`` attribute of a view to ``shape`` (ints and run-time shape values): dim 0 ``-1`` where it is
    a run-time value or ``-1`` (any batch), literal sizes kept, the other run-time sizes and ``-1`` from the traced
    shape."""
    traced = traced_shape(node)
    target = []
    for i, size in enumerate(shape):
        if isinstance(size, int) and (size != -1 or i == 0):
            target.append(size)
        elif i == 0:
            target.append(-1)
        elif traced is not None and len(traced) == len(shape):
            target.append(traced[i])
        elif size == -1:
            target.append(-1)
        else:
            raise Unsupported(f"reshape to a size computed at run time ({size}) without the traced shapes")
    if target.count(-1) > 1:
        raise Unsupported(f"reshape to {target}: more than one size left to infer")
    return target


class _Movement(OpDef):
    """An op that moves values: ``fn(node)`` moves a tensor, codes and their (broadcast) scale alike (``move``);
    ``_relax(lowering, node, value)`` is its Relax form. Integer values stay integer; a float value inside a
    requantisation region is moved the same way."""

    commutes_with_rounding = True

    def fn(self, node: IntNode) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def _relax(self, lowering, node: IntNode, value):
        raise NotImplementedError

    def evaluate(self, program, node, env):
        return move(env[node.inputs[0]], self.fn(node))

    def requantize_step(self, node, inputs, s_out):
        return self.fn(node)(inputs[0])

    def relax(self, lowering, node):
        return self._relax(lowering, node, lowering.env[node.inputs[0]])

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        return self._relax(lowering, node, inputs[0])


@register_op
class Flatten(_Movement):
    """``flatten(x, start_dim)`` with ``end_dim`` -1 (the program op ``flatten``); the fx nodes of ``view`` /
    ``reshape`` too: a batch flatten is a ``flatten``, any other shape a ``reshape`` (as is a flatten with another
    ``end_dim``)."""

    names = ("flatten",)
    modules = (nn.Flatten,)
    functions = (torch.flatten, aten.flatten.using_ints) + _VIEWS
    methods = ("flatten", "view", "reshape")
    keeps_integers = True
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = ("tests/test_tvm.py::test_less_common_ops_are_bit_exact",
                      "tests/test_onnx.py::test_onnxruntime_agrees_with_the_reference_at_mixed_bits")

    def start_dim(self, gm, node: Node) -> int:
        """The flatten's ``start_dim`` (a batch flatten's: 1); raises :class:`Unsupported` for other reshapes
        (``passes/prune_channels.py`` asks)."""
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if module.end_dim != -1:
                raise Unsupported("flatten with end_dim != -1")
            return module.start_dim
        if node.target in (torch.flatten, aten.flatten.using_ints, "flatten"):
            if arg(node, 2, "end_dim", -1) != -1:
                raise Unsupported("flatten with end_dim != -1")
            return arg(node, 1, "start_dim", 0)
        if not is_batch_flatten(node):
            raise Unsupported("a reshape other than a batch flatten")
        return 1

    def describe(self, gm, node, frozen):
        source = node.all_input_nodes[0].name
        if node.target in _VIEWS or node.target in ("view", "reshape"):
            return Reshape.describe_view(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            start, end = module.start_dim, module.end_dim
        else:
            start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
        if end == -1:
            return IntNode(node.name, "flatten", [source], {"start_dim": start})
        traced = traced_shape(node)
        if traced is None:
            raise Unsupported(f"flatten(end_dim={end}) without the traced shapes")
        shape = traced if start == 0 else [-1] + traced[1:]  # a literal batch only where it is merged
        return IntNode(node.name, "reshape", [source], {"shape": reshape_target(node, shape)})

    def fn(self, node: IntNode) -> Callable[[Tensor], Tensor]:
        return lambda t: torch.flatten(t, node.attrs["start_dim"])

    def _relax(self, lowering, node, value):
        from mpqc.targets.tvm import _flatten

        start = node.attrs["start_dim"]
        return relax_move(lowering, value, lambda e: _flatten(e, start), lambda t: torch.flatten(t, start))

    def onnx(self, builder, node):
        import numpy as np
        from onnx import numpy_helper

        label, x, start = builder.label(node), node.inputs[0], node.attrs["start_dim"]
        rank = builder.rank.get(x)
        if start < 0:
            if rank is None:
                raise Unsupported(f"flatten(start_dim={start}) of a tensor of unknown rank: pass input_shapes")
            start += rank
        if start == 1:
            builder.add("Flatten", [x], [node.name], label, axis=1)
        else:  # torch.flatten(x, start): keep the first `start` dims (0 copies a dim in Reshape), merge the rest
            shape = builder.initializer(numpy_helper.from_array(np.array([0] * start + [-1], dtype=np.int64),
                                                                f"{label}.shape"))
            builder.add("Reshape", [x, shape], [node.name], label)
        builder.rank[node.name] = start + 1


@register_op
class Reshape(_Movement):
    """``view`` / ``reshape`` to any shape (its fx nodes belong to :class:`Flatten`, which describes a batch
    flatten as the program op ``flatten``, any other shape as this one)."""

    names = ("reshape",)
    keeps_integers = True
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = MOVEMENT_TESTS

    @staticmethod
    def describe_view(node: Node) -> IntNode:
        source = node.all_input_nodes[0].name
        if is_batch_flatten(node):
            return IntNode(node.name, "flatten", [source], {"start_dim": 1})
        shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if node.op == "call_method" and not shape:
            shape = tuple(node.kwargs.get("shape", ()))
        return IntNode(node.name, "reshape", [source], {"shape": reshape_target(node, shape)})

    @staticmethod
    def fn(node: IntNode) -> Callable[[Tensor], Tensor]:
        return lambda t: t.reshape(node.attrs["shape"])

    def _relax(self, lowering, node, value):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _shape

        def expr_fn(expr):
            shape = list(torch.empty(_shape(expr), device="meta").reshape(node.attrs["shape"]).shape)
            return R.reshape(expr, shape)

        return relax_move(lowering, value, expr_fn, self.fn(node))

    def onnx(self, builder, node):
        import numpy as np
        from onnx import numpy_helper

        label, shape = builder.label(node), node.attrs["shape"]
        init = builder.initializer(numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{label}.shape"))
        builder.add("Reshape", [node.inputs[0], init], [node.name], label)
        builder.rank[node.name] = len(shape)


# --------------------------------------------------------------------------------------------- permutations
@register_op
class Permute(_Movement):
    """``permute(dims)`` and ``transpose(dim0, dim1)`` (``swapaxes`` / ``swapdims`` too: MaxViT's grid partition)."""

    names = ("permute", "transpose")
    functions = (torch.permute, torch.transpose, aten.permute.default, aten.transpose.int, torch.swapaxes,
                 torch.swapdims)
    methods = ("permute", "transpose", "swapaxes", "swapdims")
    keeps_integers = True
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = MOVEMENT_TESTS

    def describe(self, gm, node, frozen):
        source = node.all_input_nodes[0].name
        if node.target in (torch.transpose, aten.transpose.int, "transpose", torch.swapaxes, torch.swapdims,
                           "swapaxes", "swapdims"):
            dims = [arg(node, 1, "dim0", arg(node, 1, "axis0", None)),
                    arg(node, 2, "dim1", arg(node, 2, "axis1", None))]
            if not all(isinstance(d, int) for d in dims):
                raise Unsupported(f"transpose of dims {dims}")
            return IntNode(node.name, "transpose", [source], {"dims": dims})
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if not dims:
            dims = node.kwargs.get("dims", ())
        return IntNode(node.name, "permute", [source], {"dims": [int(d) for d in dims]})

    @staticmethod
    def perm(node: IntNode, rank: int) -> list[int]:
        """The permutation of a value of ``rank`` dims."""
        dims = [d % rank for d in node.attrs["dims"]] if rank else []
        if node.op == "permute":
            if sorted(dims) != list(range(rank)):
                raise MpqcError(f"node {node.name!r}: permute({node.attrs['dims']}) of a rank-{rank} value")
            return dims
        perm = list(range(rank))
        perm[dims[0]], perm[dims[1]] = perm[dims[1]], perm[dims[0]]
        return perm

    def fn(self, node: IntNode) -> Callable[[Tensor], Tensor]:
        return lambda t: t.permute(self.perm(node, t.dim()))

    def _relax(self, lowering, node, value):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _shape

        return relax_move(lowering, value, lambda e: R.permute_dims(e, self.perm(node, len(_shape(e)))),
                          self.fn(node))

    def onnx(self, builder, node):
        rank = builder.rank.get(node.inputs[0])
        if rank is None:
            raise Unsupported(f"{node.op} of a tensor of unknown rank: pass input_shapes")
        builder.add("Transpose", [node.inputs[0]], [node.name], builder.label(node), perm=self.perm(node, rank))
        builder.rank[node.name] = rank


@register_op
class ChannelShuffle(_Movement):
    """``nn.ChannelShuffle(g)`` / ``F.channel_shuffle``: ``x.view(n, g, c // g, ...).transpose(1, 2)`` flattened
    back to ``[n, c, ...]`` (ShuffleNet's own ``view``/``transpose``/``view`` is three ops of the families above)."""

    names = ("channel_shuffle",)
    modules = (nn.ChannelShuffle,)
    functions = (torch.channel_shuffle, torch.native_channel_shuffle, aten.channel_shuffle.default,
                 aten.native_channel_shuffle.default)
    keeps_integers = True
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = MOVEMENT_TESTS

    def describe(self, gm, node, frozen):
        if node.op == "call_module":
            groups = gm.get_submodule(node.target).groups
        else:
            groups = arg(node, 1, "groups", None)
        traced = traced_shape(node)
        attrs = {"groups": int(groups)}
        if traced is not None:
            attrs["channels"] = traced[1]  # (ONNX's Reshape needs it)
        return IntNode(node.name, "channel_shuffle", [node.all_input_nodes[0].name], attrs)

    @staticmethod
    def fn(node: IntNode) -> Callable[[Tensor], Tensor]:
        groups = node.attrs["groups"]

        def shuffle(t: Tensor) -> Tensor:
            n, c, *rest = t.shape
            if c % groups:
                raise MpqcError(f"node {node.name!r}: channel shuffle of {c} channels in {groups} groups")
            return t.reshape(n, groups, c // groups, *rest).transpose(1, 2).reshape(t.shape)

        return shuffle

    def _relax(self, lowering, node, value):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _shape

        def expr_fn(expr):
            shape = _shape(expr)
            n, c, *rest = shape
            groups = node.attrs["groups"]
            split = R.reshape(expr, [n, groups, c // groups, *rest])
            return R.reshape(R.permute_dims(split, [0, 2, 1, *range(3, len(shape) + 1)]), shape)

        return relax_move(lowering, value, expr_fn, self.fn(node))

    def onnx(self, builder, node):
        import numpy as np
        from onnx import numpy_helper

        label, x, groups = builder.label(node), node.inputs[0], node.attrs["groups"]
        if "channels" not in node.attrs:
            raise Unsupported("channel shuffle without the traced channel count")
        split = builder.initializer(numpy_helper.from_array(
            np.array([0, groups, node.attrs["channels"] // groups, -1], dtype=np.int64), f"{label}.split"))
        builder.add("Reshape", [x, split], [f"{label}.grouped"], f"{label}/Reshape")
        builder.add("Transpose", [f"{label}.grouped"], [f"{label}.shuffled"], f"{label}/Transpose", perm=[0, 2, 1, 3])
        builder.add("Shape", [x], [f"{label}.shape"], f"{label}/Shape")
        builder.add("Reshape", [f"{label}.shuffled", f"{label}.shape"], [node.name], label)
        builder.rank[node.name] = builder.rank.get(x)


@register_op
class Roll(_Movement):
    """``torch.roll(x, shifts, dims)`` with the dims given (Swin's shifted windows): per dim, the last ``shift``
    entries moved to the front; TVM and ONNX as a slice of each part and a concatenation."""

    names = ("roll",)
    functions = (torch.roll, aten.roll.default)
    methods = ("roll",)
    keeps_integers = True
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = ("tests/test_ops_vit.py::test_tiny_family_goes_through_every_stage",)

    def describe(self, gm, node, frozen):
        shifts, dims = arg(node, 1, "shifts", None), arg(node, 2, "dims", None)
        shifts, dims = ([v] if isinstance(v, int) else v for v in (shifts, dims))
        if not dims or len(shifts) != len(dims) or not all(isinstance(v, int) for v in [*shifts, *dims]):
            raise Unsupported(f"roll by {shifts} along {dims} (literal shifts, one per dim, dims given)")
        return IntNode(node.name, "roll", [node.all_input_nodes[0].name], {"shifts": list(shifts), "dims": list(dims)})

    @staticmethod
    def fn(node: IntNode) -> Callable[[Tensor], Tensor]:
        return lambda t: torch.roll(t, node.attrs["shifts"], node.attrs["dims"])

    def _relax(self, lowering, node, value):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _shape

        def expr_fn(expr):
            shape = _shape(expr)  # (a roll keeps it)
            for shift, dim in zip(node.attrs["shifts"], node.attrs["dims"]):
                size = shape[dim]
                dim, shift = dim % len(shape), shift % size
                if shift:
                    expr = R.concat([R.strided_slice(expr, [dim], [size - shift], [size]),
                                     R.strided_slice(expr, [dim], [0], [size - shift])], axis=dim)
            return expr

        return relax_move(lowering, value, expr_fn, self.fn(node))

    def onnx(self, builder, node):
        import numpy as np
        from onnx import numpy_helper

        label, current = builder.label(node), node.inputs[0]
        steps = list(zip(node.attrs["shifts"], node.attrs["dims"]))

        def constant(name: str, values: list[int]) -> str:
            return builder.initializer(numpy_helper.from_array(np.array(values, dtype=np.int64), f"{label}.{name}"))

        for i, (shift, dim) in enumerate(steps):
            out = node.name if i == len(steps) - 1 else f"{label}.rolled{i}"
            if shift == 0:
                builder.add("Identity", [current], [out], f"{label}/Identity{i}")
            else:  # (the last |shift| entries first; a negative shift: the first |shift| entries last)
                axes = constant(f"axes{i}", [dim])
                builder.add("Slice", [current, constant(f"tail_start{i}", [-shift]), constant(f"end{i}", [2 ** 62]), axes],
                            [f"{label}.tail{i}"], f"{label}/SliceTail{i}")
                builder.add("Slice", [current, constant(f"zero{i}", [0]), constant(f"cut{i}", [-shift]), axes],
                            [f"{label}.head{i}"], f"{label}/SliceHead{i}")
                builder.add("Concat", [f"{label}.tail{i}", f"{label}.head{i}"], [out], f"{label}/Concat{i}", axis=dim)
            current = out
        builder.rank[node.name] = builder.rank.get(node.inputs[0])
