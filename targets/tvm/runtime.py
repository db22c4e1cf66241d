"""A compiled program in this process: :class:`LoweredModule` (run it, inspect its source, export its artifact), and
:func:`load` for an exported artifact.

The artifact (``LoweredModule.export``) is ``model.so``, ``params.bin`` (the bit-packed weights and the int32
biases), ``model.json`` and ``loader.py``: a copy of :mod:`mpqc.targets.tvm.loader`, which runs with TVM and NumPy
only. A ``LoweredModule`` binds its parameters with that same module's ``bind_params``, so the two cannot drift.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mpqc.errors import MpqcError
from mpqc.targets.tvm.weights import PACKED_WEIGHTS

LOADER_FILE = Path(__file__).with_name("loader.py")  # copied into every artifact as loader.py


@dataclass
class LoweredModule:
    """A program compiled by TVM. ``__call__`` runs it (CPU targets only); the weights are unpacked from their
    bit-packed storage by the module's ``unpack_weights`` once, on the first run, as the artifact's loader does."""

    executable: Any
    target: Any
    meta: dict[str, Any]
    params: dict[str, np.ndarray]  # stored as they are (int32 biases)
    packed_weights: np.ndarray  # every weight, bit-packed
    ir_module: Any = None
    build_seconds: float = 0.0
    inexact: list[str] = field(default_factory=list)
    schedules: dict[str, int] = field(default_factory=dict)  # CPU: functions, from_database, vnni, default_rule
    _vm: Any = None
    _param_tensors: list[Any] | None = None

    @property
    def kind(self) -> str:
        return self.target.kind.name

    def _machine(self):
        if self.kind != "llvm":
            raise MpqcError(f"a {self.kind} module cannot run on this machine's CPU; export it and run it there")
        if self._vm is None:
            import tvm
            from tvm import relax

            from mpqc.targets.tvm.loader import bind_params, check_cpu

            check_cpu(self.meta)  # a module cross-compiled for a CPU with more (AVX-VNNI, ...) dies of SIGILL here

            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
            self._param_tensors = bind_params(self._vm, self.meta, {PACKED_WEIGHTS: self.packed_weights,
                                                                    **self.params}, tvm.cpu())
        return self._vm

    def unpacked_weights(self) -> dict[str, np.ndarray]:
        """The weights as ``unpack_weights`` gives them to ``main`` (in their kernels' layouts)."""
        self._machine()
        names = self.meta["params"]
        return {name: tensor.numpy() for name, tensor in zip(names, self._param_tensors)
                if name in self.meta["weights"]["names"]}

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """All results as NumPy arrays: the program's outputs, then the exposed nodes' values."""
        import tvm

        vm = self._machine()
        arrays = [tvm.runtime.tensor(np.ascontiguousarray(np.asarray(x, dtype=np.float32))) for x in inputs]
        result = vm["main"](*arrays, *self._param_tensors)
        results = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return [r.numpy() for r in results]

    def timer(self, *inputs: np.ndarray, repeat: int = 20, min_repeat_ms: int = 2) -> Callable[[], float]:
        """A callable timing ``main`` on ``inputs``: the fastest of ``repeat`` timings (each at least
        ``min_repeat_ms`` of runs), in ms, with TVM's ``time_evaluator``; warmed up once here."""
        import tvm

        vm = self._machine()
        arrays = [tvm.runtime.tensor(np.ascontiguousarray(np.asarray(x, dtype=np.float32))) for x in inputs]
        evaluate = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        arguments = [*arrays, *self._param_tensors]
        evaluate(*arguments)
        return lambda: float(min(evaluate(*arguments).results)) * 1e3

    def __call__(self, *inputs):
        """Outputs (torch tensors for torch inputs, NumPy arrays otherwise); one output unwrapped."""
        as_torch = any(isinstance(x, torch.Tensor) for x in inputs)
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in inputs]
        results = self.run(*arrays)[: len(self.meta["outputs"])]
        if as_torch:
            results = [torch.from_numpy(r) for r in results]
        return results[0] if len(results) == 1 else tuple(results)

    def exposed(self, *inputs) -> dict[str, np.ndarray]:
        """The values of the nodes named in ``lower(..., expose=...)`` (8-bit codes of quantize nodes, ...)."""
        results = self.run(*[x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in inputs])
        return dict(zip(self.meta["exposed"], results[len(self.meta["outputs"]):]))

    def source(self, fmt: str = "") -> str:
        """The generated device source (CUDA C for cuda; LLVM IR for llvm, or ``fmt="asm"``)."""
        mod = self.executable.mod
        if self.kind == "cuda":
            for imported in _import_tree(mod):
                if imported.kind == "cuda":
                    return imported.inspect_source("")
            raise MpqcError("the CUDA module has no CUDA source")
        for imported in _import_tree(mod):
            if imported.kind == "llvm":
                return imported.inspect_source(fmt or "ll")
        raise MpqcError("the module has no LLVM code")

    def export(self, directory: str | Path) -> Path:
        """Write ``model.so``, ``params.bin`` (the packed weights and the biases), ``model.json`` and ``loader.py``
        into ``directory``."""
        import tvm

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.executable.export_library(str(directory / "model.so"))
        stored = {PACKED_WEIGHTS: self.packed_weights, **self.params}
        blob = tvm.runtime.save_param_dict({name: tvm.runtime.tensor(a) for name, a in stored.items()})
        (directory / "params.bin").write_bytes(blob)
        (directory / "model.json").write_text(json.dumps(self.meta, indent=1))
        (directory / "loader.py").write_text(LOADER_FILE.read_text())
        if self.kind == "cuda":
            (directory / "kernels.cu").write_text(self.source())
        return directory


def _import_tree(mod):
    yield mod
    for imported in mod.imports:
        yield from _import_tree(imported)


def load(directory: str | Path, device: Any = None):
    """An exported artifact as a callable (NumPy in, NumPy out): the artifact's own ``loader.load``
    (:mod:`mpqc.targets.tvm.loader`), which needs TVM and NumPy only."""
    from mpqc.targets.tvm.loader import load as load_artifact

    return load_artifact(directory, device)
