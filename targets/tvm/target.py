"""Target detection for the TVM lowering: this host's LLVM target from its CPU flags, and the targets a user names.

>>> host_target()["kind"]          # doctest: +SKIP
'llvm'
>>> resolve_target("cuda:sm_90")   # doctest: +SKIP

*Ensures*: ``mcpu``/``mattr`` come from ``/proc/cpuinfo`` (``mpqc.cpu.cpu_flags``), never hard-coded, so a module
built for ``"llvm"`` holds only instructions this CPU has; which int8 kernels the target can run is the kernel
registry's question (``kernels/registry.py``), asked of LLVM for the resolved target.
"""
from __future__ import annotations

import os
from typing import Any

from mpqc.cpu import cpu_flags
from mpqc.errors import ConfigError

DEFAULT_CUDA_ARCH = "sm_80"


def host_target() -> dict[str, Any]:
    """The llvm target of this machine: ``mcpu``/``mattr`` from the flags in ``/proc/cpuinfo`` (never hard-coded).

    x86-64 hosts get the highest ``x86-64-v2/v3/v4`` level their flags cover, plus the extensions that matter to
    int8 code (VNNI, VBMI, BF16, ...) as ``mattr``; other hosts get LLVM's generic CPU.
    """
    flags = cpu_flags()
    target: dict[str, Any] = {"kind": "llvm", "num-cores": _physical_cores()}
    if not flags:
        return target
    levels = [
        ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
        ("x86-64-v3", {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"}),
        ("x86-64-v2", {"sse4_2", "popcnt", "ssse3"}),
    ]
    for name, needed in levels:
        if needed <= flags:
            target["mcpu"] = name
            break
    extras = {  # /proc/cpuinfo flag -> LLVM feature
        "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni", "avx512vbmi": "avx512vbmi",
        "avx512_vbmi2": "avx512vbmi2", "avx512_bf16": "avx512bf16", "avx512_bitalg": "avx512bitalg",
        "avx512_vpopcntdq": "avx512vpopcntdq", "avx512ifma": "avx512ifma", "avx512_fp16": "avx512fp16",
        "gfni": "gfni", "amx_tile": "amx-tile", "amx_int8": "amx-int8",
    }
    mattr = [f"+{feature}" for flag, feature in extras.items() if flag in flags]
    if mattr and "mcpu" in target:
        target["mattr"] = mattr
    return target


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.cpu_count() or 1


def resolve_target(target: Any):
    """``"llvm"`` (this host), ``"cuda"`` (sm_80), ``"cuda:sm_90"``, a target dict or a ``tvm.target.Target``."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        spec = dict(target)
    elif isinstance(target, str):
        kind, _, arch = target.partition(":")
        if kind == "llvm" and not arch:
            spec = host_target()
        elif kind == "cuda":
            spec = {"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH}
        else:
            raise ConfigError(f"target {target!r}: expected 'llvm', 'cuda' or 'cuda:sm_XX'")
    else:
        raise ConfigError(f"target must be a string, a dict or a tvm Target, got {type(target).__name__}")
    if spec.get("kind") == "llvm" and spec == {"kind": "llvm"}:
        spec = host_target()
    if spec.get("kind") == "cuda":
        # the host side (the VM's glue, no kernels) stays generic x86-64: the GPU machine's CPU is not this one
        return tvm.target.Target(spec, host={"kind": "llvm"})
    return tvm.target.Target(spec)
