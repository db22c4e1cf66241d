"""The int8 layer kernels of the TVM target, one module per instruction set, and the registry that picks one per
layer from the target's features and the layer's bit-widths (``registry.py``).

* ``amx.py``: ``tdpbusd`` on AMX tile registers (Sapphire Rapids and later Xeons), convs whose channels fill
  64-byte tile rows; the rest of an AMX module on AVX-512 VNNI;
* ``avx512_vnni.py``: ``vpdpbusd`` micro-kernel (AVX-512 VNNI CPUs), at any lane count;
* ``avx_vnni.py``: the same at 8 lanes, the VEX ``vpdpbusd ymm`` (AVX-VNNI CPUs: Alder Lake, Zen 5);
* ``avx2.py``: ``vpmaddubsw`` -> ``vpmaddwd`` micro-kernels, narrow, wide or int16 multi-step from the bits;
* ``generic.py``: TVM's own int8 operators (every other layer and target);
* ``implicit_gemm.py``: the NHWC implicit-GEMM convolution and schedule the x86 ISAs share.

Importing this package does not import TVM.
"""
from mpqc.targets.tvm.kernels.registry import (BY_ISA, ISAS, KERNELS, MICRO_KERNELS, VNNI_BLOCK, Kernel, LayerFacts,
                                               choose, find_micro_kernel, is_kernel_block, isa_target, resolve_isa,
                                               target_isas)

__all__ = ["BY_ISA", "ISAS", "KERNELS", "MICRO_KERNELS", "VNNI_BLOCK", "Kernel", "LayerFacts", "choose",
           "find_micro_kernel", "is_kernel_block", "isa_target", "resolve_isa", "target_isas"]
