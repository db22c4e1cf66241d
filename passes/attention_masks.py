"""Recognize padding masks built from a ``[B, S]`` attention-mask input, and compute them in one op.

HF transformers build the attention mask of an encoder from the ``attention_mask`` input with index arithmetic
(``arange``, ``index``, ``&``, ``expand``, dtype casts: HF's ``sdpa_mask``), none of which the integer program has.
What they compute is a key padding mask: query ``i`` of sequence ``b`` may attend to key ``j`` iff
``attention_mask[b, j] != 0``.

Matches:     the keep mask (second argument) of every ``masked_softmax`` node (``passes/decompose_attention.py`` writes
             them from SDPA's mask) that is computed from exactly one graph input of rank 2 and constants (no
             module, no parameter), and that equals ``key_padding_mask(input)`` broadcast to its traced shape on
             probes (inputs read only for their size, ``input_ids.size(0)``, may be in its computation too): all ones, every single padded position at the end and at the start, and random 0/1 masks
             (seeded). Masks that are not padding masks (causal, sliding window, ...) are left as they are.
Rewrites to: ``key_padding_mask(input)`` (``mpqc/ops/softmax.py``: ``(m != 0)[:, None, None, :]``, one program op)
             as the keep mask; the nodes that computed the old mask are left to ``passes/dead_code.py``.
Requires:    a GraphModule from ``capture`` with ``node.meta["tensor_meta"]`` (the capture's ShapeProp) and
             ``decompose_attention`` run.
Ensures:     each rewritten ``masked_softmax`` gets a mask equal to the old one on every probe (the probes are the
             check; a mask that depends on the input in another way than through padding fails them). Modifies ``gm`` in place and returns it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from mpqc.ops.softmax import key_padding_mask, masked_softmax

PROBES = 8


def attention_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every recognized padding mask (see the module docstring)."""
    replaced: dict[fx.Node, fx.Node] = {}
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is masked_softmax]:
        mask = node.args[1]
        if not isinstance(mask, fx.Node) or (mask.op == "call_function" and mask.target is key_padding_mask):
            continue
        if mask not in replaced:
            source = _padding_source(gm, mask)
            if source is None:
                continue
            with gm.graph.inserting_after(source):
                replaced[mask] = gm.graph.call_function(key_padding_mask, (source,))
        node.replace_input_with(mask, replaced[mask])
    gm.graph.lint()
    gm.recompile()
    return gm


def _cone(mask: fx.Node) -> list[fx.Node]:
    """``mask`` and every node it is computed from."""
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return [n for n in mask.graph.nodes if n in seen]


def _padding_source(gm: fx.GraphModule, mask: fx.Node) -> fx.Node | None:
    """The rank-2 graph input ``mask`` is the key padding mask of, or None."""
    cone = _cone(mask)
    inputs = [n for n in cone if n.op == "placeholder" and not _shape_only(n, cone)]
    if len(inputs) != 1 or any(n.op == "call_module" for n in cone):
        return None
    if any(n.op == "get_attr" and isinstance(_attribute(gm, n.target), torch.nn.Parameter) for n in cone):
        return None
    source = inputs[0]
    in_meta, out_meta = source.meta.get("tensor_meta"), mask.meta.get("tensor_meta")
    if not hasattr(in_meta, "shape") or not hasattr(out_meta, "shape") or len(in_meta.shape) != 2 \
            or len(out_meta.shape) != 4 or out_meta.dtype != torch.bool:
        return None
    shape, out_shape = tuple(in_meta.shape), tuple(out_meta.shape)
    for probe in _probes(shape, in_meta.dtype):
        try:
            value = _evaluate(gm, cone, source, probe)
            expected = key_padding_mask(probe).expand(out_shape)
        except Exception:  # a mask the probes cannot run through is not one this pass knows
            return None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != out_shape or not torch.equal(value, expected):
            return None
    return source


def _shape_only(node: fx.Node, cone: list[fx.Node]) -> bool:
    """Whether the cone reads only ``node``'s shape (``x.size(0)``: the batch size of another input)."""
    users = [user for user in node.users if user in cone]
    return bool(users) and all(is_bookkeeping_target(user) for user in users)


def is_bookkeeping_target(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, getattr)) or \
        (node.op == "call_method" and node.target == "size")


def _probes(shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    batch, length = shape
    probes = [torch.ones(shape, dtype=dtype)]
    for padded in range(1, length):
        end, start = torch.ones(shape, dtype=dtype), torch.ones(shape, dtype=dtype)
        end[0, length - padded:] = 0
        start[-1, :padded] = 0
        probes += [end, start]
    generator = torch.Generator().manual_seed(0)
    probes += [torch.randint(0, 2, shape, generator=generator).to(dtype) for _ in range(PROBES)]
    return probes


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _evaluate(gm: fx.GraphModule, cone: list[fx.Node], source: fx.Node, probe: torch.Tensor) -> Any:
    env: dict[fx.Node, Any] = {}
    for node in cone:
        if node is source:
            env[node] = probe
            continue
        if node.op == "placeholder":  # read for its shape only: the traced shape
            env[node] = torch.zeros(tuple(node.meta["tensor_meta"].shape))
            continue
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "get_attr":
            env[node] = _attribute(gm, node.target)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"unexpected node {node.format_node()}")
    return env[cone[-1]]

