"""The capture-side rewrites of transformer graphs, in order: SDPA and einsum decomposed, HF padding masks
recognized, constant additive masks (Swin's shifted windows) made keep masks, L2 normalizations and hand-written
RMSNorms fused, buffer-only computations folded, dead nodes erased (issue 15); ``nn.MultiheadAttention`` first
becomes linears around an SDPA.

Matches / Rewrites to / Ensures: those of its passes, run in this order (each module's docstring):
``decompose_mha`` -> ``decompose_attention`` -> ``decompose_einsum`` -> ``attention_masks`` ->
``constant_masks`` -> ``fuse_normalize`` -> ``fuse_rms_norm`` -> ``fold_constants`` -> ``dead_code``. On a graph
without attention, einsums, normalizations, masks or constant computations only the dead nodes go (a captured CNN is
unchanged).
Requires: a GraphModule from ``capture`` (shapes recorded); runs before ``functional_layers``
(``mpqc.pipeline.trace``).
"""
from __future__ import annotations

from torch import fx


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    from mpqc.passes.attention_masks import attention_masks
    from mpqc.passes.constant_masks import constant_masks
    from mpqc.passes.dead_code import erase_dead_code
    from mpqc.passes.decompose_attention import decompose_attention
    from mpqc.passes.decompose_einsum import decompose_einsum
    from mpqc.passes.decompose_mha import decompose_mha
    from mpqc.passes.fold_constants import fold_constants
    from mpqc.passes.fuse_normalize import fuse_normalize
    from mpqc.passes.fuse_rms_norm import fuse_rms_norm

    for rewrite in (decompose_mha, decompose_attention, decompose_einsum, attention_masks, constant_masks,
                    fuse_normalize, fuse_rms_norm, fold_constants, erase_dead_code):
        gm = rewrite(gm)
    return gm
