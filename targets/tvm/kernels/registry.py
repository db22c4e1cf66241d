"""The int8 layer kernels of the TVM target, one row per instruction set, and the choice of one per layer.

*Matches*: every conv/linear layer of a lowered program, on an llvm target.

*Rewrites to*: the kernel :func:`choose` returns for the layer: the first of :data:`KERNELS` (each ISA module's
``KERNEL``, registered here best first) whose ISA the target has (:func:`target_isas`, LLVM's answer for the
target's ``mcpu``/``mattr``, so it follows the host's detected features or a forced target) and whose
:meth:`Kernel.takes` accepts the layer (op, groups, weight and activation bits); ``None`` (TVM's own int8
operators, ``generic.py``) where none does. A kernel names the micro-kernel (``implicit_gemm.MicroKernel``) for the
layer's bits: the block name of its TE, by which ``../schedule.py`` schedules and tensorizes it.

*Ensures*: a kernel is only chosen for a target that has every LLVM feature it needs, so the module never holds an
instruction the target lacks; and only for bits where its arithmetic is exact (AVX2: narrow or wide form from the
bits, ``avx2.py``).

ISAs, best first: ``amx`` (``amx.py``; a layer it does not take goes to its ``fallback``, ``avx512vnni``),
``avx512vnni`` (``avx512_vnni.py``), ``avxvnni`` (``avx_vnni.py``: the 256-bit VEX
``vpdpbusd``), ``avx2`` (``avx2.py``), ``generic`` (``generic.py``). ``--isa avx2`` or ``--isa avxvnni`` on an
AVX-512 host builds for :func:`isa_target` (``x86-64-v3``, plus ``avxvnni`` for the latter: AVX-512 switched off)
so the kernels are the ones an AVX2 or AVX-VNNI CPU runs (LLVM would otherwise emit the EVEX ``vpdpbusd``).
A forced ISA the target lacks is refused (:func:`resolve_isa`), naming the ``/proc/cpuinfo`` flags this CPU lacks
too; code built for a target with an ISA this CPU lacks (cross-compiled) is never run here: the latency table and
tuning ask :func:`check_runnable` before measuring, a lowered module and its artifact check the flags recorded in
its ``model.json`` (``loader.check_cpu``).
"""
from __future__ import annotations

from typing import Any

from mpqc.cpu import ISA_CHOICES, missing_flags
from mpqc.errors import ConfigError
from mpqc.targets.tvm.kernels import amx, avx2, avx512_vnni, avx_vnni, implicit_gemm
from mpqc.targets.tvm.kernels.implicit_gemm import Kernel, LayerFacts, MicroKernel

ISAS = ISA_CHOICES


KERNELS: tuple[Kernel, ...] = (amx.KERNEL, avx512_vnni.KERNEL, avx_vnni.KERNEL, avx2.KERNEL)  # best first
BY_ISA = {kernel.isa: kernel for kernel in KERNELS}
MICRO_KERNELS: tuple[MicroKernel, ...] = (amx.AMX, avx512_vnni.VNNI, avx_vnni.VNNI256, avx2.NARROW, avx2.WIDE,
                                          *avx2.MULTI_STEP.values())


def target_isas(target: Any) -> list[str]:
    """The ISAs of :data:`KERNELS` the target can run, best first."""
    return [kernel.isa for kernel in KERNELS if kernel.available(target)]


def resolve_isa(target: Any, isa: str = "auto", vnni: bool | None = None) -> str:
    """The ISA the lowering uses for ``target``: ``isa`` (``auto``: the best the target has), or the older
    ``vnni`` switch (``True``: ``avx512vnni``, ``False``: ``generic``). Errors name what is missing."""
    if isa not in ISAS:
        raise ConfigError(f"isa must be one of {ISAS}, got {isa!r}")
    if vnni is not None:
        wanted = "avx512vnni" if vnni else "generic"
        if isa not in ("auto", wanted):
            raise ConfigError(f"vnni={vnni} contradicts isa={isa!r}")
        isa = wanted
    available = target_isas(target)
    if isa == "auto":
        return available[0] if available else "generic"
    if isa != "generic" and isa not in available:
        needed = "+".join(BY_ISA[isa].features)
        lacking = missing_flags(isa)
        host = f"; this CPU lacks the /proc/cpuinfo flag(s) {', '.join(lacking)}" if lacking else ""
        raise ConfigError(f"isa={isa!r}{' (vnni=True)' if vnni else ''}: the target {target} has no {needed}{host}")
    return isa


def check_runnable(isa: str, what: str) -> None:
    """Refuse ``what`` (something that runs ``isa``'s kernels on this CPU: measuring them) where this CPU lacks one
    of the ``/proc/cpuinfo`` flags they need (code built for another CPU would die of SIGILL here). AMX kernels ask
    Linux for their tiles where they are built (``amx.register_intrinsic``)."""
    lacking = missing_flags(isa)
    if lacking:
        raise ConfigError(f"{what} would run {isa} kernels on this CPU, which lacks the /proc/cpuinfo flag(s) "
                          f"{', '.join(lacking)}")


def isa_target(target: Any, isa: str):
    """``target`` restricted to what ``isa`` needs: for ``avx2`` (``avxvnni``) on a target with AVX-512, an
    ``x86-64-v3`` (plus ``avxvnni``) target: AVX-512 switched off, so the code is what an AVX2 (AVX-VNNI: the VEX
    ``vpdpbusd``) CPU runs and measures as it would there; otherwise ``target`` itself."""
    import tvm

    if isa not in ("avx2", "avxvnni") or target.kind.name != "llvm":
        return target
    from tvm.target import codegen

    if not codegen.target_has_features("avx512f", target):
        return target
    cores = target.attrs.get("num-cores")
    spec: dict[str, Any] = {"kind": "llvm", "mcpu": "x86-64-v3"}
    if isa == "avxvnni":
        spec["mattr"] = ["+avxvnni"]
    if cores is not None:
        spec["num-cores"] = int(cores)
    return tvm.target.Target(spec)


def choose(isa: str, layer: LayerFacts) -> Kernel | None:
    """The kernel for ``layer`` under ``isa``: that ISA's, or where it does not take the layer its ``fallback``'s
    (AMX: AVX-512 VNNI); None: TVM's own operators."""
    kernel = BY_ISA.get(isa)
    while kernel is not None and not kernel.takes(layer):
        kernel = BY_ISA.get(kernel.fallback) if kernel.fallback else None
    return kernel


def find_micro_kernel(sch):
    """(conv block, its micro-kernel) of the PrimFunc in ``sch``, or (None, None)."""
    return implicit_gemm.find_conv(sch, MICRO_KERNELS)


def is_kernel_block(name: str) -> bool:
    return any(name.startswith(micro.block) for micro in MICRO_KERNELS)
VNNI_BLOCK = avx512_vnni.VNNI.block
