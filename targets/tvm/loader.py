"""Run an mpqc TVM artifact with the TVM runtime and NumPy only (no mpqc, no torch).

    import numpy as np
    from loader import load
    run = load("artifact_dir")                      # reads model.so, params.bin, model.json
    logits = run(np.zeros((1, 1, 28, 28), "float32"))

The weights are stored bit-packed in params.bin; ``load`` runs the module's ``unpack_weights`` once to unpack them
into the layouts the kernels read (:func:`bind_params`), then every call reuses them.
Set TVM_NUM_THREADS to the number of physical cores before the first call (TVM's pool starts one thread here).

This file is both ``mpqc.targets.tvm.loader`` (``LoweredModule`` binds its parameters with :func:`bind_params`) and,
copied as it is, the artifact's ``loader.py`` (``LoweredModule.export``): it must import nothing but the standard
library, NumPy and TVM, so that an artifact loads where mpqc and torch are not installed.
"""
import json
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine


def check_cpu(meta):
    """Refuse (``RuntimeError``) to run a module whose kernels need ``/proc/cpuinfo`` flags this CPU lacks
    (``meta["cpu_flags"]``, e.g. ``avx_vnni`` for the AVX-VNNI kernels): it would die of SIGILL. Nothing is
    refused where /proc/cpuinfo has no flags line."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    line = next((line for line in text.splitlines() if line.split(":")[0].strip() == "flags"), None)
    lacking = sorted(set(meta.get("cpu_flags", ())) - set(line.partition(":")[2].split())) if line else []
    if lacking:
        raise RuntimeError(f"this module runs {meta.get('isa')} kernels (built for {meta.get('target')}), and this "
                           f"CPU lacks the /proc/cpuinfo flag(s) {', '.join(lacking)}: run it on a CPU that has them")
    if "amx_tile" in meta.get("cpu_flags", ()):
        request_amx_tiles()


#: Linux x86-64: ``arch_prctl`` and its request for the AMX tile data state (``XFEATURE_XTILEDATA``)
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def request_amx_tiles():
    """Ask Linux to let this process use AMX tiles (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, for
    every thread, once is enough): without it the first tile instruction dies of SIGILL. ``RuntimeError`` where
    the kernel refuses (Linux before 5.16)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        raise RuntimeError(f"Linux refused this process the AMX tiles (arch_prctl ARCH_REQ_XCOMP_PERM, errno "
                           f"{ctypes.get_errno()}): run it on Linux 5.16 or later, or lower it with isa='avx512vnni'")


def bind_params(vm, meta, stored, device):
    """``main``'s parameters (after its inputs), in order: the weights from the module's ``unpack_weights`` (run
    once here on the packed array), the rest from ``stored`` (``params.bin``'s entries, NumPy arrays or TVM
    tensors)."""

    def tensor(value):
        array = value.numpy() if isinstance(value, tvm.runtime.Tensor) else np.asarray(value)
        return tvm.runtime.tensor(np.ascontiguousarray(array), device)

    weights = meta["weights"]
    unpacked = vm[weights["unpack"]](tensor(stored[weights["packed"]]))
    values = dict(zip(weights["names"], unpacked))
    return [values[name] if name in values else tensor(stored[name]) for name in meta["params"]]


def load(directory, device=None):
    """The artifact in ``directory`` as a callable: NumPy inputs in, NumPy outputs out (one output unwrapped);
    ``run.meta`` is its ``model.json``."""
    directory = Path(directory)
    meta = json.loads((directory / "model.json").read_text())
    device = device or tvm.cpu()
    check_cpu(meta)
    vm = VirtualMachine(tvm.runtime.load_module(str(directory / meta["library"])), device)
    stored = tvm.runtime.load_param_dict((directory / meta["params_file"]).read_bytes())
    args = bind_params(vm, meta, stored, device)
    n_out = len(meta["outputs"])

    def run(*inputs):
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), device) for x in inputs]
        result = vm["main"](*tensors, *args)
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        results = [r.numpy() for r in results][:n_out]
        return results[0] if n_out == 1 else tuple(results)

    run.meta = meta
    return run


if __name__ == "__main__":
    import sys

    model = load(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    shape = model.meta["inputs"][0]["shape"]
    print(model(np.zeros(shape, "float32")))
