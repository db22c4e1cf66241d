"""The host CPU: its model name and instruction-set flags, read at run time (never assumed).

Machines that run mpqc differ (AVX2-only AMD EPYC and AVX-512 VNNI EPYC have both been seen on the same project), so
what a kernel may execute, and what onnxruntime will execute, is asked here.

>>> "avx2" in cpu_flags() or not cpu_flags()   # doctest: +SKIP
True
"""
from __future__ import annotations

import functools
from pathlib import Path

#: Integer-dot-product ISA levels, best first: /proc/cpuinfo flags each needs.
INT8_ISA_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("amx", frozenset({"amx_tile", "amx_int8", "avx512_vnni", "avx512bw"})),
    ("avx512vnni", frozenset({"avx512_vnni", "avx512bw"})),
    ("avxvnni", frozenset({"avx_vnni", "avx2"})),
    ("avx2", frozenset({"avx2"})),
    ("sse4.1", frozenset({"sse4_1"})),
)

#: The ``isa=`` choices of the TVM lowering (``targets/tvm/kernels/registry.py`` implements them, best first after
#: ``auto``), the latency budget and the CLIs.
ISA_CHOICES = ("auto", "amx", "avx512vnni", "avxvnni", "avx2", "generic")


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(name: str) -> str:
    for line in _cpuinfo().splitlines():
        if line.split(":")[0].strip() == name:
            return line.partition(":")[2].strip()
    return ""


def cpu_flags() -> frozenset[str]:
    """The first processor's flags in /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    return frozenset(_field("flags").split())


def cpu_model() -> str:
    """The processor's model name ("unknown CPU" where /proc/cpuinfo does not say)."""
    return _field("model name") or "unknown CPU"


def int8_isa() -> str:
    """The best integer dot-product instruction set this CPU has: ``amx``, ``avx512vnni``, ``avxvnni``, ``avx2``,
    ``sse4.1`` or ``generic``."""
    flags = cpu_flags()
    return next((name for name, needed in INT8_ISA_LEVELS if needed <= flags), "generic")


def isa_flags(isa: str) -> list[str]:
    """The ``/proc/cpuinfo`` flags an int8 ISA of :data:`INT8_ISA_LEVELS` needs (sorted; none for ``generic``)."""
    return sorted(dict(INT8_ISA_LEVELS).get(isa, frozenset()))


def missing_flags(isa: str) -> list[str]:
    """The flags of :func:`isa_flags` this CPU lacks (none where /proc/cpuinfo has no flags: nothing is known)."""
    flags = cpu_flags()
    return [flag for flag in isa_flags(isa) if flag not in flags] if flags else []


def describe_cpu() -> str:
    """One line for reports and errors, e.g. ``AMD EPYC (int8 ISA: avx2; no AVX-512 VNNI)``."""
    isa = int8_isa()
    vnni = "" if isa in ("amx", "avx512vnni", "avxvnni") else "; no VNNI"
    return f"{cpu_model()} (int8 ISA: {isa}{vnni})"
