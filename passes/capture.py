"""Capture an eager model as a ``torch.fx.GraphModule`` whose layers stay ``call_module`` nodes.

Later passes find conv/linear/batchnorm layers as ``call_module`` nodes and read or replace the module with
``gm.get_submodule(node.target)``, so both tracers below are made to keep those layers as modules:

1. ``torch.fx`` symbolic tracing with a tracer that keeps every ``nn.Conv1d/2d/3d``, ``nn.Linear`` and BatchNorm
   (subclasses included, as long as they keep the base class's ``forward``) as a leaf ``call_module`` node.
   The graph is shape-generic and uses torch-level ops (``torch.relu``, ``operator.add``, ...).
2. If fx fails (typically Python control flow on a shape, ``if x.shape[-1] > 16:``), or its graph calls functions
   registered with ``torch.fx.wrap`` that it cannot see into (``opaque_calls``: torchvision's Swin attention,
   written with shape-dependent control flow; the fx graph is kept if export fails too), ``torch.export.export``
   with ``strict=False``. Its graph is ATen-level (``aten.conv2d``, ``aten.add.Tensor``, ...). Every
   ``aten.conv*/linear/batch_norm`` call that a plain conv/linear/batchnorm module made (known from the node's
   ``nn_module_stack`` metadata and checked against the module's own weight/bias/statistics) is mapped back to a
   ``call_module`` node on that module; everything else stays ATen. ``torch.export.unflatten`` is not used: it
   gives one interpreter module per submodule, with the convolutions still ATen calls inside them.
   The graph is specialised to the example inputs' shapes except the batch dimension (dim 0 of every tensor
   input, when they all share it), which is traced symbolically: a batch of one is repeated to two for the trace,
   as ``torch.export`` fixes sizes 0 and 1. If that trace fails, the exact example inputs are tried. The graph
   keeps export's shape guard (a ``call_module`` node ``_guards_fn`` with no users), so calling it with other
   non-batch shapes raises instead of silently taking a branch traced for different shapes.

While ``torch.export`` runs, torch's own log records (a failing export warns with pages of graph code) are kept
off stderr: a failure is one :class:`CaptureError` naming both tracers' errors; the records stay on the error
(``CaptureError.torch_log``) and go to this module's logger at INFO level (``mpqc -v`` prints them).

A trace is accepted only if it reproduces the eager model's output on the example inputs; that run is a
``ShapeProp``, so every tensor-valued node of the returned graph carries ``node.meta["tensor_meta"]`` for the
example inputs.

``capture`` puts ``model`` itself in eval mode and does not restore its previous mode. The graph owns a deep copy
of the model's parameters and buffers, so later passes (folding, quantizer insertion, fine-tuning) never change
``model``, which can then serve as the float teacher.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import sysconfig
import traceback
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.graph import CodeGen
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from mpqc.errors import CaptureError, ExampleInputError

#: Module types kept as ``call_module`` nodes by both tracers.
KEPT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
_KEPT_FORWARDS = frozenset(cls.forward for cls in KEPT_MODULES)

_aten = torch.ops.aten
#: The ATen op that a kept module's own ``forward`` records under ``torch.export``.
_EXPORT_LAYER_OPS: dict[Any, type[nn.Module]] = {
    _aten.conv1d.default: nn.Conv1d,
    _aten.conv1d.padding: nn.Conv1d,
    _aten.conv2d.default: nn.Conv2d,
    _aten.conv2d.padding: nn.Conv2d,
    _aten.conv3d.default: nn.Conv3d,
    _aten.conv3d.padding: nn.Conv3d,
    _aten.linear.default: nn.Linear,
    _aten.batch_norm.default: nn.modules.batchnorm._BatchNorm,
}
#: Which operands of each ATen op must be the module's own attributes (by argument position).
_CONV_OPERANDS = {1: "weight", 2: "bias"}
_BATCHNORM_OPERANDS = {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"]
_SITE_DIRS = (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])


def capture(model: nn.Module, example_inputs: tuple | dict[str, Any]) -> fx.GraphModule:
    """Trace ``model`` on ``example_inputs`` into a GraphModule with conv/linear/batchnorm as ``call_module`` nodes.

    ``example_inputs`` is a tuple of positional inputs or a dict of keyword inputs. With keywords the graph's inputs
    are the given ones, named as the model names them, in the order of its ``forward`` signature (see
    :func:`keyword_order`); the parameters not given keep their defaults and are not inputs of the graph. Either
    way the returned graph takes its inputs positionally (or by those names).

    Puts ``model`` in eval mode (not restored). Raises :class:`ExampleInputError` if the inputs do not run through
    the model, and :class:`CaptureError` naming both tracers' failures if neither can capture it.
    """
    if isinstance(example_inputs, dict):
        names = keyword_order(model, example_inputs)
        model.eval()
        expected = _run_eager(model, (), example_inputs)
        positional = tuple(example_inputs[name] for name in names)
        return _capture(model, positional, expected, {name: example_inputs[name] for name in names})
    if not isinstance(example_inputs, tuple):
        raise ExampleInputError(
            f"example_inputs for {type(model).__name__} must be a tuple of positional inputs or a dict of keyword "
            f"inputs, got {type(example_inputs).__name__}"
        )
    model.eval()
    expected = _run_eager(model, example_inputs)
    return _capture(model, example_inputs, expected, None)


def keyword_order(model: nn.Module, example_inputs: dict[str, Any]) -> list[str]:
    """The names of the keyword ``example_inputs`` in the order of ``model.forward``'s parameters; raises
    :class:`ExampleInputError` for a name ``forward`` does not take or a parameter without default left out."""
    parameters = inspect.signature(model.forward).parameters
    unknown = [name for name in example_inputs if name not in parameters]
    if unknown:
        raise ExampleInputError(f"{type(model).__name__}.forward takes no input named {unknown[0]!r} "
                                f"(its inputs: {', '.join(parameters)})")
    missing = [name for name, p in parameters.items() if name not in example_inputs and p.default is p.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise ExampleInputError(f"the keyword example inputs leave out {type(model).__name__}.forward's input "
                                f"{missing[0]!r}, which has no default")
    return [name for name in parameters if name in example_inputs]


def _capture(model: nn.Module, example_inputs: tuple, expected: Any, keywords: dict[str, Any] | None) -> fx.GraphModule:
    try:
        model_copy = copy.deepcopy(model)
    except Exception as error:
        raise CaptureError(f"cannot copy {type(model).__name__} to capture it: {_describe(error)}") from error

    fx_graph = None
    try:
        fx_graph = _accept(_trace_fx(model_copy, keywords), example_inputs, expected)
        if not opaque_calls(fx_graph):
            return fx_graph
        fx_failure: Exception = CaptureError(f"calls fx cannot see into: {', '.join(opaque_calls(fx_graph))}")
    except Exception as error:
        fx_failure = error
    torch_log: list[str] = []
    try:
        with _torch_log_kept(torch_log):
            return _trace_export(model_copy, example_inputs, expected, keywords)
    except Exception as error:
        export_failure = error
        if fx_graph is not None:  # the fx graph with its opaque calls: refused later, each listed
            return fx_graph
    finally:
        for line in torch_log:
            log.info("torch: %s", line)
    failure = CaptureError(
        f"cannot capture {type(model).__name__} as a graph:\n"
        f"  torch.fx.symbolic_trace failed: {_describe(fx_failure)}\n"
        f"  torch.export.export(strict=False) failed: {_describe(export_failure)}"
    )
    failure.torch_log = "\n".join(torch_log)
    raise failure from export_failure


def opaque_calls(gm: fx.GraphModule) -> list[str]:
    """The functions registered with ``torch.fx.wrap`` that ``gm`` calls and the op registry does not know (fx's
    own ``_assert_is_none`` and torchvision's ``stochastic_depth`` it does): fx records each call as one node
    without looking inside (torchvision's Swin attention and patch merging); ``torch.export`` traces through them."""
    from torch.fx._symbolic_trace import _wrapped_fns_to_patch

    from mpqc.ops import op_of

    names = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and hasattr(target, "__globals__") and target.__name__ != "_assert_is_none" \
                and (id(target.__globals__), target.__name__) in _wrapped_fns_to_patch and op_of(gm, node) is None:
            names.append(target.__name__)
    return sorted(set(names))


class _KeepRecords(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def _torch_log_kept(into: list[str]):
    """For the duration, what torch writes to stderr goes into ``into`` (one entry a line): every ``torch.*``
    logger's handlers (torch installs a stderr handler on many, none propagating) are replaced by one that keeps
    the records, and ``sys.stderr`` is redirected (a failing ``torch.export`` prints its graph with ``print``)."""
    keeper = _KeepRecords(into)
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    saved = {logger: logger.handlers[:] for logger in loggers if logger.handlers}
    for logger in saved:
        logger.handlers = [keeper]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    finally:
        for logger, handlers in saved.items():
            logger.handlers = handlers
        into.extend(line for line in printed.getvalue().splitlines() if line.strip())


def _run_eager(model: nn.Module, example_inputs: tuple, keywords: dict[str, Any] | None = None) -> Any:
    try:
        with torch.no_grad():
            return model(*example_inputs, **(keywords or {}))
    except Exception as error:
        described = _describe_inputs(example_inputs) if keywords is None else _describe_keywords(keywords)
        raise ExampleInputError(
            f"the example inputs {described} do not run through {type(model).__name__} "
            f"(eval mode, torch.no_grad): {_describe(error)}"
        ) from error


def _accept(gm: fx.GraphModule, example_inputs: tuple, expected: Any) -> fx.GraphModule:
    """Return ``gm``, with ``tensor_meta`` on its nodes, if it reproduces the eager output; else AssertionError."""
    with torch.no_grad():
        actual = ShapeProp(gm).propagate(*example_inputs)
    try:
        torch.testing.assert_close(actual, expected)
    except AssertionError as mismatch:
        raise AssertionError(f"the traced graph's output differs from the eager model's: {mismatch}") from None
    return gm


# --- torch.fx --------------------------------------------------------------------------------------------------


def is_kept_module(module: nn.Module) -> bool:
    """True for a conv/linear/batchnorm module (or subclass) whose ``forward`` is the torch.nn one."""
    return isinstance(module, KEPT_MODULES) and type(module).forward in _KEPT_FORWARDS


class _LayerTracer(fx.Tracer):
    """The default fx tracer, plus: subclasses of kept modules (defined outside torch.nn) are leaves too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_kept_module(m) or super().is_leaf_module(m, module_qualified_name)


def _trace_fx(model: nn.Module, keywords: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``forward``; with ``keywords``, its other parameters are fixed to their defaults and dropped from the
    graph's inputs (with fx's ``_assert_is_none`` checks on them), so the inputs are exactly the given names."""
    if keywords is None:
        return fx.GraphModule(model, _LayerTracer().trace(model), type(model).__name__)
    parameters = inspect.signature(model.forward).parameters
    fixed = {name: p.default for name, p in parameters.items()
             if name not in keywords and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    graph = _LayerTracer().trace(model, concrete_args=fixed)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    given = [name for name in parameters if name in keywords]
    kept = [node for node in placeholders if node.target in given]
    for node in placeholders:
        if node in kept:
            continue
        for user in list(node.users):
            if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none" \
                    and not user.users:
                graph.erase_node(user)
        if node.users:
            raise AssertionError(f"torch.fx kept the fixed input {node.target!r} in the graph")
        graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(model, graph, type(model).__name__)


# --- torch.export -----------------------------------------------------------------------------------------------


def _trace_export(model: nn.Module, example_inputs: tuple, expected: Any,
                  keywords: dict[str, Any] | None = None) -> fx.GraphModule:
    """Export with a symbolic batch dimension; if that fails, with the exact example inputs. With ``keywords``
    (the same inputs as ``example_inputs``, by name) the model is exported called by keyword."""
    def export(inputs: tuple, dynamic_shapes: tuple | None) -> torch.export.ExportedProgram:
        if keywords is None:
            return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
        named = dict(zip(keywords, inputs))
        shapes = None if dynamic_shapes is None else dict(zip(keywords, dynamic_shapes))
        return torch.export.export(model, (), kwargs=named, dynamic_shapes=shapes, strict=False)

    inputs, dynamic_shapes = _with_symbolic_batch(example_inputs)
    try:
        return _accept(_to_module_graph(export(inputs, dynamic_shapes), model), example_inputs, expected)
    except Exception:
        if dynamic_shapes is None:
            raise
    return _accept(_to_module_graph(export(example_inputs, None), model), example_inputs, expected)


def _with_symbolic_batch(example_inputs: tuple) -> tuple[tuple, tuple | None]:
    """Inputs and ``dynamic_shapes`` that trace dim 0 of the tensor inputs symbolically, where they share it."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    batch_sizes = {x.shape[0] if x.dim() > 0 else None for x in tensors}
    if len(batch_sizes) != 1 or None in batch_sizes:
        return example_inputs, None
    repeat = 2 if batch_sizes == {1} else 1
    inputs = tuple(x.repeat(repeat, *[1] * (x.dim() - 1)) if isinstance(x, torch.Tensor) else x for x in example_inputs)
    dynamic_shapes = tuple({0: Dim.AUTO} if isinstance(x, torch.Tensor) else None for x in example_inputs)
    return inputs, dynamic_shapes


def _to_module_graph(program: torch.export.ExportedProgram, model: nn.Module) -> fx.GraphModule:
    """The exported graph with every call a kept module made turned back into a ``call_module`` on that module."""
    flat = program.module()
    graph = flat.graph
    for node in list(graph.nodes):
        path = _calling_module_path(node, model)
        if path is None:
            continue
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        flat.set_submodule(path, model.get_submodule(path), strict=False)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    _use_plain_codegen(graph, program)
    graph.lint()
    return fx.GraphModule(flat, graph, type(model).__name__)


def _calling_module_path(node: fx.Node, model: nn.Module) -> str | None:
    """The qualified name of the kept module whose own ``forward`` made ATen call ``node``, or None."""
    if node.op != "call_function" or node.target not in _EXPORT_LAYER_OPS or not node.meta.get("nn_module_stack"):
        return None
    path, _ = list(node.meta["nn_module_stack"].values())[-1]
    module = model.get_submodule(path)
    if not isinstance(module, _EXPORT_LAYER_OPS[node.target]) or not is_kept_module(module):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        operands, plain = _BATCHNORM_OPERANDS, module.track_running_stats
    else:
        operands, plain = _CONV_OPERANDS, getattr(module, "padding_mode", "zeros") == "zeros"
    args = list(node.args) + [None] * (max(operands) + 1 - len(node.args))
    owns_operands = all(_is_attribute(args[i], path, name, module) for i, name in operands.items())
    return path if plain and owns_operands else None


def _is_attribute(arg: Any, path: str, name: str, module: nn.Module) -> bool:
    if getattr(module, name) is None:
        return arg is None
    return isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target == f"{path}.{name}"


def _use_plain_codegen(graph: fx.Graph, program: torch.export.ExportedProgram) -> None:
    """Drop export's pytree calling convention where the inputs are flat, so ``forward`` looks like the model's."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    in_spec, out_spec = program.call_spec.in_spec, program.call_spec.out_spec
    by_keyword = {str(n.target): n for n in placeholders}
    if in_spec not in (pytree.tree_flatten((tuple(placeholders), {}))[1],
                       pytree.tree_flatten(((), by_keyword))[1]):
        return
    output = graph.output_node()
    output.args = (pytree.tree_unflatten(list(output.args[0]), out_spec),)
    graph.set_codegen(CodeGen())


# --- error messages ---------------------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    """``Type: first line of the message`` plus, where found, the model source line that raised it."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    frame = _user_frame(error)
    if frame is not None:
        text += f" (at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()})"
    return text


def _user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame in model code: not in torch, this module, the standard library or generated."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not _is_library_file(frame.filename)]
    return frames[-1] if frames else None


def _is_library_file(filename: str) -> bool:
    if filename.startswith(("<", _TORCH_DIR)) or filename == __file__:
        return True
    return filename.startswith(_STDLIB_DIR) and not filename.startswith(_SITE_DIRS)


def _describe_keywords(keywords: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{name}: {_describe_inputs((x,))[1:-1]}" for name, x in keywords.items()) + "}"


def _describe_inputs(example_inputs: tuple) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
        return type(x).__name__

    return "(" + ", ".join(one(x) for x in example_inputs) + ")"
