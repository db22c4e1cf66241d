"""Every op mpqc knows, one :class:`~mpqc.ops.registry.OpDef` per family (see ``mpqc/ops/registry.py``).

Importing this package registers the families below; passes and targets ask the registry (``op_of``,
``op_named``, ``is_nonnegative``, ``keeps_zero``, ``describe``, ...), never a table of their own.
"""
from mpqc.ops.registry import (IntNode, IntValue, OpDef, Unsupported, all_ops, dequantize, describe, has_property,
                               is_bookkeeping, is_nonnegative, keeps_zero, layer_ops, module_op, op_named, op_of,
                               register_op)
from mpqc.ops import (quantize, layers, arith, batchnorm, elementwise, movement, indexing, concat,  # noqa: E402,F401
                      pooling, adaptive, reduce, shape, lookup, norm, softmax, matmul,
                      embedding, expand)  # (importing them registers the families)

__all__ = ["IntNode", "IntValue", "OpDef", "Unsupported", "all_ops", "dequantize", "describe", "has_property",
           "is_bookkeeping", "is_nonnegative", "keeps_zero", "layer_ops", "module_op", "op_named", "op_of",
           "register_op"]
