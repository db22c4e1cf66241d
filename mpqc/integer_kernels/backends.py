"""Small drivers shared by the integer kernels: an ONNX graph builder, and runners that build and execute a kernel
in TVM (llvm) and onnxruntime (CPU, default session options).

The kernels themselves (``softmax``, ``norm``, ``matmul``, ``lut``) each give three functions of one semantics:
``<op>_reference`` (torch, int64), ``<op>_relax`` (emits into a ``tvm.relax.BlockBuilder``) and ``<op>_onnx``
(appends nodes to an :class:`OnnxGraph`). The runners here turn one of the latter two into a callable on numpy or
torch arrays, for tests and for the registry's ``numerics_tests``.

>>> g = OnnxGraph()                                                     # doctest: +SKIP
>>> y = g.node("Add", ["x", g.const(np.int64(1))])                      # doctest: +SKIP
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np

ONNX_OPSET = 21


class OnnxGraph:
    """Collects ONNX nodes and initializers under unique names; ``node`` returns its (first) output's name."""

    def __init__(self, prefix: str = "k") -> None:
        self.prefix = prefix
        self.nodes: list = []
        self.initializers: list = []
        self._ids = itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._ids)}"

    def const(self, value: Any, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], *, outputs: int = 1, name: str | None = None, **attrs) -> Any:
        from onnx import helper

        outs = [self.fresh(op) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name or outs[0], **attrs))
        return outs[0] if outputs == 1 else outs


def _onnx_type(dtype: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def onnx_callable(build: Callable[..., str | Sequence[str]], inputs: Sequence[tuple[tuple[int, ...], Any]]
                  ) -> Callable[..., list[np.ndarray]]:
    """Build a model whose graph inputs have the given ``(shape, dtype)`` (names ``in0``, ``in1``, ...), let
    ``build(g, *names)`` append the kernel and return its output name(s); returns a function running it in
    onnxruntime on the CPU with default session options."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    g = OnnxGraph()
    names = [f"in{i}" for i in range(len(inputs))]
    outs = build(g, *names)
    outs = [outs] if isinstance(outs, str) else list(outs)
    graph_outs = [f"out{i}" for i in range(len(outs))]
    for o, go in zip(outs, graph_outs):
        g.nodes.append(helper.make_node("Identity", [o], [go]))
    graph = helper.make_graph(
        g.nodes, "kernel",
        [helper.make_tensor_value_info(n, _onnx_type(dtype), list(shape)) for n, (shape, dtype) in zip(names, inputs)],
        [onnx.ValueInfoProto(name=n) for n in graph_outs],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda *arrays: session.run(None, dict(zip(names, arrays)))


def relax_callable(build: Callable[..., Any], inputs: Sequence[tuple[tuple[int, ...], Any]]
                   ) -> Callable[..., list[np.ndarray]]:
    """Build a Relax function whose parameters have the given ``(shape, dtype)``, let ``build(bb, *vars)`` emit the
    kernel and return its output expr (or a tuple of them), compile for llvm; returns a function running it."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(f"in{i}", relax.TensorType(tuple(shape), str(np.dtype(dtype))))
              for i, (shape, dtype) in enumerate(inputs)]
    with bb.function("main", params):
        with bb.dataflow():
            out = build(bb, *params)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            outs = [bb.emit_output(o) for o in outs]
        bb.emit_func_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())

    def run(*arrays: np.ndarray) -> list[np.ndarray]:
        res = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
        return [res.numpy()] if isinstance(res, tvm.runtime.Tensor) else [r.numpy() for r in res]

    return run


def _signature(arrays: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], Any]]:
    return [(tuple(a.shape), a.dtype) for a in arrays]


def run_onnx(build: Callable[..., str | Sequence[str]], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Build (see :func:`onnx_callable`) and run once on ``inputs``."""
    return onnx_callable(build, _signature(inputs))(*inputs)


def run_relax(build: Callable[..., Any], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Build (see :func:`relax_callable`) and run once on ``inputs``."""
    return relax_callable(build, _signature(inputs))(*inputs)


def codes_from_storage_onnx(g: OnnxGraph, storage: str, zero_point: int) -> str:
    """QDQ storage (a QuantizeLinear output, uint8 holding ``code + zero_point``) -> int64 codes, for the kernels."""
    codes = g.node("Cast", [storage], to=7)
    return g.node("Sub", [codes, g.const(np.int64(zero_point))]) if zero_point else codes


def storage_from_codes_onnx(g: OnnxGraph, codes: str, zero_point: int) -> str:
    """int64 codes (within the b-bit range, b <= 8) -> uint8 storage ``code + zero_point``, for DequantizeLinear."""
    if zero_point:
        codes = g.node("Add", [codes, g.const(np.int64(zero_point))])
    return g.node("Cast", [codes], to=2)
