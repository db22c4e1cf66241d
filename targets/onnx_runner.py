"""Run ONNX models with onnxruntime's CPU provider: the one place mpqc opens an onnxruntime session.

Imports numpy and onnxruntime only, so that it also runs as a script in a fresh interpreter, which is how
:func:`mpqc.targets.onnx_check.run_models` runs onnxruntime on an *emulated* CPU (``qemu-x86_64 -cpu Haswell``):
onnxruntime picks its integer kernels from the CPUID it sees, so under QEMU's Haswell model it runs its AVX2 kernels
on any host. As a script::

    python3 onnx_runner.py REQUEST.npz RESULT.npz

``REQUEST.npz`` holds ``model<i>`` (serialized models, as uint8 arrays), ``outputs<i>`` (the output names to fetch,
newline-joined, as uint8), ``feed:<name>`` (the inputs), ``optimize`` and ``threads``; ``RESULT.npz`` gets
``<i>:<output name>`` for every model and output.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np


def inference_session(model: bytes | str, *, optimize: bool = True, threads: int = 0):
    """An onnxruntime CPU session whose threads sleep when idle (spinning starves shared cores); otherwise
    onnxruntime's default session options, as a deployment pipeline would use them.

    ``optimize=False`` runs the graph as written (no QDQ fusion into onnxruntime's integer kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_models(models: Sequence[tuple[bytes, Sequence[str]]], feeds: dict[str, np.ndarray], *,
               optimize: bool = True, threads: int = 0) -> list[list[np.ndarray]]:
    """For each ``(serialized model, output names)``: the outputs onnxruntime computes from ``feeds``."""
    return [inference_session(model, optimize=optimize, threads=threads).run(list(names), feeds)
            for model, names in models]


def _text(array: np.ndarray) -> str:
    return bytes(array.astype(np.uint8)).decode()


def main(argv: Sequence[str]) -> int:
    request_path, result_path = argv
    with np.load(request_path) as request:
        count = sum(key.startswith("model") for key in request.files)
        models = [(bytes(request[f"model{i}"]), _text(request[f"outputs{i}"]).split("\n")) for i in range(count)]
        feeds = {key[len("feed:"):]: request[key] for key in request.files if key.startswith("feed:")}
        optimize, threads = bool(request["optimize"]), int(request["threads"])
    results = run_models(models, feeds, optimize=optimize, threads=threads)
    np.savez(result_path, **{f"{i}:{name}": value for i, ((_, names), values) in enumerate(zip(models, results))
                             for name, value in zip(names, values)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
