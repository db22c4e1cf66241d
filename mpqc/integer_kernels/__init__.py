"""Integer kernels of transformer ops, each one semantics in three backends: a torch reference (int64, the one
definition), a TVM Relax emitter (bit-exact with the reference) and an ONNX subgraph (run by onnxruntime on the CPU
with default options; bit-exact too). Standalone building blocks: the op registry (``mpqc/ops``) wraps them in
``OpDef`` classes.

=================  ===============================  =====================================================
module             spec (frozen dataclass)          semantics
=================  ===============================  =====================================================
``softmax``        :class:`IntegerSoftmax`          exp table over the code distance from the row maximum,
                                                    integer normalization, boolean keep mask
``norm``           :class:`IntegerNorm`             LayerNorm / RMSNorm: integer mean and variance, Newton
                                                    integer square root, exact rational affine step
``matmul``         :class:`IntegerMatmul`           activation x activation, batched, int32 accumulation
                                                    (ONNX: MatMulInteger on uint8 storage)
``lut``            :class:`IntegerTable`,           2^b-entry tables (GELU erf/tanh, tanh); per-row
                   :class:`IntegerEmbedding`        quantized embedding gather
``arith``          —                                round-half-even division, integer square root
``backends``       —                                ONNX graph builder; build-and-run helpers
=================  ===============================  =====================================================

Each kernel module gives ``<op>_reference(q, spec)``, ``<op>_relax(bb, q, spec)`` and ``<op>_onnx(g, q, spec)``
on int64 codes; ``tests/test_integer_kernels.py`` checks every pair bit for bit.

>>> from mpqc.integer_kernels.softmax import IntegerSoftmax, softmax_reference
>>> import torch
>>> softmax_reference(torch.tensor([[10, 10, -10]]), IntegerSoftmax(in_bits=8, in_scale=0.1)).tolist()
[[119, 119, 16]]
"""
