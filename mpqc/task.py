"""What a model is trained and measured for: its forward step, its loss and its metric, as one :class:`Task`.

Search, fine-tuning, calibration, evaluation, the report and the sweep all go through a ``Task``; none of them knows
about labels or logits. Three kinds, chosen by :func:`resolve_task` from ``mpqc.compile``'s ``loss``/``forward``/
``metric`` arguments:

* :func:`classification` (the default when batches are ``(inputs..., labels)`` and the model returns one
  ``[batch, classes]`` tensor): cross-entropy, metric top-1 in percent;
* :func:`distillation` (the default when batches carry no labels, or ``loss="distill"``): agreement with the fp32
  model's own outputs, so a pretrained model and unlabeled inputs are enough. The rule, per floating-point output
  tensor: ``"kl"`` (KL divergence of the softmaxes over the last dimension, for logits) where the output is 2-D,
  ``"mse"`` (mean squared error over the fp32 output's mean square) otherwise; ``loss="distill-kl"``,
  ``"distill-mse"`` or ``"distill-cosine"`` (1 - cosine similarity per example, for embeddings) force one kind.
  Its metric, on the first output tensor: ``top-1 agreement`` (% of examples whose argmax is the fp32 model's) for
  ``kl``, else ``cosine to fp32`` (the mean per-example cosine similarity);
* :func:`user_task`: the user's callables, ``forward(model, batch) -> outputs`` (default: the model on the batch's
  inputs), ``loss(outputs, batch, teacher_outputs) -> scalar Tensor`` (``teacher_outputs``: the fp32 model's
  outputs on the same batch) and ``metric(outputs, batch) -> dict[str, float]`` whose *first* key is the metric
  reported and maximised (return ``-mse`` or a PSNR rather than an error); a metric with a third parameter,
  ``metric(outputs, batch, teacher_outputs)``, also gets the fp32 model's outputs (agreement metrics of a
  distillation: cosine to fp32, neighbour agreement); without ``metric`` the loss is reported as ``-loss``.

Batches, by default (:class:`Inputs`): a tensor is the model's one input; a tuple or list holds the model's ``n``
inputs, then optionally the labels (``n + 1`` items); a dict holds the inputs by name and optionally ``"labels"``.
Outputs may be a tensor, a tuple, list or dict of them, or a ``ModelOutput``-like object (a dataclass or anything
with ``to_tuple()``).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

from mpqc.errors import DataError, MpqcError, TaskError

Batch = Any
Outputs = Any
DISTILL_KINDS = ("auto", "kl", "mse", "cosine")


@dataclass(frozen=True)
class Inputs:
    """The model's inputs (the captured graph's, in order, by name) and how a batch holds them by default."""

    names: tuple[str, ...]

    def split(self, batch: Batch) -> tuple[tuple, Any]:
        """``(inputs, labels)`` of ``batch``; ``labels`` is None for a batch of inputs only (see the module doc)."""
        n = len(self.names)
        if isinstance(batch, Tensor):
            if n != 1:
                raise DataError(f"a batch that is one tensor cannot feed the model's {n} inputs {self.names}")
            return (batch,), None
        if isinstance(batch, Mapping):
            missing = [name for name in self.names if name not in batch]
            if missing:
                raise DataError(f"the batch (a dict with keys {sorted(batch)}) has no model input {missing[0]!r}")
            return tuple(batch[name] for name in self.names), batch.get("labels")
        if isinstance(batch, (tuple, list)) and len(batch) in (n, n + 1):
            return tuple(batch[:n]), (batch[n] if len(batch) == n + 1 else None)
        length = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise DataError(f"a batch must hold the model's {n} input(s) {self.names}, optionally followed by labels; "
                        f"got {length} (pass forward= to read another layout)")

    def positional(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
        """The inputs of one call ``model(*args, **kwargs)`` in the graph's order."""
        unknown = [name for name in kwargs if name not in self.names[len(args):]]
        if unknown:
            raise DataError(f"the model has no input {unknown[0]!r} (its inputs: {', '.join(self.names)})")
        return tuple(args) + tuple(kwargs[name] for name in self.names[len(args):] if name in kwargs)


@dataclass(frozen=True)
class Task:
    """Forward, loss and metric of one task, with the checks that turn a failing callable into one clear error.

    ``loss(outputs, batch, teacher_outputs)``; ``metric(outputs, batch, teacher_outputs)`` returns the per-batch
    means (weighted by batch size over a loader), ``metric_name`` its key to report and maximise. ``uses_teacher``:
    the loss or metric reads the fp32 model's outputs. ``kd``: the distillation term mixed into the loss when a
    ``TrainConfig`` asks for distillation (None: the task is distillation already). ``step_accuracy``: a
    training-step accuracy shown on the progress bar (classification only). ``metric_uses_teacher``: evaluation
    runs the fp32 model too (distillation's agreement metrics).
    """

    name: str
    inputs: Inputs
    forward: Callable[[Any, Batch], Outputs]
    loss: Callable[[Outputs, Batch, Outputs | None], Tensor]
    metric: Callable[[Outputs, Batch, Outputs | None], Mapping[str, float]]
    metric_name: str
    metric_unit: str = ""
    uses_teacher: bool = False
    kd: Callable[[Outputs, Outputs, float], Tensor] | None = None
    step_accuracy: Callable[[Outputs, Batch], Tensor] | None = None
    metric_uses_teacher: bool = False

    # ------------------------------------------------------------------------------------------ checked calls
    def run_forward(self, model: Any, batch: Batch, where: str) -> Outputs:
        """``forward(model, batch)``; a failure or an output without tensors is a :class:`TaskError` at ``where``."""
        outputs = _checked_call("forward", self.forward, where, model, batch)
        if not output_tensors(outputs):
            raise TaskError(f"{where}: forward {_name(self.forward)} returned no tensor "
                            f"(got {type(outputs).__name__}); outputs must be a tensor, or a tuple, list, dict or "
                            "ModelOutput holding tensors")
        return outputs

    def compute_loss(self, outputs: Outputs, batch: Batch, teacher_outputs: Outputs | None, where: str) -> Tensor:
        """``loss(...)``, refused unless it is a one-element floating-point tensor."""
        value = _checked_call("loss", self.loss, where, outputs, batch, teacher_outputs)
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.dtype.is_floating_point:
            got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise TaskError(f"{where}: loss {_name(self.loss)} must return a scalar floating-point tensor, got {got}")
        return value.reshape(())

    def compute_metric(self, outputs: Outputs, batch: Batch, teacher_outputs: Outputs | None,
                       where: str) -> dict[str, float]:
        """``metric(...)`` as ``{name: float}``, refused unless it holds numbers and its first key is the one
        this task reports."""
        values = _checked_call("metric", self.metric, where, outputs, batch, teacher_outputs)
        numbers = _numbers(values)
        if numbers is None:
            raise TaskError(f"{where}: metric {_name(self.metric)} must return a non-empty dict of numbers "
                            f"(its first key is maximised), got {_short(values)}")
        return numbers

    def checked(self, model: Any, batch: Batch) -> "Task":
        """This task after one forward, loss and metric of ``model`` (the fp32 model) on ``batch``, before any
        training: a failing callable is refused early, and the metric's first key becomes ``metric_name``."""
        where = "checking the task on the first training batch (fp32 model)"
        with torch.no_grad():
            outputs = self.run_forward(model, batch, f"{where}, batch 0")
            loss = self.compute_loss(outputs, batch, outputs, where)
            if not torch.isfinite(loss):
                raise TaskError(f"{where}: loss {_name(self.loss)} returned {float(loss)} before any training")
            names = list(self.compute_metric(outputs, batch, outputs, where))
        return dataclasses.replace(self, metric_name=self.metric_name or names[0])

    def batch_size(self, batch: Batch) -> int:
        inputs = self.inputs.split(batch)[0] if _splittable(self.inputs, batch) else batch
        tensors = [x for x in pytree.tree_leaves(inputs) if isinstance(x, Tensor) and x.dim() > 0]
        if not tensors:
            raise DataError(f"cannot tell the batch size of a batch of {type(batch).__name__} (no tensor in it)")
        return int(tensors[0].shape[0])


# --------------------------------------------------------------------------------------------- the three kinds
def classification(inputs: Inputs) -> Task:
    """Cross-entropy on ``(inputs..., labels)`` batches of a model returning ``[batch, classes]`` logits; top-1 %."""

    def forward(model: Any, batch: Batch) -> Tensor:
        return model(*inputs.split(batch)[0])

    def loss(logits: Tensor, batch: Batch, teacher_logits: Tensor | None) -> Tensor:
        return F.cross_entropy(logits, _labels(inputs, batch, logits))

    def top1(logits: Tensor, batch: Batch, teacher_logits: Tensor | None) -> dict[str, float]:
        return {"top-1": float((logits.argmax(1) == _labels(inputs, batch, logits)).float().mean() * 100)}

    def kd(logits: Tensor, teacher_logits: Tensor, t: float) -> Tensor:
        return F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher_logits / t, 1), reduction="batchmean") * t * t

    def accuracy(logits: Tensor, batch: Batch) -> Tensor:
        return (logits.argmax(1) == _labels(inputs, batch, logits)).float().mean()

    return Task("classification", inputs, forward, loss, top1, "top-1", "%", kd=kd, step_accuracy=accuracy)


def distillation(inputs: Inputs, example_outputs: Outputs, kind: str = "auto", temperature: float = 1.0,
                 forward: Callable[[Any, Batch], Outputs] | None = None) -> Task:
    """Label-free: agreement with the fp32 model's outputs (the rule in the module docstring). ``example_outputs``
    (the model's outputs on the example inputs) name the metric."""
    if kind not in DISTILL_KINDS:
        raise TaskError(f"distillation kind must be one of {DISTILL_KINDS}, got {kind!r}")
    first = output_tensors(example_outputs)[0]
    first_kind = _leaf_kind(kind, first)

    def loss(outputs: Outputs, batch: Batch, teacher_outputs: Outputs | None) -> Tensor:
        return distillation_loss(outputs, teacher_outputs, kind, temperature)

    def metric(outputs: Outputs, batch: Batch, teacher_outputs: Outputs | None) -> dict[str, float]:
        student, teacher = output_tensors(outputs)[0].float(), output_tensors(teacher_outputs)[0].float()
        cosine = float(F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean())
        if first_kind == "kl":
            agreement = float((student.argmax(-1) == teacher.argmax(-1)).float().mean() * 100)
            return {"top-1 agreement": agreement, "cosine to fp32": cosine}
        return {"cosine to fp32": cosine}

    return Task(f"distillation ({kind})", inputs, forward or _default_forward(inputs), loss, metric,
                "top-1 agreement" if first_kind == "kl" else "cosine to fp32", "%" if first_kind == "kl" else "",
                uses_teacher=True, metric_uses_teacher=True)


def user_task(inputs: Inputs, loss: Callable | None, forward: Callable | None, metric: Callable | None,
              example_outputs: Outputs) -> Task:
    """The user's ``loss`` with the default (or the user's) ``forward``; ``metric`` defaults to ``-loss``."""
    forward = forward or _default_forward(inputs)

    if metric is None:
        def scored(outputs: Outputs, batch: Batch, teacher_outputs: Outputs | None) -> dict[str, float]:
            return {"-loss": -float(loss(outputs, batch, teacher_outputs))}
        scored.__qualname__ = f"-{_name(loss)}"
        metric_name, metric_fn, metric_uses_teacher = "-loss", scored, True
    else:
        metric_fn, metric_uses_teacher = _user_metric(metric)
        metric_name = ""  # the name: the metric's first key (Task.checked)

    def kd(outputs: Outputs, teacher_outputs: Outputs, t: float) -> Tensor:
        return distillation_loss(outputs, teacher_outputs, "auto", t)

    return Task(_name(loss), inputs, forward, loss, metric_fn, metric_name, uses_teacher=True, kd=kd,
                metric_uses_teacher=metric_uses_teacher)


def resolve_task(inputs: Inputs, first_batch: Batch, example_outputs: Outputs, *, loss: Callable | str | None,
                 forward: Callable | None, metric: Callable | None) -> Task:
    """The :class:`Task` that ``mpqc.compile``'s ``loss``/``forward``/``metric`` arguments mean (module docstring).

    ``first_batch`` (of the train loader) tells whether the batches carry labels; ``example_outputs`` are the
    model's outputs on the example inputs (a classifier returns one ``[batch, classes]`` tensor).
    """
    if isinstance(loss, str):
        if loss != "distill" and not (loss.startswith("distill-") and loss[len("distill-"):] in DISTILL_KINDS[1:]):
            raise TaskError(f"loss must be a callable, 'distill' or one of "
                            f"{', '.join('distill-' + k for k in DISTILL_KINDS[1:])}; got {loss!r}")
        task = distillation(inputs, example_outputs, loss.partition("-")[2] or "auto", forward=forward)
        return _with_metric(task, metric)
    if loss is not None:
        return user_task(inputs, loss, forward, metric, example_outputs)
    labelled = forward is None and _splittable(inputs, first_batch) and inputs.split(first_batch)[1] is not None
    if not labelled:
        return _with_metric(distillation(inputs, example_outputs, forward=forward), metric)
    if not (isinstance(example_outputs, Tensor) and example_outputs.dim() == 2):
        raise TaskError("the batches carry labels but the model does not return one [batch, classes] tensor of "
                        "logits: pass loss= (and metric=) for its task, or loss='distill' to distill the fp32 "
                        "model's outputs")
    if forward is not None or metric is not None:
        raise TaskError("forward= and metric= need loss= (the default classification task has its own)")
    return classification(inputs)


# --------------------------------------------------------------------------------------------- helpers
def output_tensors(outputs: Outputs) -> list[Tensor]:
    """The floating-point tensors of ``outputs`` in order (tensor, tuple/list/dict, dataclass, ``to_tuple()``)."""
    if outputs is None:
        return []
    if dataclasses.is_dataclass(outputs) and not isinstance(outputs, type):
        outputs = [getattr(outputs, f.name) for f in dataclasses.fields(outputs)]
    elif hasattr(outputs, "to_tuple") and not isinstance(outputs, Tensor):
        outputs = outputs.to_tuple()
    found = []
    for leaf in pytree.tree_leaves(outputs):
        if isinstance(leaf, Tensor) and leaf.dtype.is_floating_point:
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) or hasattr(leaf, "to_tuple"):
            found.extend(output_tensors(leaf))
    return found


def distillation_loss(outputs: Outputs, teacher_outputs: Outputs, kind: str = "auto",
                      temperature: float = 1.0) -> Tensor:
    """Sum over the floating-point output tensors of the distance to the fp32 model's (kinds: module docstring)."""
    student, teacher = output_tensors(outputs), output_tensors(teacher_outputs)
    if len(student) != len(teacher):
        raise TaskError(f"distillation: the model returned {len(student)} tensors, the fp32 model {len(teacher)}")
    total = torch.zeros((), device=student[0].device)
    for s, t in zip(student, teacher):
        t = t.detach().to(s.dtype)
        leaf_kind = _leaf_kind(kind, t)
        if leaf_kind == "kl":
            tau = temperature
            total = total + F.kl_div(F.log_softmax(s.flatten(0, -2) / tau, -1), F.softmax(t.flatten(0, -2) / tau, -1),
                                     reduction="batchmean") * tau * tau
        elif leaf_kind == "cosine":
            total = total + (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()
        else:
            total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    return total


def _leaf_kind(kind: str, tensor: Tensor) -> str:
    if kind != "auto":
        return kind
    return "kl" if tensor.dim() == 2 else "mse"


def _default_forward(inputs: Inputs) -> Callable[[Any, Batch], Outputs]:
    def forward(model: Any, batch: Batch) -> Outputs:
        return model(*inputs.split(batch)[0])
    forward.__qualname__ = "model(*inputs)"
    return forward


def _with_metric(task: Task, metric: Callable | None) -> Task:
    if metric is None:
        return task
    metric_fn, uses_teacher = _user_metric(metric)
    return dataclasses.replace(task, metric=metric_fn, metric_name="", metric_unit="",
                               metric_uses_teacher=uses_teacher)


def _user_metric(metric: Callable) -> tuple[Callable[[Outputs, Batch, Outputs | None], Mapping[str, float]], bool]:
    """The user's ``metric`` called as the :class:`Task` calls metrics, and whether it reads the fp32 model's
    outputs (a third positional parameter: ``metric(outputs, batch, teacher_outputs)``)."""
    if _positional_arity(metric) >= 3:
        def metric_fn(outputs: Outputs, batch: Batch, teacher_outputs: Outputs | None) -> Mapping[str, float]:
            return metric(outputs, batch, teacher_outputs)
        uses_teacher = True
    else:
        def metric_fn(outputs: Outputs, batch: Batch, teacher_outputs: Outputs | None) -> Mapping[str, float]:
            return metric(outputs, batch)
        uses_teacher = False
    metric_fn.__qualname__ = _name(metric)
    return metric_fn, uses_teacher


def _positional_arity(fn: Callable) -> int:
    """How many positional arguments ``fn`` takes (a large number for ``*args``; 2 when it cannot be told)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return 1 << 16
    return sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
               for p in parameters)


def _labels(inputs: Inputs, batch: Batch, logits: Tensor) -> Tensor:
    labels = inputs.split(batch)[1]
    if labels is None:
        raise DataError("classification needs (inputs, labels) batches; this batch has no labels")
    return labels.to(logits.device)


def _splittable(inputs: Inputs, batch: Batch) -> bool:
    try:
        inputs.split(batch)
    except DataError:
        return False
    return True


def _numbers(values: Any) -> dict[str, float] | None:
    if not isinstance(values, Mapping) or not values:
        return None
    numbers = {}
    for key, value in values.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        numbers[str(key)] = float(value)
    return numbers


def _checked_call(kind: str, fn: Callable, where: str, *args: Any) -> Any:
    """``fn(*args)``; an exception from the user's callable becomes one :class:`TaskError` naming ``where``, the
    kind of callable and its name (mpqc's own errors pass through)."""
    try:
        return fn(*args)
    except MpqcError:
        raise
    except Exception as error:
        raise TaskError(f"{where}: {kind} {_name(fn)} raised {type(error).__name__}: {_first_line(error)}") from error


def _name(fn: Callable) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}.{name}" if module and module not in ("mpqc.task", "builtins", "__main__") else name


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
