"""Fold eval-mode BatchNorm into the convolution or linear layer that feeds it.

Matches:      ``call_module`` conv1d|conv2d|conv3d|linear  ->  ``call_module`` BatchNorm1d|2d|3d, where
              - the producer's output has no other user and its module is called by no other node;
              - both modules are in eval mode, the BatchNorm tracks running statistics, and both keep the torch.nn
                ``forward`` (a subclass that overrides it is left alone);
              - the BatchNorm's channel dimension is the producer's output channel dimension: always so for
                conv2d/conv3d (BatchNorm2d/3d accept batched input only); for conv1d and linear the producer's output
                rank must be known from ``node.meta["tensor_meta"]`` (written by ``capture`` and ``ShapeProp``) or
                ``node.meta["val"]`` and be 3 (conv1d) or 2 (linear).
Rewrites to:  the producer alone, its submodule replaced by a new one whose weight and bias absorb the BatchNorm
              (``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``, which copy the module); the
              BatchNorm node is erased and its submodule deleted once no node uses it.
Requires:     a GraphModule from ``capture`` (or any graph with conv/linear/batchnorm as ``call_module`` nodes).
Ensures:      every matched BatchNorm is gone; outputs equal to about 1e-5 relative (tested on a model zoo).
              Modifies ``gm`` in place and returns it.
Leaves alone: BatchNorm after anything else or after a producer with other users (the producer's unnormalised
              output is still needed), a linear followed by a BatchNorm without affine parameters, and functional
              ``aten.batch_norm`` / ``F.batch_norm`` calls (``capture`` turns BatchNorm modules into ``call_module``
              nodes on both of its paths, so only BatchNorm written functionally is left as a call).
"""
from __future__ import annotations

import logging

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from mpqc.passes.capture import is_kept_module

log = logging.getLogger(__name__)

#: Producer type -> the BatchNorm type that may follow it, and the producer output rank that puts channels at dim 1
#: (None: guaranteed by the BatchNorm type itself).
_FOLDABLE: dict[type[nn.Module], tuple[type[nn.Module], int | None]] = {
    nn.Conv1d: (nn.BatchNorm1d, 3),
    nn.Conv2d: (nn.BatchNorm2d, None),
    nn.Conv3d: (nn.BatchNorm3d, None),
    nn.Linear: (nn.BatchNorm1d, 2),
}


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every eval-mode BatchNorm whose input is a conv/linear used only by it (see the module docstring)."""
    for bn_node in [n for n in gm.graph.nodes if _is_batchnorm_call(gm, n)]:
        producer = bn_node.args[0]
        reason = _why_not_foldable(gm, producer, bn_node)
        if reason is not None:
            log.debug("fold_batchnorm: leaving %s: %s", bn_node.format_node(), reason)
            continue
        layer, bn = gm.get_submodule(producer.target), gm.get_submodule(bn_node.target)
        fused = fuse_linear_bn_eval(layer, bn) if isinstance(layer, nn.Linear) else fuse_conv_bn_eval(layer, bn)
        gm.set_submodule(producer.target, fused)
        bn_node.replace_all_uses_with(producer)
        gm.graph.erase_node(bn_node)
        if not any(_references(n, bn_node.target) for n in gm.graph.nodes):
            gm.delete_submodule(bn_node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def _is_batchnorm_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)


def _why_not_foldable(gm: fx.GraphModule, producer: object, bn_node: fx.Node) -> str | None:
    """None if ``producer -> bn_node`` can be folded, else the reason it cannot."""
    if not isinstance(producer, fx.Node) or producer.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
        return "its input is not a module call"
    layer, bn = gm.get_submodule(producer.target), gm.get_submodule(bn_node.target)
    kind = next((t for t in _FOLDABLE if isinstance(layer, t)), None)
    if kind is None or not is_kept_module(layer):
        return f"its input {producer.name} is not a plain conv/linear module"
    bn_type, rank = _FOLDABLE[kind]
    if not isinstance(bn, bn_type) or not is_kept_module(bn):
        return f"{type(bn).__name__} does not normalise the channels of {kind.__name__}"
    if len(producer.users) != 1:
        return f"{producer.name} has other users"
    if sum(_references(n, producer.target) for n in gm.graph.nodes) != 1:
        return f"module {producer.target} is called more than once"
    if layer.training or bn.training or not bn.track_running_stats or bn.running_mean is None:
        return "not in eval mode with running statistics"
    if isinstance(layer, nn.Linear) and not bn.affine:
        return "BatchNorm without affine parameters after a linear"
    if rank is not None and _output_rank(producer) != rank:
        return f"the output rank of {producer.name} is {_output_rank(producer)}, not {rank}"
    return None


def _output_rank(node: fx.Node) -> int | None:
    if "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape"):
        return len(node.meta["tensor_meta"].shape)
    if "val" in node.meta and hasattr(node.meta["val"], "shape"):
        return len(node.meta["val"].shape)
    return None


def _references(node: fx.Node, path: str) -> bool:
    """True if ``node`` calls the module at ``path`` or reads one of its attributes."""
    if node.op not in ("call_module", "get_attr"):
        return False
    return node.target == path or node.target.startswith(path + ".")
