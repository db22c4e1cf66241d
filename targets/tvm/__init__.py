"""Lower an integer program to Apache TVM (Relax + TIR), bit for bit equal to the reference.

>>> lowered = lower(compiled, target="llvm", input_shape=(1, 1, 28, 28), out="artifacts/r20")   # doctest: +SKIP
>>> lowered(images)            # fp32 outputs, torch.equal to compiled.program.run(images)            # doctest: +SKIP
>>> lower(compiled, target="cuda:sm_90", input_shape=(1, 1, 28, 28)).source()[:80]                    # doctest: +SKIP

*Matches*: every node of an :class:`~mpqc.reference.IntegerProgram` through its op family in the registry
(``mpqc/ops/``: ``OpDef.relax``, ``relax_check``); nodes whose op has no converter, or whose attributes the converter refuses (more than 8 bits,
a 16-bit activation, ...), raise one :class:`~mpqc.errors.UnsupportedOpError` listing every such node.

*Rewrites to* one Relax function ``main(x_0, ..., <node>.weight, <node>.bias, ...)`` built with
``relax.BlockBuilder`` and ``relax.op``, mirroring ``mpqc.reference`` value for value, and a second function
``unpack_weights(packed) -> (weights...)`` (below, *Artifact*):

* ``quantize`` -> its requantisation region (the node's ``region``: leaves, then steps, each op's
  ``relax_requantize_step``) in fp32, then round half to even, ``clip`` to the b-bit range and a
  cast to ``int8`` (signed) or ``uint8`` (``_round_clip_te``: ``llvm.roundeven`` on CPU, which vectorizes where
  Relax ``round``'s ``nearbyint`` did not; Relax ``round`` -> ``nearbyintf`` on CUDA; both checked on ties).
  The per-channel multipliers ``M = fp32(float64(s_in) / float64(s_out))`` are computed on the host with the
  reference's own torch float64 expressions and embedded as fp32 constants.
* ``conv2d`` (groups 1) / 2-D ``linear`` on an llvm target with AVX512-VNNI, AVX-VNNI or AVX2 (the kernel table
  ``kernels/registry.py``, asked per layer; ``lower(..., isa=)`` / ``vnni=`` force a choice): the implicit-GEMM
  kernel of ``kernels/implicit_gemm.py`` on NHWC uint8 codes (a signed input is shifted by the kernel's shift, VNNI
  128, AVX2 ``2^(bits-1)``, and ``shift * sum(w)`` is subtracted from the int32 bias, exactly) with the weights
  packed ``[Co/16, KH*KW*C/4, 16, 4]``, tensorized by a hand schedule with ``vpdpbusd`` (VNNI: zmm; AVX-VNNI:
  ``{vex}`` ymm) or the AVX2
  micro-kernels of ``kernels/avx2.py`` (narrow, wide or int16 multi-step, from the layer's bits). The
  accumulator stays NHWC, and so does everything computed from it elementwise (requantisation, ReLU, clamps, residual adds, max pooling,
  integer global pooling); the converters that need the program's NCHW layout (flatten, cat, average pooling,
  fp32 global mean, TVM's own convs other than grouped ones, the outputs) transpose back first
  (``_Lowering.in_layout``).
* other ``conv1d`` / ``conv2d`` (grouped and depthwise too) / ``linear``, and every layer on other targets ->
  ``conv1d`` / ``conv2d`` / ``matmul`` on the 8-bit codes and int8 weights with ``out_dtype="int32"``, plus the
  int32 bias: the exact accumulator (a grouped conv2d of a channels-last value in NHWC on ``hwio`` weights).
* ``relu``, max pools, ``identity`` and data movement (``mpqc/ops/movement.py``) on integers stay integer; a max
  pool or move requantised by a quantize node alone runs after the rounding, on the 8-bit codes
  (``OpDef.commutes_with_rounding``);
  ``global_avg_pool``, ``adaptive_avg_pool`` and ``avg_pool2d`` (any padding, ``ceil_mode``), ``mean``/``sum``
  on integers are int sums (int32, or int64 when summing int32 accumulators), scaled per position by PyTorch's
  divisor.
* every fp32 product is an *exact multiply* (``_exact_mul_te``): TVM's LLVM backend builds with
  ``AllowFPOpFusion=Fast`` (hard-coded in ``llvm_instance.cc``; no target option turns it off), so ``a*b + c``
  becomes one FMA with a single rounding (a quarter of such sums changed in a test here). The product is
  wrapped in ``llvm.arithmetic.fence`` (free at run time; the backend may not contract across it). On CUDA,
  where nvcc contracts too, the product is ``__fmul_rn``, which is never contracted.
* float ``global_avg_pool`` (on a dequantized value, e.g. MobileNetV2's last ReLU6) reproduces PyTorch's CPU
  summation order (``at::mean`` -> ``cascade_sum``: 8-lane vector accumulators, 4-way ILP) as an unrolled add
  tree, then divides by the count; checked equal to ``F.adaptive_avg_pool2d`` for windows up to 1000 elements.
  Larger windows lower to the same tree but are flagged in ``LoweredModule.inexact``. Float ``avg_pool2d`` sums
  each window in order then divides, as ATen's CPU kernel does.

*Requires*: a frozen program (8-bit storage activations feeding every layer), static input shapes.

*Ensures* (``tests/test_tvm.py``): on llvm, the dequantized outputs and the 8-bit codes of every quantize node
are ``torch.equal`` to ``IntegerProgram.run_all`` on ResNet-20, torchvision ResNet-18 and MobileNetV2 at mixed
2-8 bits (and on small models covering the other converters); the CPU code holds no FMA instruction; the exported
artifact runs in a process where torch and mpqc cannot be imported; the CUDA module compiles for sm_80 and sm_90
and its kernels accumulate in int32. Every schedule (default rule, dlight, MetaSchedule records) only reorders
loops (the VNNI kernels: exact int32 dot products, tested against float64 convolutions), so these hold after
tuning too (re-checked by the slow tuning test); with and without VNNI (a target lacking the feature).

*Artifact* (``out=DIR``): ``model.so`` (``Executable.export_library``, both functions), ``params.bin``
(``tvm.runtime.save_param_dict``: ``weights.packed``, every weight bit-packed at its own bit-width in one uint8
array, within one byte per layer of ``sum(bits * params) / 8`` (``weights.py``), and the int32
biases), ``model.json`` (inputs, outputs, parameter order, the packed weights' layout, input quantizer
scale/bits, per-layer bits, the VNNI layers, target, the kernels' ``isa`` and the ``cpu_flags`` they need, which
the loader checks against /proc/cpuinfo before running) and ``loader.py`` (a copy of the runtime-only module
``loader.py``). The weights are unpacked inside the module: ``unpack_weights`` runs once when the artifact is
loaded (``loader.load``, or the first call of a ``LoweredModule``) and its outputs are ``main``'s weight arguments
from then on, so an inference costs no unpacking.

Threads: TVM's runtime here starts one worker unless ``TVM_NUM_THREADS`` is set before the first run; set it to the
number of physical cores.

*Modules* (one job each): ``target.py`` (host features -> LLVM target, ``resolve_target``), ``lowering.py``
(the program -> Relax core, ``_Lowering``; op converters live in ``mpqc/ops/*``), ``values.py`` / ``te.py``
(the values converters pass, the TE kernels whose arithmetic is fixed), ``layers.py`` (conv/linear through the
kernel the registry picks), ``kernels/`` (one module per ISA plus ``registry.py``), ``weights.py`` (bit-packed
storage), ``schedule.py`` (CPU schedules and tuning), ``build.py`` (``lower``, ``compile_module``), ``runtime.py``
(``LoweredModule``, ``load``), ``loader.py`` (the artifact's loader, TVM and NumPy only), ``latency.py`` (the
measured per-layer latency table of the ``latency`` budget), ``between_layers.py`` (the work between the layers,
measured once per model, which that budget adds).
Importing this package does not import TVM.
"""
from __future__ import annotations

# The private names are re-exported for the op converters (mpqc/ops/*: ``from mpqc.targets.tvm import _Int``).
# ruff: noqa: F401
from mpqc.cpu import cpu_flags
from mpqc.targets.tvm.build import (ARTIFACT_FORMAT, _input_shapes, _metadata, _program_and_compiled, compile_module,
                                    lower)
from mpqc.targets.tvm.kernels import registry as kernels
from mpqc.targets.tvm.layers import _convert_layer, _convert_layer_kernel, _layer_facts, _layer_kernel
from mpqc.targets.tvm.lowering import BuiltModule, _Lowering, build_module, check_supported
from mpqc.targets.tvm.runtime import LOADER_FILE, LoweredModule, _import_tree, load
from mpqc.targets.tvm.target import DEFAULT_CUDA_ARCH, _physical_cores, host_target, resolve_target
from mpqc.targets.tvm.te import (_CHECKED_FLOAT_MEAN_WINDOW, _exact_mul_te, _float_global_avg_pool_te,
                                 _round_clip_te, _window_sum_te, torch_sum_order)
from mpqc.targets.tvm.values import (_TO_NCHW, _TO_NHWC, NCHW, NHWC, _dtype, _flatten, _Float, _Int, _max_pool,
                                     _shape, _sum_dtype)
from mpqc.targets.tvm.weights import PACKED_WEIGHTS, UNPACK_FUNCTION

__all__ = ["ARTIFACT_FORMAT", "DEFAULT_CUDA_ARCH", "LOADER_FILE", "NCHW", "NHWC", "PACKED_WEIGHTS", "UNPACK_FUNCTION",
           "BuiltModule", "LoweredModule", "build_module", "check_supported", "compile_module", "cpu_flags",
           "host_target", "kernels", "load", "lower", "resolve_target", "torch_sum_order"]
