"""Recognize a constant additive mask in front of a softmax (Swin's shifted-window mask) and make it a keep mask.

torchvision's Swin adds a constant 0/-100 mask to the attention scores of shifted windows
(``attn.view(B // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)``, viewed back, then ``softmax(-1)``). Left as
an add, the softmax input quantizer's range must cover -100 (swin_t: a scale of 0.79 at 8 bits, 6.67 at 5 bits), and
every unmasked score of a shifted block falls on code 0. As a keep mask the quantizer sees only the scores.

Matches:     a softmax (``aten.softmax.int`` without a dtype, ``aten._softmax`` without ``half_to_float``,
             ``torch.softmax`` / ``F.softmax`` / ``Tensor.softmax`` without a dtype) over the last dim, whose input
             is ``x + M`` (``aten.add.Tensor`` / ``torch.add`` / ``operator.add`` / ``Tensor.add``, alpha 1) through
             reshapes that keep the last dim (``view``, ``reshape``, ``_unsafe_view``: rows stay rows), each node of
             that chain read by the next only; ``M`` a floating constant (``mpqc/ops/constants.py``'s
             ``is_constant``: Swin's mask, folded when the program is built) broadcasting into ``x`` (the add's
             shape is ``x``'s), ``x`` not constant; and ``M`` a mask along the softmax rows: in every row (``M``
             broadcast to the add's rank, along its last dim) every entry equals the row's maximum ``r`` or is
             ``<= r - GAP``, at least one entry of ``M`` is masked and every ``r`` is finite. Anything else (a
             relative position bias, a row of all ``-inf``, which torch turns into NaN) is left as it is.
Rewrites to: ``masked_softmax(x, keep, -1)`` (``mpqc/ops/softmax.py``) followed by the same reshapes, ``keep = (M ==
             r)`` broadcast as the add did (a bool buffer of ``M``'s broadcast shape, not the batch's: any batch
             size) read by a ``get_attr``; the softmax node itself becomes the masked softmax, moved before the
             reshapes (its name, so its quantizers' names, kept); the add goes, the nodes computing ``M`` are left
             to ``passes/dead_code.py``.
Requires:    a GraphModule from ``capture`` with ``node.meta["tensor_meta"]`` (the capture's ShapeProp).
Ensures:     the same softmax in exact arithmetic up to the masked entries' weights: softmax is shift-invariant, so
             the kept entries (``M == r``) lose only ``r``; a masked entry ``j`` of torch's result weighs
             ``exp(x_j + M_j - r - max_kept x) <= exp(D - GAP)`` relative to the largest kept one, ``D = x_j -
             max_kept x``. In fp32 the result is unchanged (below half an ulp of every kept
             weight) while ``N * exp(D - GAP) < 2**-24``, i.e. ``D < GAP - 16.6 - ln N``: 33 - ln N for GAP = 50,
             83 - ln N for Swin's -100 (scaled dot products of LayerNormed tokens are far below); where torch's
             masked weight is a denormal (``exp(D - 100)``) the rewrite's is 0. A fully masked row of ``M`` (all
             ``-100``) keeps every entry: torch's ``softmax(x - 100)`` is ``softmax(x)`` in exact arithmetic (torch
             rounds ``x - 100`` in fp32, half an ulp of 100 = 4e-6 on each score; the rewrite does not). Rows whose
             maximum is 0 (every row of Swin's mask: a query is always in its own region) are bit-equal on
             the kept entries.
             Modifies ``gm`` in place and returns it.

Why ``GAP = 50``: masks are written with -100 (Swin), -1e4, -1e9, ``finfo.min`` or ``-inf``, all far past it, while
``exp(-50) ~ 2e-22`` already makes an entry negligible in fp32 unless its score beats the kept maximum by more than
~33 - ln N; a graded bias (relative positions, ALiBi) has entries within 50 of its row maximum and is refused.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from mpqc.ops.constants import constant_value, is_constant
from mpqc.ops.registry import arg, calls
from mpqc.ops.softmax import masked_softmax

aten = torch.ops.aten

GAP = 50.0  # a mask entry is masked out iff it is at least this far below its row's maximum (see the docstring)
_SOFTMAX = (aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax, "softmax")
_RESHAPE = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape, "view", "reshape")
_ADD = (aten.add.Tensor, torch.add, operator.add, "add")
_BUFFER = "_mpqc_keep_mask"


def constant_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite every matching ``softmax(x + M)`` (see the module docstring)."""
    for node in [n for n in gm.graph.nodes if calls(n, _SOFTMAX)]:
        found = _match(gm, node)
        if found is not None:
            _rewrite(gm, node, *found)
    gm.graph.lint()
    gm.recompile()
    return gm


def mask_keep(mask: Tensor, rank: int) -> Tensor | None:
    """The keep mask of the additive ``mask`` broadcast to ``rank`` dims along its last dim (``mask == row max``),
    or None where ``mask`` is not a mask (an entry within ``GAP`` below its row maximum that is not the maximum, a
    row maximum that is not finite, nothing masked)."""
    if not mask.is_floating_point() or mask.dim() > rank:
        return None
    mask = mask.reshape((1,) * (rank - mask.dim()) + tuple(mask.shape))
    row_max = mask.amax(-1, keepdim=True)
    keep = mask == row_max
    if not bool(torch.isfinite(row_max).all()) or bool(keep.all()) or bool((~keep & (mask > row_max - GAP)).any()):
        return None
    return keep


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None


def _match(gm: fx.GraphModule, softmax: fx.Node) -> tuple[fx.Node, fx.Node, Tensor] | None:
    """``(add, x, keep)`` for a matching softmax, else None."""
    if softmax.target in ("softmax", torch.softmax, F.softmax, aten.softmax.int):
        if arg(softmax, 2, "dtype", None) is not None:
            return None
    elif arg(softmax, 2, "half_to_float", False):
        return None
    source, shape = softmax.args[0] if softmax.args else None, _shape(softmax)
    dim = arg(softmax, 1, "dim", None)
    if not isinstance(source, fx.Node) or shape is None or not isinstance(dim, int) or dim not in (-1, len(shape) - 1):
        return None
    while calls(source, _RESHAPE):  # rows stay rows: the last dim is the same on both sides
        before = source.args[0]
        if not isinstance(before, fx.Node) or len(before.users) != 1 or _shape(before) is None \
                or _shape(source) is None or _shape(before)[-1:] != _shape(source)[-1:]:
            return None
        source = before
    if not calls(source, _ADD) or len(source.users) != 1 or arg(source, 2, "alpha", 1) != 1 or len(source.args) < 2:
        return None
    for x, mask in (source.args[:2], source.args[1::-1]):
        if not isinstance(x, fx.Node) or not isinstance(mask, fx.Node) or _shape(x) != _shape(source) \
                or not is_constant(gm, mask) or is_constant(gm, x):
            continue
        keep = mask_keep(constant_value(gm, mask), len(_shape(source)))
        if keep is not None:
            return source, x, keep
    return None


def _rewrite(gm: fx.GraphModule, softmax: fx.Node, add: fx.Node, x: fx.Node, keep: Tensor) -> None:
    """The softmax node itself becomes the masked softmax, moved before the reshapes (its name, so its quantizers'
    names, stay: checkpoints and reports)."""
    graph, index = gm.graph, 0
    while hasattr(gm, f"{_BUFFER}_{index}"):
        index += 1
    gm.register_buffer(f"{_BUFFER}_{index}", keep)
    with graph.inserting_before(add):
        keep_node = graph.get_attr(f"{_BUFFER}_{index}")
    keep_node.meta["tensor_meta"] = _extract_tensor_metadata(keep)
    softmax.replace_all_uses_with(softmax.args[0])  # its readers read the reshaped probabilities
    softmax.op, softmax.target, softmax.args, softmax.kwargs = "call_function", masked_softmax, (x, keep_node, -1), {}
    add.prepend(softmax)
    softmax.meta["tensor_meta"] = add.meta["tensor_meta"]
    add.replace_all_uses_with(softmax)
    graph.erase_node(add)
