"""Erase the nodes of a captured graph whose values nothing uses.

Matches:     ``call_function`` / ``call_method`` / ``get_attr`` / ``call_module`` nodes without users (transitively: a
             pretrained model's pooler that the wrapper around it does not return), and export's run-time checks
             (``aten._assert_tensor_metadata``, ``aten._assert_scalar``) of values that are otherwise unused. torch.export
             records such dead nodes (HF's mask construction leaves an ``arange -> unsqueeze`` chain nothing reads),
             and ``attention_masks`` / ``fold_constants`` leave the nodes they replaced.
Rewrites to: nothing: the nodes are erased (a ``get_attr``'s or ``call_module``'s attribute stays on its module, so
             a state dict still loads). Export's ``_guards_fn`` shape guard, placeholders and the output stay, and
             so do in-place writes (``mpqc.ops.constants.mutates``: Swin's window mask is ``new_zeros`` filled
             slice by slice with ``fill_`` nodes nothing reads; erasing them lost the mask).
Requires:    nothing.
Ensures:     the graph computes the same outputs; every remaining call node is used (or a check of a used value).
             Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

from torch import fx

from mpqc.ops.constants import mutates
from mpqc.ops.registry import calls
from mpqc.ops.shape import Assertion


#: The module torch.export calls to check the input shapes (no users, kept).
SHAPE_GUARD = "_guards_fn"


def erase_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op not in ("call_function", "call_method", "get_attr", "call_module") or node.users:
                continue
            if (node.op == "call_module" and node.target == SHAPE_GUARD) or mutates(node):
                continue
            if calls(node, Assertion.functions) and any(_live(arg) for arg in node.all_input_nodes):
                continue
            gm.graph.erase_node(node)
            changed = True
    gm.graph.lint()
    gm.recompile()
    return gm


def _live(node: fx.Node) -> bool:
    """Whether ``node``'s value is used by anything but checks."""
    return node.op in ("placeholder", "get_attr") or any(not calls(user, Assertion.functions) for user in node.users)
