"""Indexing: split/chunk (and the ``getitem`` that picks a part), basic indexing with ints, slices, ``None`` and
``...``.

Both keep integers exact (see ``mpqc/ops/movement.py`` for how a scale moves with its codes):

* ``split`` (``chunk``, ``split``): its value is the list of parts, each an integer value with its part of the
  scale; ``getitem`` picks one (an fx ``operator.getitem`` on a split). Inside a requantisation region the list
  holds the parts in units of ``s_out``.
* ``slice`` (``x[:, 1:3, ::2, None, 0]``, ATen ``slice``/``select``): basic indexing; steps > 0; bounds that are
  run-time values are refused.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from mpqc.errors import MpqcError
from mpqc.ops.movement import MOVEMENT_TESTS
from mpqc.ops.scales import move, relax_move
from mpqc.ops.registry import IntNode, OpDef, Unsupported, arg, op_of, register_op

aten = torch.ops.aten
INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------------- split / getitem
@register_op
class Split(OpDef):
    """``torch.split`` / ``chunk``: a list of parts along ``dim`` (their sizes from the traced shapes)."""

    names = ("split",)
    functions = (torch.split, torch.chunk, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
    methods = ("split", "chunk")
    keeps_integers = True
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = MOVEMENT_TESTS

    def describe(self, gm, node, frozen):
        dim = arg(node, 2, "dim", 0)
        meta = node.meta.get("tensor_meta")
        spec = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()), None)
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape") and all(hasattr(m, "shape") for m in meta):
            sizes = [int(m.shape[dim]) for m in meta]
        elif isinstance(spec, (tuple, list)) and all(isinstance(s, int) for s in spec):
            sizes = list(spec)
        else:
            raise Unsupported("split/chunk into parts whose sizes the capture did not record")
        return IntNode(node.name, "split", [node.all_input_nodes[0].name], {"dim": int(dim), "sizes": sizes})

    @staticmethod
    def bounds(node: IntNode) -> list[tuple[int, int]]:
        starts = np.cumsum([0] + node.attrs["sizes"])
        return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    def evaluate(self, program, node, env):
        dim = node.attrs["dim"]
        return [move(env[node.inputs[0]], lambda t, a=a, b=b: t.narrow(dim, a, b - a)) for a, b in self.bounds(node)]

    def requantize_step(self, node, inputs, s_out):
        return list(torch.split(inputs[0], node.attrs["sizes"], node.attrs["dim"]))

    def relax(self, lowering, node):
        return self._relax(lowering, node, lowering.env[node.inputs[0]])

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        return self._relax(lowering, node, inputs[0])

    def _relax(self, lowering, node, value):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _shape

        dim = node.attrs["dim"]
        parts = []
        for a, b in self.bounds(node):
            parts.append(relax_move(lowering, value, lambda e, a=a, b=b: R.strided_slice(
                e, [dim % len(_shape(e))], [a], [b]), lambda t, a=a, b=b: t.narrow(dim, a, b - a)))
        return parts

    def onnx(self, builder, node):
        from onnx import numpy_helper

        label, sizes = builder.label(node), node.attrs["sizes"]
        split = builder.initializer(numpy_helper.from_array(np.array(sizes, dtype=np.int64), f"{label}.split"))
        builder.add("Split", [node.inputs[0], split], [f"{node.name}.{i}" for i in range(len(sizes))], label,
                    axis=node.attrs["dim"])
        builder.rank[node.name] = builder.rank.get(node.inputs[0])


def encode_index(index: Any) -> list:
    """A basic index as JSON: ints, ``[start, stop, step]`` for slices, ``None``, ``"..."``."""
    entries = []
    for item in index if isinstance(index, tuple) else (index,):
        if item is None or isinstance(item, int) and not isinstance(item, bool):
            entries.append(item)
        elif item is Ellipsis:
            entries.append("...")
        elif isinstance(item, slice):
            bounds = [item.start, item.stop, item.step]
            if not all(b is None or isinstance(b, int) for b in bounds):
                raise Unsupported(f"a slice with bounds computed at run time ({item})")
            if item.step is not None and item.step <= 0:
                raise Unsupported(f"a slice with step {item.step}")
            entries.append(bounds)
        elif isinstance(item, (list, tuple, torch.Tensor)) or hasattr(item, "op"):
            raise Unsupported(f"advanced indexing with a list or tensor of indices ({item}): basic indexing only "
                              "(ints, slices, None, ...)")
        else:
            raise Unsupported(f"indexing with {type(item).__name__} (ints, slices, None and ... only)")
    return entries


def decode_index(entries: list) -> tuple:
    return tuple(Ellipsis if e == "..." else slice(*e) if isinstance(e, list) else e for e in entries)


def expanded_index(entries: list, rank: int) -> list:
    """``entries`` with ``...`` replaced by the full slices it stands for (``rank``: the indexed value's)."""
    consumed = sum(1 for e in entries if e is not None and e != "...")
    if consumed > rank:
        raise MpqcError(f"an index of {consumed} dims into a rank-{rank} value")
    out, filled = [], False
    for e in entries:
        if e == "..." and not filled:
            out += [[None, None, None]] * (rank - consumed)
            filled = True
        elif e != "...":
            out.append(e)
    return out + [[None, None, None]] * (rank - consumed if not filled else 0)


@register_op
class GetItem(OpDef):
    """``operator.getitem``: a part of a ``split`` (program op ``getitem``) or basic indexing of a tensor
    (``slice``; ATen ``slice``/``select`` too). On shapes (``x.size()[0]``) it is bookkeeping."""

    names = ("getitem", "slice")
    functions = (operator.getitem, aten.slice.Tensor, aten.select.int)
    keeps_integers = True
    sign = "preserving"
    fuses_into_requantize = True
    numerics_tests = MOVEMENT_TESTS

    def describe(self, gm, node, frozen):
        source = node.all_input_nodes[0]
        if node.target is operator.getitem:
            index = node.args[1]
            if isinstance(op_of(gm, source), Split):
                if not isinstance(index, int):
                    raise Unsupported(f"a part of a split picked by {index!r}")
                return IntNode(node.name, "getitem", [source.name], {"index": index})
            meta = source.meta.get("tensor_meta")
            if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):  # (TensorMetadata: a NamedTuple)
                raise Unsupported(f"a result of {source.name}, an op with several results other than split/chunk")
            entries = encode_index(index)
        else:
            dim = arg(node, 1, "dim", 0)
            if node.target is aten.select.int:
                entry = arg(node, 2, "index", None)
            else:
                entry = [arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)]
            entries = encode_index(decode_index([entry]))
            entries = ([[None] * 3] * dim + entries if dim >= 0 else ["..."] + entries + [[None] * 3] * (-dim - 1))
        return IntNode(node.name, "slice", [source.name], {"index": entries})

    def evaluate(self, program, node, env):
        value = env[node.inputs[0]]
        if node.op == "getitem":
            return value[node.attrs["index"]]
        index = decode_index(node.attrs["index"])
        return move(value, lambda t: t[index])

    def requantize_step(self, node, inputs, s_out):
        if node.op == "getitem":
            return inputs[0][node.attrs["index"]]
        return inputs[0][decode_index(node.attrs["index"])]

    def relax(self, lowering, node):
        return self._relax(lowering, node, lowering.env[node.inputs[0]])

    def relax_requantize_step(self, lowering, node, inputs, s_out):
        return self._relax(lowering, node, inputs[0])

    def _relax(self, lowering, node, value):
        from tvm.relax import op as R

        from mpqc.targets.tvm import _shape

        if node.op == "getitem":
            return value[node.attrs["index"]]
        index = decode_index(node.attrs["index"])

        def expr_fn(expr):
            shape = _shape(expr)
            axes, begin, end, strides = [], [], [], []
            dim = 0
            for e in expanded_index(node.attrs["index"], len(shape)):
                if e is None:
                    continue
                start, stop, step = (e % shape[dim], e % shape[dim] + 1, 1) if isinstance(e, int) else \
                    slice(*e).indices(shape[dim])
                if (start, stop, step) != (0, shape[dim], 1):
                    axes.append(dim)
                    begin.append(start)
                    end.append(max(stop, start))
                    strides.append(step)
                dim += 1
            sliced = R.strided_slice(expr, axes, begin, end, strides) if axes else expr
            return R.reshape(sliced, list(torch.empty(shape, device="meta")[index].shape))

        return relax_move(lowering, value, expr_fn, lambda t: t[index])

    def onnx(self, builder, node):
        from onnx import numpy_helper

        label, x = builder.label(node), node.inputs[0]
        if node.op == "getitem":
            builder.add("Identity", [f"{x}.{node.attrs['index']}"], [node.name], label)
            builder.rank[node.name] = builder.rank.get(x)
            return
        known = builder.rank.get(x)
        entries = node.attrs["index"]
        if known is None and "..." in entries:
            raise Unsupported("indexing with ... of a tensor of unknown rank: pass input_shapes")
        rank = known if known is not None else sum(1 for e in entries if e is not None)
        starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
        dim = out = 0
        for e in expanded_index(entries, rank):
            if e is None:
                unsqueeze.append(out)
                out += 1
                continue
            if isinstance(e, int):
                starts.append(e), ends.append(INT64_MAX if e == -1 else e + 1), axes.append(dim), steps.append(1)
                squeeze.append(dim)
            else:
                out += 1
                if e != [None, None, None]:
                    start, stop, step = e
                    starts.append(start or 0), ends.append(INT64_MAX if stop is None else stop)
                    axes.append(dim), steps.append(step or 1)
            dim += 1

        def constant(name: str, values: list[int]) -> str:
            return builder.initializer(numpy_helper.from_array(np.array(values, dtype=np.int64), f"{label}.{name}"))

        current = x
        stages = [("Slice", axes, lambda i: [i, constant("starts", starts), constant("ends", ends),
                                             constant("axes", axes), constant("steps", steps)]),
                  ("Squeeze", squeeze, lambda i: [i, constant("squeeze", squeeze)]),
                  ("Unsqueeze", unsqueeze, lambda i: [i, constant("unsqueeze", unsqueeze)])]
        stages = [stage for stage in stages if stage[1]] or [("Identity", [0], lambda i: [i])]
        for k, (onnx_op, _, inputs) in enumerate(stages):
            output = node.name if k == len(stages) - 1 else f"{label}.{onnx_op.lower()}d"
            builder.add(onnx_op, inputs(current), [output], f"{label}/{onnx_op}")
            current = output
        builder.rank[node.name] = out if known is not None else None
